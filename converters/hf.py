"""Hugging Face ``datasets`` saved with ``save_to_disk`` -> streamshard samples, via pyarrow.

Layout read here (datasets/arrow_dataset.py ``Dataset.save_to_disk``, datasets 5.x; same since
2.x): a split directory holds ``state.json`` (``"_data_files": [{"filename": ...}]``, in order),
``dataset_info.json`` and the data files, each an Arrow IPC *stream*. A ``DatasetDict`` directory
holds ``dataset_dict.json`` and one such directory per split. The ``datasets`` package is not
needed; ``pyarrow`` is (optional extra ``parquet``). Splits of one ``DatasetDict`` are not mixed:
pass the split directory (``SRC/train``) or its ``state.json``.

Arrow types -> columns: ``string``/``large_string`` -> ``str``; ``binary``/``large_binary`` ->
``bytes``; bool, integer and float scalars as is; a list (or fixed-size list) of a numeric type ->
``DTYPE[]`` (``DTYPE[n]``); a struct holding a binary field (``Image``, ``Audio`` features) is
flattened into ``name.field`` columns (the ``bytes`` field of an ``Image`` / ``Audio``
feature is typed ``image`` / ``audio``, for ``streamshard.media``); everything else (nested
lists, structs, dictionaries, timestamps, decimals) -> ``json`` (dates, times and decimals as
their ISO/str text, binary values nested in lists as base64 text). A column holding nulls
becomes ``json`` (null kept); nulls in a binary column are an error. Row order and every column
are kept.
"""

from __future__ import annotations

import base64
import datetime
import decimal
import json
import os
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from streamshard.converters import Piece, ReadContext, register
from streamshard.converters.arrow import plain_type
from streamshard.errors import ConfigError, InputError, missing_dependency

STATE_FILE = "state.json"
DICT_FILE = "dataset_dict.json"
def _pa():
    try:
        import pyarrow as pa
    except ImportError:
        raise missing_dependency("pyarrow", "parquet", "--format hf") from None
    return pa


def data_files(state_path: str) -> list[str]:
    """The Arrow files of one saved split, in order."""
    try:
        with open(state_path, "rb") as f:
            state = json.loads(f.read())
        names = [d["filename"] for d in state["_data_files"]]
    except FileNotFoundError:
        raise InputError(f"{state_path}: missing; is this a save_to_disk directory?") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{state_path}: not a datasets state.json ({exc!r})") from None
    if state.get("_indices_data_files"):
        raise InputError(f"{state_path}: has an indices mapping; save it again with "
                         f"save_to_disk (which flattens indices) before converting")
    root = os.path.dirname(state_path)
    return [os.path.join(root, n) for n in names]


@contextmanager
def _arrow_errors(path: str) -> Iterator[None]:
    """Opening or reading one Arrow data file: its failures as InputErrors naming the file."""
    pa = _pa()
    try:
        yield
    except FileNotFoundError:
        raise InputError(f"{path}: Arrow data file listed in state.json is missing") from None
    except pa.ArrowInvalid as exc:
        raise InputError(f"{path}: not a readable Arrow stream file: {exc}") from None


def _batches(path: str) -> Iterator[Any]:
    pa = _pa()
    with _arrow_errors(path):
        yield from pa.ipc.open_stream(pa.memory_map(path, "r"))


def _schema(path: str) -> Any:
    pa = _pa()
    with _arrow_errors(path):
        return pa.ipc.open_stream(pa.memory_map(path, "r")).schema


def _plain_type(t: Any) -> str | None:
    """The streamshard type of a non-null Arrow type, or ``None`` (json / flattened). Lists of
    bool are not arrays here (datasets stores them as JSON lists)."""
    _pa()  # a missing pyarrow says what to install
    return plain_type(t, bool_arrays=False)


def _has_binary(t: Any) -> bool:
    pa = _pa()
    if pa.types.is_struct(t):
        return any(_has_binary(t.field(i).type) for i in range(t.num_fields))
    return _plain_type(t) == "bytes"


def plan_columns(schema: Any, nulls: Mapping[str, int], where: str) -> list[tuple[str, str, tuple]]:
    """``[(column, type, path)]``: ``path`` is the tuple of field names from the top-level
    column down to the value (length > 1 for flattened struct fields)."""
    pa = _pa()
    out: list[tuple[str, str, tuple]] = []
    media = _media_features(schema)

    def visit(name: str, t: Any, path: tuple) -> None:
        null = nulls.get(".".join(path), 0) > 0
        plain = _plain_type(t)
        if plain == "bytes" and len(path) == 2 and path[1] == "bytes" and path[0] in media:
            plain = media[path[0]]  # the encoded file of an Image / Audio feature
        if pa.types.is_struct(t) and _has_binary(t) and not null:
            for i in range(t.num_fields):
                f = t.field(i)
                visit(f"{name}.{f.name}", f.type, path + (f.name,))
            return
        if null and _has_binary(t):
            raise InputError(f"{where}: column {name!r} ({t}) holds nulls; binary values with "
                             f"nulls cannot be represented (no nullable bytes column)")
        out.append((name, "json" if null or plain is None else plain, path))

    for field in schema:
        visit(field.name, field.type, (field.name,))
    return out


_MEDIA = {"Image": "image", "Audio": "audio"}


