"""Columnar batches for fixed-size schemas: rows gathered straight into the output tensors.

When every column has a fixed size (scalars, fixed-shape arrays), a sample's encoding is its
columns' little-endian bytes back to back (docs/FORMAT.md). A batch's rows come from the
dataset's row gather (``Dataset.gather_rows``: one fancy index over the held shard maps or the
decompressed blocks, block by block otherwise) and are copied into the output tensor, converted
there when the schema is one array column. The result equals
``streamshard.collate.collate([ds[i] for i in ids], token_dtype=...)`` exactly (tested): arrays
keep their dtype except uint16/uint32 arrays, which become ``token_dtype`` (int64 by default,
what ``nn.Embedding`` and ``cross_entropy`` take; ``None`` keeps them), and scalars become int64 /
float64 / bool tensors as torch's ``default_collate`` makes them from Python numbers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.utils.data

from streamshard.collate import TOKEN_DTYPES, shared_empty, token_dtype_of
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


def _empty(shape: tuple[int, ...], dtype: np.dtype, pin_memory: bool
           ) -> tuple[torch.Tensor, np.ndarray]:
    """An uninitialized output tensor and a numpy view of it."""
    if torch.utils.data.get_worker_info() is not None:
        # In a DataLoader worker the batch crosses to the main process: build it in shared
        # memory so that crossing costs no copy (default_collate does the same).
        out = shared_empty(shape, _torch_dtype(dtype))
        return out, out.numpy()
    if pin_memory and _can_pin():
        out = torch.empty(shape, dtype=_torch_dtype(dtype), pin_memory=True)
        return out, out.numpy()
    array = np.empty(shape, dtype)  # numpy-owned memory: cheaper to make than torch.empty
    return torch.from_numpy(array), array


def _torch_dtype(dtype: np.dtype) -> torch.dtype:
    tensor_dtype = _NUMPY_TO_TORCH.get(dtype)
    if tensor_dtype is None:
        tensor_dtype = _NUMPY_TO_TORCH[dtype] = torch.from_numpy(np.empty(0, dtype)).dtype
    return tensor_dtype


_PIN: list[bool] = []


def _can_pin() -> bool:
    """Whether pinned memory exists here (it needs an accelerator; asked once per process)."""
    if not _PIN:
        _PIN.append(bool(torch.cuda.is_available()))
        if not _PIN[0]:
            log.warning("pin_memory=True but no CUDA device: batches use ordinary memory")
    return _PIN[0]


@dataclass(frozen=True)
class _Single:
    """How a layout of one array column is read: its name and shape, the output dtype, the row
    bytes, the stored dtype and the values per row."""

    name: str
    shape: tuple[int, ...]
    out_dtype: np.dtype
    row: int
    dtype: np.dtype
    items: int


# id(columns), token_dtype -> (columns, plan): decided once per layout (the layout is kept
# alive in the entry, so its id cannot be reused while the entry exists).
_SINGLE_PLANS: dict[tuple[int, object], tuple[tuple[Column, ...], _Single]] = {}


def _single(columns: tuple[Column, ...], token_dtype: torch.dtype | None) -> _Single | None:
    """The plan of a one-array-column layout (``token_dtype`` validated), ``None`` for others."""
    found = _SINGLE_PLANS.get((id(columns), token_dtype))
    if found is not None and found[0] is columns:
        return found[1]
    token_dtype = token_dtype_of(token_dtype)
    if len(columns) != 1 or columns[0].scalar:
        return None
    c = columns[0]
    plan = _Single(c.name, c.shape, _out_dtype(c, token_dtype), c.nbytes, c.dtype,
                   int(np.prod(c.shape, dtype=np.int64)))
    if len(_SINGLE_PLANS) < 64:
        _SINGLE_PLANS[id(columns), token_dtype] = (columns, plan)
    return plan


def _place(array: np.ndarray, rows: np.ndarray, order: np.ndarray | None) -> None:
    """Copy gathered ``rows`` into ``array`` (``order``: row ``i`` belongs at ``order[i]``)."""
    flat = array.reshape(len(array), -1)
    if order is None:
        flat[...] = rows
    else:
        flat[order] = rows


def read_batch(dataset, columns: tuple[Column, ...], ids: Sequence[int] | np.ndarray, *,
               token_dtype: torch.dtype | None = torch.int64,
               pin_memory: bool = False) -> dict[str, torch.Tensor]:
    """The collated batch of samples ``ids`` of ``dataset`` (a fixed-size schema's layout).

    ``token_dtype``: the dtype of uint16/uint32 array columns (int64, int32, or ``None`` to
    keep them). ``pin_memory``: allocate outputs in pinned memory (for CUDA copies; ignored
    inside DataLoader workers, whose batches go to shared memory instead).
    """
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    n = len(ids)
    single = _single(columns, token_dtype)
    if single is not None and n:
        out, array = _empty((n, *single.shape), single.out_dtype, pin_memory)
        _place(array, *dataset.gather_rows(ids, single.row, single.dtype, single.items))
        return {single.name: out}
    row = sum(c.nbytes for c in columns)
    if n == 0:
        return {c.name: _empty((0, *c.shape), _out_dtype(c, token_dtype), False)[0]
                for c in columns}
    rows, order = dataset.gather_rows(ids, row, np.dtype(np.uint8), row)
    if order is not None:
        rows = rows[np.argsort(order)]
    batch = {}
    for c in columns:
        values = np.ascontiguousarray(rows[:, c.offset:c.offset + c.nbytes]).view(c.dtype)
        values = values.reshape(n) if c.scalar else values.reshape((n, *c.shape))
        out, array = _empty(values.shape, _out_dtype(c, token_dtype), pin_memory)
        array[...] = values
        batch[c.name] = out
    return batch


def read_batches(dataset, columns: tuple[Column, ...], id_lists: Sequence[np.ndarray], *,
                 token_dtype: torch.dtype | None = torch.int64) -> list[dict[str, torch.Tensor]]:
    """``[read_batch(dataset, columns, ids, token_dtype=...) for ids in id_lists]`` (outside
    workers, not pinned), with one gather for all of them when the layout is one array column:
    a batch then costs its own output array and the copy into it, not the ten-odd numpy calls
    of a gather. Each batch owns its memory (no views of a shared buffer)."""
    single = _single(columns, token_dtype)
    sizes = [len(ids) for ids in id_lists]
    if (single is None or len(id_lists) < 2 or 0 in sizes
            or torch.utils.data.get_worker_info() is not None):
        return [read_batch(dataset, columns, ids, token_dtype=token_dtype) for ids in id_lists]
    ids = np.concatenate(id_lists).astype(np.int64, copy=False)
    rows, order = dataset.gather_rows(ids, single.row, single.dtype, single.items)
    if order is not None:  # read in offset order: back to the batches' order
        unsorted = np.empty_like(rows)
        unsorted[order] = rows
        rows = unsorted
    out, a = [], 0
    for n in sizes:
        array = np.empty((n, *single.shape), single.out_dtype)
        _place(array, rows[a:a + n], None)
        out.append({single.name: torch.from_numpy(array)})
        a += n
    return out


def read_samples(dataset, ids: Sequence[int] | np.ndarray) -> list[dict]:
    """``[dataset[i] for i in ids]`` (decoded dicts, in order), read shard by shard in offset
    order: one vectorized locate, one reader lookup per shard, and the samples of a block are
    decoded one after the other, so a block is fetched once per batch (its reader keeps the
    last block) instead of one block-cache lookup per sample. The variable-size path."""
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    out: list = [None] * len(ids)
    if not len(ids):
        return out
    if int(ids.min()) < 0:  # sample ids, not list indexes: no counting from the end here
        n = dataset.index.num_samples
        raise IndexError(f"sample index {int(ids.min())} out of range for a dataset of {n} samples")
    order = np.argsort(ids, kind="stable")
    shards, within = dataset.index.locate(ids[order])  # IndexError names an id past the end
    current, read = -1, None
    for pos, s, k in zip(order.tolist(), shards.tolist(), within.tolist()):
        if s != current:
            current, read = s, dataset.shard_reader(s).read
        out[pos] = read(k)
    return out
