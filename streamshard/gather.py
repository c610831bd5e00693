"""Where each sample of an uncompressed fixed-size shard lies, as arithmetic on int arrays.

The writer packs fixed-size rows ``k`` to a block (``docs/FORMAT.md``): a raw block is
``u64 n | u64 offsets[n+1] | n rows``, so when every block but the shard's last holds ``k`` rows,
sample ``o`` of the shard starts at ``32 + b * stride + 16 + 8 n_b + (o % k) * row`` with
``b = o // k``, ``stride = 16 + k * (8 + row)`` and ``n_b`` the rows of block ``b`` (``k``, fewer
in the shard's last block). ``ShardRows`` checks that shape once from the
block table, and each block's own offsets (and, through ``ShardFileReader.sample_offsets``, its
checksum) the first time a batch touches it; after that a batch's byte positions are three
vectorized operations, and its rows one fancy-index gather on a strided view of the mmap.
"""

from __future__ import annotations

import numpy as np

from streamshard.errors import CorruptionError
from streamshard.shardfile import HEADER, ShardFileReader


class ShardRows:
    """Byte positions of the rows of one mmapped shard, or ``None`` from :meth:`of` when its
    blocks are not uniform (then callers read sample by sample). Not thread-safe for the first
    touch of a block (two threads may both check it: harmless)."""

    def __init__(self, reader: ShardFileReader, row: int, k: int):
        self.reader = reader
        self.row = row
        self.k = k
        self.stride = 16 + k * (8 + row)
        self.last = reader.num_blocks - 1
        # Payload start of the last block, whose header has fewer offsets when it is short.
        self.last_base = HEADER.size + self.last * self.stride + 16 + 8 * (
            reader.num_samples - self.last * k)
        self._checked = np.zeros(reader.num_blocks, dtype=bool)
        self.unchecked = reader.num_blocks  # blocks not yet touched (checked on first touch)
        self._bytes = np.frombuffer(reader.mapped, dtype=np.uint8)
        self._views: dict[np.dtype, np.ndarray] = {}
        self._header: np.ndarray | None = None

    @classmethod
    def of(cls, reader: ShardFileReader, row: int) -> "ShardRows | None":
        """``ShardRows`` for an uncompressed ``reader`` of ``row``-byte samples, or ``None``."""
        if reader.compressed or reader.mapped is None or reader.num_blocks == 0:
            return None
        table = reader.table
        first = table["first"].astype(np.int64)
        n = reader.num_samples
        k = int(first[1]) if len(first) > 1 else n
        counts = np.diff(np.append(first, n))
        if not np.array_equal(first, np.arange(len(first), dtype=np.int64) * k):
            return None
        raw = table["raw"].astype(np.int64)
        if not np.array_equal(raw, 16 + counts * (8 + row)):
            return None  # rows of another size: the per-sample path reports it by sample
        stride = 16 + k * (8 + row)
        if not np.array_equal(table["offset"].astype(np.int64),
                              HEADER.size + stride * np.arange(len(first), dtype=np.int64)):
            return None  # blocks not back to back: the per-sample path reads the table's offsets
        return cls(reader, row, k)

    def starts(self, offsets: np.ndarray) -> np.ndarray:
        """Absolute byte offsets of shard samples ``offsets`` (int64 array, in range)."""
        blocks = offsets // self.k
        if self.unchecked:
            self.check(blocks)
        base = HEADER.size + 16 + 8 * self.k + blocks * self.stride
        base[blocks == self.last] = self.last_base
        return base + (offsets - blocks * self.k) * self.row

    def starts_unchecked(self, b: int) -> int:
        """Payload start of block ``b``."""
        if b == self.last:
            return self.last_base
        return self.starts_unchecked_regular(b)

    def starts_unchecked_regular(self, b: int) -> int:
        """Payload start of block ``b`` if it held ``k`` rows."""
        return HEADER.size + b * self.stride + 16 + 8 * self.k

    def view(self, dtype: np.dtype, items: int) -> np.ndarray | None:
        """A ``(positions, items)`` strided view of the map as ``dtype``: row ``p`` is the
        ``items`` values starting at byte ``p * itemsize``. ``None`` unless every row starts
        at a multiple of the itemsize (then gather bytes and view them)."""
        size = dtype.itemsize
        if (HEADER.size + 16) % size or self.row % size:  # 8 * n and strides then are too
            return None
        v = self._views.get(dtype)
        if v is None:
            flat = self._bytes[: len(self._bytes) // size * size].view(dtype)
            v = np.lib.stride_tricks.as_strided(flat, (len(flat) - items + 1, items),
                                                (size, size), writeable=False)
            self._views[dtype] = v
        return v

    def byte_rows(self) -> np.ndarray:
        """``view`` for single bytes: row ``p`` is ``row`` bytes from byte ``p``."""
        return self.view(np.dtype(np.uint8), self.row)  # type: ignore[return-value]

    def check(self, blocks: np.ndarray) -> None:
        """Check the blocks of ``blocks`` not checked yet (what a first touch does): each
        block's xxh64 once per process (``ShardFileReader.check_blocks``), then its header
        (``u64 n | u64 offsets[n+1]``) against ``n`` back-to-back rows, all blocks at once."""
        todo = np.unique(blocks[~self._checked[blocks]])
        if not todo.size:
            return
        self.reader.check_blocks(todo)
        full = todo[todo * self.k + self.k <= self.reader.num_samples]
        if full.size:
            expected = self._expected_header()
            heads = self._headers()[full]
            if not (heads == expected).all():
                bad = int(full[np.flatnonzero((heads != expected).any(axis=1))[0]])
                raise CorruptionError(f"{self.reader.name} block {bad}: sample offsets are not "
                                      f"{self.row}-byte rows back to back")
        if full.size < todo.size:  # the short last block: through the reader's own parse
            b = self.last
            offs = np.asarray(self.reader.sample_offsets(b), dtype=np.int64)
            expected = self.last_base + self.row * np.arange(self.reader.num_samples - b * self.k + 1,
                                                             dtype=np.int64)
            if not np.array_equal(offs, expected):
                raise CorruptionError(f"{self.reader.name} block {b}: sample offsets are not "
                                      f"{self.row}-byte rows back to back")
        self._checked[todo] = True
        self.unchecked -= int(todo.size)

    def _headers(self) -> np.ndarray:
        """``(full blocks, k + 2)`` view of the full blocks' headers as little-endian u64."""
        full = self.reader.num_samples // self.k
        return np.ndarray((full, self.k + 2), dtype="<u8", buffer=self.reader.mapped,
                          offset=HEADER.size, strides=(self.stride, 8))

    def _expected_header(self) -> np.ndarray:
        """``n = k`` then the payload-relative offsets ``0, row, ..., k * row``."""
        if self._header is None:
            self._header = np.concatenate([[self.k], self.row * np.arange(self.k + 1)]
                                          ).astype(np.uint64)
        return self._header