def _media_features(schema: Any) -> dict[str, str]:
    """Top-level columns that ``datasets`` declares as ``Image`` / ``Audio`` features (the
    ``huggingface`` entry of the Arrow schema metadata), as ``image`` / ``audio``."""
    try:
        meta = json.loads((schema.metadata or {}).get(b"huggingface", b"{}"))
        features = meta.get("info", {}).get("features", {})
    except (ValueError, AttributeError):
        return {}
    if not isinstance(features, dict):
        return {}
    return {name: _MEDIA[f["_type"]] for name, f in features.items()
            if isinstance(f, dict) and f.get("_type") in _MEDIA}


def _null_counts(files: Sequence[str]) -> dict[str, int]:
    """Nulls per column path (``a`` and struct fields ``a.b``), over all files."""
    pa = _pa()
    counts: dict[str, int] = {}

    def add(arr: Any, path: str, parent_nulls: int) -> None:
        counts[path] = counts.get(path, 0) + arr.null_count + parent_nulls
        if pa.types.is_struct(arr.type):
            for i in range(arr.type.num_fields):
                add(arr.field(i), f"{path}.{arr.type.field(i).name}", arr.null_count + parent_nulls)

    for path in files:
        for batch in _batches(path):
            for name, col in zip(batch.schema.names, batch.columns):
                add(col, name, 0)
    return counts


def _jsonable(value: Any, where: str) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v, where) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, where) for v in value]
    if isinstance(value, (datetime.date, datetime.time, datetime.datetime)):
        return value.isoformat()
    if isinstance(value, (decimal.Decimal, datetime.timedelta)):
        return str(value)
    if isinstance(value, bytes):
        # only reachable for binary nested in lists: kept as base64 text, documented
        return base64.b64encode(value).decode("ascii")
    return value


def _extractor(typ: str, path: tuple, where: str) -> Callable[[Any], list]:
    """Turn one record batch into the list of this column's values."""

    def column(batch: Any) -> Any:
        arr = batch.column(path[0])
        for name in path[1:]:
            arr = arr.field(name)
        return arr

    if typ.endswith("]"):
        dtype = np.dtype(typ[:typ.index("[")])

        def arrays(batch: Any) -> list:
            arr = column(batch)
            flat = arr.flatten().to_numpy(zero_copy_only=False).astype(dtype, copy=False)
            if typ.endswith("[]"):
                lengths = arr.value_lengths().to_numpy(zero_copy_only=False)
                return np.split(flat, np.cumsum(lengths)[:-1]) if len(arr) else []
            return list(flat.reshape(len(arr), -1)) if len(arr) else []
        return arrays
    if typ == "json":
        return lambda batch: [_jsonable(v, where) for v in column(batch).to_pylist()]
    return lambda batch: column(batch).to_pylist()


def _check_split(files: Sequence[str]) -> None:
    splits: dict[str, str] = {}
    for path in files:
        split_dir = os.path.dirname(os.path.abspath(path))
        parent = os.path.dirname(split_dir)
        if os.path.isfile(os.path.join(parent, DICT_FILE)):
            if parent in splits:
                raise ConfigError(f"{path} and {splits[parent]} are splits of the same "
                                  f"DatasetDict {parent}; convert one split directory at a time "
                                  f"(for example {os.path.join(parent, 'train')})")
            splits[parent] = path


class HFConverter:
    """``--format hf``: SRC is a saved split directory (its ``state.json`` is picked up) or the
    ``state.json``. Pieces are row ranges of the split."""

    name = "hf"
    help = "Hugging Face datasets saved with save_to_disk (Arrow files), one split at a time"
    options: tuple = ()
    extensions = (STATE_FILE,)

    def columns(self, files: Sequence[str], options: Mapping[str, Any]) -> dict[str, str]:
        if not files:
            raise ConfigError("--format hf: no state.json found in the inputs")
        _check_split(files)
        result, first = None, None
        for path in files:
            cols = {n: t for n, t, _ in self._plan(path)}
            if result is not None and cols != result:
                raise InputError(f"{path}: columns {cols} differ from {result} of {first}")
            result, first = cols, first or path
        return result  # type: ignore[return-value]

    def _plan(self, state_path: str) -> list[tuple[str, str, tuple]]:
        arrow = data_files(state_path)
        if not arrow:
            raise InputError(f"{state_path}: lists no data files")
        return plan_columns(_schema(arrow[0]), _null_counts(arrow), state_path)

    def split(self, path: str, name: str, size: int, chunk_bytes: int,
              options: Mapping[str, Any]) -> list[Piece]:
        rows = nbytes = 0
        for file in data_files(path):
            for batch in _batches(file):
                rows += batch.num_rows
                nbytes += batch.nbytes
        per = max(1, rows * max(chunk_bytes, 1) // max(nbytes, 1))
        return [Piece(path, name, a, min(a + per, rows), nbytes * (min(a + per, rows) - a)
                      // max(rows, 1)) for a in range(0, max(rows, 1), per)]

    def read(self, piece: Piece, options: Mapping[str, Any], ctx: ReadContext) -> Iterator[dict]:
        plan = self._plan(piece.path)
        extract = [(n, _extractor(t, p, piece.name)) for n, t, p in plan]
        where = [piece.start]
        ctx.set_locator(lambda: f"{piece.name}: row {where[0]}")
        row = 0
        for file in data_files(piece.path):
            for batch in _batches(file):
                lo, hi = max(piece.start - row, 0), min(piece.end - row, batch.num_rows)
                if lo < hi:
                    part = batch.slice(lo, hi - lo)
                    values = [(n, f(part)) for n, f in extract]
                    for k in range(hi - lo):
                        where[0] = row + lo + k
                        yield {n: v[k] for n, v in values}
                    ctx.advance(part.nbytes)
                row += batch.num_rows
                if row >= piece.end:
                    return


register("hf", HFConverter())
