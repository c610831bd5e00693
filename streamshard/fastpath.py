"""Columnar batches for fixed-size schemas: encoded sample bytes copied straight into tensors.

When every column has a fixed size (scalars, fixed-shape arrays), a sample's encoding is its
columns' little-endian bytes back to back (docs/FORMAT.md), so a device batch is one
``(batch, row_bytes)`` byte matrix: each sample costs one slice copy instead of a decode, a dict
and a per-sample tensor conversion. The result equals ``collate([ds[i] for i in ids])``
exactly (tested): arrays keep their dtype, scalars become int64 / float64 / bool tensors as
torch's ``default_collate`` makes them from Python numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.utils.data

from streamshard.schema import Schema

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


def _shared(tensor: torch.Tensor) -> torch.Tensor:
    # In a DataLoader worker the batch crosses to the main process: build it in shared memory
    # so that crossing costs no copy (default_collate does the same).
    if torch.utils.data.get_worker_info() is not None:
        tensor.share_memory_()
    return tensor


def read_batch(dataset, columns: tuple[Column, ...], ids: Sequence[int]) -> dict[str, torch.Tensor]:
    """The collated batch of samples ``ids`` of ``dataset`` (a fixed-size schema's layout)."""
    n = len(ids)
    row = sum(c.nbytes for c in columns)
    single = columns[0] if len(columns) == 1 and not columns[0].scalar else None
    if single is not None:
        # One array column: the rows are the output tensor's own bytes.
        out = _shared(torch.empty((n, *single.shape), dtype=torch.from_numpy(np.empty(0, single.dtype)).dtype))
        dataset.read_rows(ids, memoryview(out.numpy()).cast("B"))
        return {single.name: out}
    rows = np.empty((n, row), np.uint8)
    dataset.read_rows(ids, memoryview(rows).cast("B"))
    batch = {}
    for c in columns:
        values = np.ascontiguousarray(rows[:, c.offset:c.offset + c.nbytes]).view(c.dtype)
        if c.scalar:
            values = values.reshape(n).astype(_SCALAR_OUT[c.dtype.kind])
        else:
            values = values.reshape((n, *c.shape))
        batch[c.name] = torch.from_numpy(values)
    return batch
