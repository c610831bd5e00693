"""The index's per-shard facts as columns: ``ShardInfo`` records built on demand.

A 10^9-sample index lists ~61,000 shards. Building one record per shard at open cost ~25% of
opening it (bench_startup.py), and most callers only need one column (the sampler needs the
sample counts, the block-aware shuffle the raw byte total). ``ShardTable`` keeps the columns
parsed from ``index.json`` once (int64 numpy arrays for the counts and sizes, the parsed lists
for names and hashes) and builds a ``ShardInfo`` only when one is indexed or iterated.
"""

from __future__ import annotations

import operator
from typing import Iterator, NamedTuple, Sequence, overload

import numpy as np


class ShardInfo(NamedTuple):
    """One shard as the index describes it (immutable, hashable, picklable). ``file`` is
    relative to the dataset root (posix). A NamedTuple rather than a frozen dataclass: building
    100,000 of them takes 30 ms instead of 230 ms."""

    index: int
    file: str
    samples: int
    bytes: int
    raw_bytes: int
    xxh64: str
    # XXH64 of the shard's block table (16 hex digits), the identity a reader checks at open;
    # None for datasets written before it was recorded (docs/FORMAT.md "Migration").
    table_xxh64: str | None = None


def _column(values: Sequence[int] | np.ndarray) -> np.ndarray:
    arr = np.array(values, dtype=np.int64)  # a private copy: callers cannot alter the table
    arr.flags.writeable = False
    return arr


class ShardTable(Sequence[ShardInfo]):
    """Immutable sequence of ``ShardInfo`` over per-shard columns (picklable, thread-safe).

    Columns: ``samples``, ``bytes``, ``raw_bytes`` (read-only int64 arrays, one entry per
    shard), ``files`` and ``xxh64`` (tuples of str), ``table_xxh64`` (tuple of str or None, or
    None when no shard has one). ``table[i]`` (negative allowed) and iteration build
    records on demand; a slice gives a tuple of records. Equal to another ``ShardTable``, tuple
    or list holding the same records.
    """

    __slots__ = ("files", "samples", "bytes", "raw_bytes", "xxh64", "table_xxh64", "_ints")

    def __init__(self, files: Sequence[str], samples: Sequence[int] | np.ndarray,
                 nbytes: Sequence[int] | np.ndarray, raw_bytes: Sequence[int] | np.ndarray,
                 xxh64: Sequence[str], table_xxh64: Sequence[str | None] | None = None):
        self.files = tuple(files)
        self.xxh64 = tuple(xxh64)
        idents = None if table_xxh64 is None else tuple(table_xxh64)
        self.table_xxh64 = idents if idents is not None and any(idents) else None
        self.samples = _column(samples)
        self.bytes = _column(nbytes)
        self.raw_bytes = _column(raw_bytes)
        n = len(self.files)
        if not (len(self.samples) == len(self.bytes) == len(self.raw_bytes) == len(self.xxh64)
                == n and (self.table_xxh64 is None or len(self.table_xxh64) == n)):
            raise ValueError("shard columns differ in length")
        self._ints: tuple[list, list, list] | None = None  # Python-int copies, made on first use

    @classmethod
    def from_records(cls, shards: Sequence[ShardInfo]) -> "ShardTable":
        """A table of ``shards`` (their ``index`` fields are ignored: renumbered 0..S-1)."""
        idents = [s.table_xxh64 for s in shards]
        return cls([s.file for s in shards], [s.samples for s in shards],
                   [s.bytes for s in shards], [s.raw_bytes for s in shards],
                   [s.xxh64 for s in shards], idents if any(idents) else None)

    def _python_ints(self) -> tuple[list, list, list]:
        # Records hold Python ints (JSON-serializable, hashable like before); .tolist() on
        # first use is ~1 ms per 61,000 shards and only happens when a record is asked for.
        ints = self._ints
        if ints is None:
            ints = self._ints = (self.samples.tolist(), self.bytes.tolist(),
                                 self.raw_bytes.tolist())
        return ints

    def __len__(self) -> int:
        return len(self.files)

    @overload
    def __getitem__(self, i: int) -> ShardInfo: ...
    @overload
    def __getitem__(self, i: slice) -> tuple[ShardInfo, ...]: ...

    def __getitem__(self, i):
        if isinstance(i, slice):
            return tuple(self[j] for j in range(*i.indices(len(self))))
        i = operator.index(i)  # ints and numpy ints, like a tuple; TypeError for a float
        n = len(self.files)
        j = i + n if -n <= i < 0 else i  # IndexError below names the index asked for
        if not 0 <= j < n:
            raise IndexError(f"shard {i} out of range ({n} shards)")
        samples, nbytes, raw = self._python_ints()
        ident = None if self.table_xxh64 is None else self.table_xxh64[j]
        return ShardInfo(j, self.files[j], samples[j], nbytes[j], raw[j], self.xxh64[j], ident)

    def __iter__(self) -> Iterator[ShardInfo]:
        samples, nbytes, raw = self._python_ints()
        idents = self.table_xxh64 or (None,) * len(self.files)
        return map(ShardInfo, range(len(self.files)), self.files, samples, nbytes, raw,
                   self.xxh64, idents)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, ShardTable):
            return (self.files == other.files and self.xxh64 == other.xxh64
                    and self.table_xxh64 == other.table_xxh64
                    and all(np.array_equal(getattr(self, k), getattr(other, k))
                            for k in ("samples", "bytes", "raw_bytes")))
        if isinstance(other, (tuple, list)):
            return len(other) == len(self) and all(a == b for a, b in zip(self, other))
        return NotImplemented

    def __hash__(self) -> int:
        return hash((self.files, self.xxh64))

    def __repr__(self) -> str:
        return f"ShardTable({len(self)} shards)"

    def __getstate__(self) -> tuple:
        return (self.files, self.samples, self.bytes, self.raw_bytes, self.xxh64,
                self.table_xxh64)

    def __setstate__(self, state: tuple) -> None:
        files, samples, nbytes, raw, xxh, idents = state
        self.files, self.xxh64, self.table_xxh64 = files, xxh, idents
        for name, arr in (("samples", samples), ("bytes", nbytes), ("raw_bytes", raw)):
            setattr(self, name, _column(arr))
        self._ints = None
