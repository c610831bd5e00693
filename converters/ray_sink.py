"""Write a Ray Data dataset as one streamshard dataset: a ``Datasink`` using the partitioned writer.

Each Ray write task writes its blocks with its own ``ShardWriter`` into the part directory
``DEST/parts/part-{task_idx:05d}`` (a complete dataset); when all tasks are done the driver merges
the parts into ``DEST/index.json`` with ``merge_datasets``, which lists the parts' shards in task
order and copies no shard data. A retried task rewrites its own part (``overwrite`` of that part
only). Nothing at ``DEST`` looks like a dataset until the merged index is written, and a failed
write removes the parts it made.

Task ``i`` writes the ``i``-th bundle of blocks when Ray preserves order, so
:func:`write_streamshard` turns on ``DataContext.execution_options.preserve_order`` for the write
(and restores it): the result is then the same sample sequence as a single-process conversion of
the same rows. Requires ``ray[data]`` (optional extra ``ray``), imported only where the sink is
used: :class:`StreamshardDatasink` is built on first access (it subclasses Ray's ``Datasink``), so
a Spark worker that imports :func:`write_part` never pays the ~1 s ``import ray.data``.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import numpy as np

from streamshard.errors import ConfigError, DatasetExistsError, SchemaError, missing_dependency

PARTS = "parts"
_SINK = "StreamshardDatasink"


def part_name(task_idx: int) -> str:
    """The part directory (relative to DEST) written by Ray write task ``task_idx``."""
    return f"{PARTS}/part-{task_idx:05d}"


def to_sample(row: Mapping[str, Any], types: Mapping[str, Any]) -> dict:
    """One Ray row -> a sample for ``types`` (parsed ``ColumnType`` per column): arrays become
    numpy arrays of the column dtype, numpy scalars Python values, JSON values plain Python."""
    out = {}
    for name, ctype in types.items():
        if name not in row:
            raise SchemaError(f"column {name!r} is missing from the row (row has "
                              f"{sorted(row)})")
        value = row[name]
        if ctype.kind == "array":
            value = np.asarray(value, dtype=ctype.dtype)
        elif ctype.kind == "json":
            value = _plain(value)
        elif isinstance(value, np.generic):
            value = value.item()
        out[name] = value
    return out


def _plain(value: Any) -> Any:
    """numpy containers/scalars inside a JSON value -> lists and Python scalars."""
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()] if value.dtype == object else value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def __getattr__(name: str) -> Any:
    if name == _SINK:
        return _sink_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), _SINK})


def _sink_class() -> type:
    """``StreamshardDatasink``: :class:`_Sink` on Ray's ``Datasink``, built once, on first use.
    Without ray the class is still importable; constructing it raises with an install hint."""
    cls = globals().get(_SINK)
    if cls is None:
        try:
            from ray.data import Datasink
        except ImportError:
            bases: tuple[type, ...] = (_Sink,)
        else:
            bases = (_Sink, Datasink)
        cls = type(_SINK, bases, {"__module__": __name__, "__qualname__": _SINK,
                                  "__doc__": _Sink.__doc__, "_RAY": len(bases) > 1})
        # one class per process, also when two threads race here: pickle (Ray ships the sink to
        # its write tasks) finds a class by its module and name and checks it is that object
        cls = globals().setdefault(_SINK, cls)
    return cls


class _Sink:
    """Ray Data ``Datasink`` writing ``columns`` (name -> streamshard type string) to ``dest``.

    Picklable (Ray ships it to write tasks); holds only settings. ``writer_options`` go to each
    part's ``ShardWriter`` (``shard_size``, ``block_size``, ``compression``,
    ``compression_level``). ``result`` holds the merged ``DatasetIndex`` after the write."""

    _RAY = False  # set on the built class: whether it is a Ray Datasink

    def __init__(self, dest: str, *, columns: Mapping[str, str], overwrite: bool = False,
                 storage_options: Mapping[str, Any] | None = None,
                 metadata: Mapping[str, Any] | None = None, **writer_options: Any):
        if not self._RAY:
            raise missing_dependency("ray", "ray", _SINK)
        from streamshard.schema import Schema

        Schema(dict(columns))  # validate the types on the driver, before any task runs
        allowed = {"shard_size", "block_size", "compression", "compression_level"}
        unknown = sorted(set(writer_options) - allowed)
        if unknown:
            raise ConfigError(f"unknown writer option {unknown[0]!r} (allowed: "
                              f"{', '.join(sorted(allowed))})")
        self.dest = str(dest).rstrip("/")
        self.columns = dict(columns)
        self.overwrite = overwrite
        self.storage_options = dict(storage_options or {})
        self.metadata = dict(metadata or {})
        self.writer_options = writer_options
        self.result = None

    def get_name(self) -> str:
        return "Streamshard"

    @property
    def supports_distributed_writes(self) -> bool:
        return True

    def _fs(self):
        from streamshard.location import resolve

        loc = resolve(self.dest, self.storage_options)
        return loc.fs, loc.root

    def on_write_start(self, schema: Any = None) -> None:
        from streamshard.index import INDEX_FILE

        fs, root = self._fs()
        if fs.exists(f"{root}/{INDEX_FILE}"):
            if not self.overwrite:
                raise DatasetExistsError(f"{self.dest} already holds a dataset; pass "
                                         f"overwrite=True to replace it")
            fs.rm(f"{root}/{INDEX_FILE}")
        if fs.exists(f"{root}/{PARTS}"):
            fs.rm(f"{root}/{PARTS}", recursive=True)  # parts of an earlier or failed write

    def write(self, blocks: Iterable[Any], ctx: Any) -> dict:
        """Runs in a Ray task: write this task's blocks to its part directory."""
        from ray.data.block import BlockAccessor

        part = part_name(ctx.task_idx)
        rows = (row for block in blocks
                for row in BlockAccessor.for_block(block).iter_rows(public_row_format=True))
        samples = write_part(rows, self.dest, part, self.columns,
                             storage_options=self.storage_options, **self.writer_options)
        return {"task": ctx.task_idx, "part": part, "samples": samples}

    def on_write_complete(self, write_result: Any) -> None:
        returns = write_result.write_returns if hasattr(write_result, "write_returns") \
            else list(write_result)
        parts = [r["part"] for r in sorted(returns, key=lambda r: r["task"])]
        # overwrite: on_write_start already refused or removed an existing index
        meta = {"ray": {"parts": len(parts)}, **self.metadata}
        self.result = merge_parts(self.dest, parts, overwrite=True, metadata=meta,
                                  storage_options=self.storage_options)

    def on_write_failed(self, error: Exception) -> None:
        fs, root = self._fs()
        if fs.exists(f"{root}/{PARTS}"):
            fs.rm(f"{root}/{PARTS}", recursive=True)


