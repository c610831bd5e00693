"""Columnar batches for fixed-size schemas: rows gathered straight into the output tensors.

When every column has a fixed size (scalars, fixed-shape arrays), a sample's encoding is its
columns' little-endian bytes back to back (docs/FORMAT.md). For uncompressed shards a batch is
gathered with one fancy-index per shard from a strided view of the shard's mmap
(:mod:`streamshard.gather`), directly into the output tensor when the schema is one array
column; compressed shards copy each row out of its (cached) decompressed block. The result equals
``streamshard.collate.collate([ds[i] for i in ids], token_dtype=...)`` exactly (tested): arrays
keep their dtype except uint16/uint32 arrays, which become ``token_dtype`` (int64 by default,
what ``nn.Embedding`` and ``cross_entropy`` take; ``None`` keeps them), and scalars become int64 /
float64 / bool tensors as torch's ``default_collate`` makes them from Python numbers.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.utils.data

from streamshard.collate import TOKEN_DTYPES, token_dtype_of
from streamshard.gather import ShardRows
from streamshard.locate import locate
from streamshard.schema import Schema

log = logging.getLogger(__name__)

# What default_collate makes of the Python scalars the decoder returns for each dtype kind.
_SCALAR_OUT = {"b": np.bool_, "i": np.int64, "u": np.int64, "f": np.float64}


@dataclass(frozen=True)
class Column:
    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int
    nbytes: int
    scalar: bool


def layout(schema: Schema) -> tuple[Column, ...] | None:
    """Byte layout of a fixed-size schema's encoding, or ``None`` if some column varies."""
    if schema.fixed_size is None:
        return None
    cols, offset = [], 0
    for name, ct in schema.columns.items():
        dtype = np.dtype(ct.dtype).newbyteorder("<")
        shape = () if ct.kind == "scalar" else tuple(ct.dims)  # type: ignore[arg-type]
        size = ct.fixed_size
        cols.append(Column(name, dtype, shape, offset, size, ct.kind == "scalar"))
        offset += size
    return tuple(cols)


_TORCH_TO_NUMPY = {torch.int64: np.dtype(np.int64), torch.int32: np.dtype(np.int32)}
_NUMPY_TO_TORCH: dict[np.dtype, torch.dtype] = {}


def _out_dtype(column: Column, token_dtype: torch.dtype | None) -> np.dtype:
    if column.scalar:
        return np.dtype(_SCALAR_OUT[column.dtype.kind])
    if token_dtype is not None and column.dtype.str in TOKEN_DTYPES:
        return _TORCH_TO_NUMPY[token_dtype]
    return column.dtype.newbyteorder("=")


def _empty(shape: tuple[int, ...], dtype: np.dtype, pin_memory: bool) -> torch.Tensor:
    tensor_dtype = _NUMPY_TO_TORCH.get(dtype)
    if tensor_dtype is None:
        tensor_dtype = _NUMPY_TO_TORCH[dtype] = torch.from_numpy(np.empty(0, dtype)).dtype
    if torch.utils.data.get_worker_info() is not None:
        # In a DataLoader worker the batch crosses to the main process: build it in shared
        # memory so that crossing costs no copy (default_collate does the same).
        return torch.empty(shape, dtype=tensor_dtype).share_memory_()
    if pin_memory and _can_pin():
        return torch.empty(shape, dtype=tensor_dtype, pin_memory=True)
    return torch.empty(shape, dtype=tensor_dtype)


_PIN: list[bool] = []


def _can_pin() -> bool:
    """Whether pinned memory exists here (it needs an accelerator; asked once per process)."""
    if not _PIN:
        _PIN.append(bool(torch.cuda.is_available()))
        if not _PIN[0]:
            log.warning("pin_memory=True but no CUDA device: batches use ordinary memory")
    return _PIN[0]


class _Gatherer:
    """Per-dataset cache of ``ShardRows`` (rebuilt when the dataset reopens a shard)."""

    def __init__(self, dataset, row: int):
        self.dataset = dataset
        self.row = row
        self.rows: dict[int, tuple[object, ShardRows | None]] = {}
        self.uncompressed = dataset.index.compression is None

    def shard_rows(self, shard: int) -> ShardRows | None:
        reader = self.dataset.shard_reader(shard)
        cached = self.rows.get(shard)
        if cached is None or cached[0] is not reader:
            cached = (reader, ShardRows.of(reader, self.row))
            if len(self.rows) > 4 * self.dataset.max_open_shards:
                self.rows = {s: v for s, v in self.rows.items() if v[0] is not None and
                             self.dataset._readers.get(s) is v[0]}
            self.rows[shard] = cached
        return cached[1]


_GATHERERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _gatherer(dataset, row: int) -> _Gatherer:
    g = _GATHERERS.get(dataset)
    if g is None or g.row != row:
        g = _GATHERERS[dataset] = _Gatherer(dataset, row)
    return g


def _gather(dataset, ids: np.ndarray, row: int, write) -> None:
    """Call ``write(mask_or_None, shard_rows, byte_starts)`` per shard of ``ids``; samples of
    shards that cannot be gathered are written through ``write(mask, None, ids)``."""
    offsets = dataset.index.offsets
    n = dataset.index.num_samples
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= n):
        bad = int(ids.min()) if int(ids.min()) < 0 else int(ids.max())
        raise IndexError(f"sample index {bad} out of range for a dataset of {n} samples")
    shards, within = locate(offsets, ids)
    g = _gatherer(dataset, row)
    lo, hi = int(shards.min()), int(shards.max())
    groups = [lo] if lo == hi else np.unique(shards).tolist()
    for s in groups:
        mask = None if lo == hi else shards == s
        rows = g.shard_rows(s) if g.uncompressed else None
        if rows is None:
            write(mask, None, ids if mask is None else ids[mask])
        else:
            write(mask, rows, rows.starts(within if mask is None else within[mask]))


def read_batch(dataset, columns: tuple[Column, ...], ids: Sequence[int] | np.ndarray, *,
               token_dtype: torch.dtype | None = torch.int64,
               pin_memory: bool = False) -> dict[str, torch.Tensor]:
    """The collated batch of samples ``ids`` of ``dataset`` (a fixed-size schema's layout).

    ``token_dtype``: the dtype of uint16/uint32 array columns (int64, int32, or ``None`` to
    keep them). ``pin_memory``: allocate outputs in pinned memory (for CUDA copies; ignored
    inside DataLoader workers, whose batches go to shared memory instead).
    """
    token_dtype = token_dtype_of(token_dtype)
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    n = len(ids)
    row = sum(c.nbytes for c in columns)
    if n == 0:
        return {c.name: _empty((0, *c.shape), _out_dtype(c, token_dtype), False) for c in columns}
    single = columns[0] if len(columns) == 1 and not columns[0].scalar else None
    if single is not None:
        out_dtype = _out_dtype(single, token_dtype)
        out = _empty((n, *single.shape), out_dtype, pin_memory)
        flat = out.numpy().reshape(n, -1)
        items = flat.shape[1]

        def write(mask, rows, where):
            view = rows.view(single.dtype, items) if rows is not None else None
            if view is not None:
                src = view[where // single.dtype.itemsize]
            else:
                src = _row_bytes(dataset, rows, where, row).view(single.dtype)
            if mask is None:
                flat[...] = src
            else:
                flat[mask] = src

        _gather(dataset, ids, row, write)
        return {single.name: out}
    rows_out = np.empty((n, row), np.uint8)

    def write_rows(mask, rows, where):
        src = _row_bytes(dataset, rows, where, row)
        if mask is None:
            rows_out[...] = src
        else:
            rows_out[mask] = src

    _gather(dataset, ids, row, write_rows)
    batch = {}
    for c in columns:
        values = np.ascontiguousarray(rows_out[:, c.offset:c.offset + c.nbytes]).view(c.dtype)
        values = values.reshape(n) if c.scalar else values.reshape((n, *c.shape))
        out = _empty(values.shape, _out_dtype(c, token_dtype), pin_memory)
        out.numpy()[...] = values
        batch[c.name] = out
    return batch


def _row_bytes(dataset, rows: ShardRows | None, where: np.ndarray, row: int) -> np.ndarray:
    """``(len(where), row)`` bytes: gathered from the map, or copied sample by sample."""
    if rows is not None:
        return rows.byte_rows()[where]
    out = np.empty((len(where), row), np.uint8)
    dataset.read_rows(where.tolist(), memoryview(out).cast("B"))
    return out