def write_part(rows: Iterable[Mapping[str, Any]], dest: str, part: str,
               columns: Mapping[str, str], *, storage_options: Mapping[str, Any] | None = None,
               **writer_options: Any) -> int:
    """Write ``rows`` (mappings; numpy/Arrow/pandas values are coerced to ``columns``) as the
    complete part dataset ``DEST/part`` and return its sample count. The engine-neutral unit of
    the partitioned writer: Ray write tasks and Spark ``mapInPandas`` partitions both call it.
    An existing part at that path (a retried task) is replaced."""
    from streamshard.writer import ShardWriter

    types = _parsed(columns)
    with ShardWriter(f"{str(dest).rstrip('/')}/{part}", columns=dict(columns), overwrite=True,
                     storage_options=dict(storage_options or {}), **writer_options) as writer:
        for row in rows:
            writer.write(to_sample(row, types))
    return writer.summary.samples


def merge_parts(dest: str, parts: Iterable[str], *, overwrite: bool = False,
                metadata: Mapping[str, Any] | None = None,
                storage_options: Mapping[str, Any] | None = None):
    """Merge the part directories ``parts`` (relative to ``dest``, in the given order) into
    ``DEST/index.json`` without copying shard data; returns the ``DatasetIndex``.
    ``DatasetExistsError`` if ``dest`` already has an index and ``overwrite`` is false."""
    from streamshard.merge import merge_datasets

    parts = list(parts)
    if not parts:
        raise ConfigError(f"no parts to merge into {dest} (was the input empty?)")
    base = str(dest).rstrip("/")
    return merge_datasets([f"{base}/{p}" for p in parts], base, overwrite=overwrite,
                          metadata=dict(metadata or {}) or None,
                          storage_options=dict(storage_options or {}) or None)


def _parsed(columns: Mapping[str, str]) -> dict:
    from streamshard.schema import parse_type

    return {n: parse_type(t, n) for n, t in columns.items()}


def write_streamshard(dataset: Any, dest: str, *, columns: Mapping[str, str],
                      overwrite: bool = False, **options: Any):
    """Write the Ray ``dataset`` to ``dest`` through :class:`StreamshardDatasink`, in order, and
    return the merged ``DatasetIndex``. ``options``: ``shard_size``, ``block_size``,
    ``compression``, ``compression_level``, ``storage_options``, ``metadata``."""
    try:
        from ray.data import DataContext
    except ImportError:
        raise missing_dependency("ray", "ray", "write_streamshard") from None
    sink = _sink_class()(dest, columns=columns, overwrite=overwrite, **options)
    exec_opts = DataContext.get_current().execution_options
    saved = exec_opts.preserve_order
    exec_opts.preserve_order = True
    try:
        dataset.write_datasink(sink)
    finally:
        exec_opts.preserve_order = saved
    if sink.result is None:  # on_write_complete ran on a copy: read the merged index back
        from streamshard.reader import open_dataset

        return open_dataset(dest, storage_options=options.get("storage_options")).index
    return sink.result

