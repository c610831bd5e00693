"""A whole batch of fixed-size rows of uncompressed shards gathered in one fancy index.

With many lanes a shuffled batch touches about one shard per sample, so gathering shard by shard
(sort, one index per shard, scatter back) costs a few numpy calls per sample. Here every
position of a batch is computed at once from per-shard layout arrays, and the rows are copied
by ONE fancy index over a single strided view that spans the memory maps of all the shards
this gather holds, in the batch's own order (no sort, no scatter; the int64 token conversion
is the copy into the output).

Safety of the spanning view. The view is made with ``as_strided`` from the lowest map and
reaches the end of the highest one, so it also spans address ranges that belong to other
mappings or to none. It is only ever indexed at rows computed here, each of which lies inside
one held map: a shard's position arithmetic comes from its block table, checked against the
blocks' own offsets on first touch (:class:`streamshard.gather.ShardRows`), and every batch
checks ``start + row <= map size`` of its shard before indexing (a ``CorruptionError``
otherwise). A map cannot be unmapped while it is held: this object keeps a numpy view of each
held map (``mmap.close`` then refuses, and ``ShardFileReader.close`` leaves the map to the
garbage collector), and drops a map only under its lock after dropping the spanning views.
Held maps follow the dataset's reader LRU: a map is held only while its reader is the
dataset's open reader of that shard (checked whenever ``Dataset.reader_generation`` moves),
so a gather holds no more than ``max_open_shards`` maps plus one batch's worth.

First touch: each block a batch touches is checked once per gather (its xxh64 once per process,
:mod:`streamshard.blockcheck`), exactly as the per-sample path does; a dataset-wide bitmap
makes "all blocks of this batch checked already" one vectorized test.
"""

from __future__ import annotations

import os
import threading

import numpy as np

from streamshard.errors import CorruptionError
from streamshard.gather import ShardRows


# Columns of FlatGather.table, one row per shard.
_OFF, _K, _BLOCK0, _BASE, _GAP, _LAST, _LAST_BASE, _END = range(8)
# A shard whose map is not held has K = _NOT_HELD (so every sample falls in "block" 0) and
# BLOCK0 = 0, the permanently clear first bit of ``checked``: the one test "are all blocks of
# this batch checked" is then also "are all its shards held".
_NOT_HELD = 1 << 62


class FlatGather:
    """Per-dataset state of the one-index gather of ``row``-byte samples (uncompressed shards).

    :meth:`gather` returns ``None`` for a batch it cannot serve (a shard whose blocks are not
    uniform rows): the caller reads that batch sample by sample. Thread-safe (one lock)."""

    def __init__(self, dataset, row: int):
        index = dataset.index
        s = index.num_shards
        self.dataset = dataset
        self.row = row
        # Per shard: first sample id, rows per block, first bit in ``checked``, address of
        # block 0's first row, bytes between the last row of a block and the first of the next
        # (the next block's header), the short last block (-1: none), the address of its first
        # row, and the last address a row may start at (map end - row).
        self.table = np.zeros((s, 8), dtype=np.int64)
        self.table[:, _OFF] = np.asarray(index.offsets, dtype=np.int64)[:-1]
        self.table[:, _K] = _NOT_HELD
        self.table[:, _LAST] = -1
        self.offsets = np.asarray(index.offsets, dtype=np.int64)
        self.uniform = np.ones(s, dtype=bool)  # False once ShardRows.of refused the shard
        self.checked = np.zeros(1024, dtype=bool)  # bit 0: never set (see _NOT_HELD)
        self._used = 1  # bits of ``checked`` allocated
        self._bits: dict[int, int] = {}  # shard -> its first bit, kept when its map is dropped
        self._align = 0  # OR of every held shard's base, gap, row and last base
        self._maps: dict[int, tuple[object, ShardRows, np.ndarray]] = {}
        self._views: dict[tuple[np.dtype, int], tuple[int, np.ndarray]] = {}
        self._generation = dataset.reader_generation
        self._lock = threading.Lock()
        self._pid = os.getpid()

    def gather(self, ids: np.ndarray, dtype: np.dtype, items: int) -> np.ndarray | None:
        """``(len(ids), items)`` array of ``dtype``: row ``i`` is sample ``ids[i]``'s bytes
        (int64 ``ids``, in range), or ``None`` when some shard is not uniform."""
        if self._pid != os.getpid():  # a forked worker: the parent's lock may have been held
            self._lock, self._pid = threading.Lock(), os.getpid()
        with self._lock:
            return self._gather(ids, dtype, items)

    def _gather(self, ids: np.ndarray, dtype: np.dtype, items: int) -> np.ndarray | None:
        ds = self.dataset
        if ds.reader_generation != self._generation:
            self._follow_readers()
        shards = np.searchsorted(self.offsets, ids, side="right") - 1
        t = self.table[shards]
        within = ids - t[:, _OFF]
        blocks = within // t[:, _K]
        bits = t[:, _BLOCK0] + blocks
        if not self.checked[bits].all():  # a first touch, or a shard not held yet
            if not self._prepare(shards, within):
                return None
            t = self.table[shards]
            blocks = within // t[:, _K]
        ds.touch_readers(shards.tolist())
        starts = t[:, _BASE] + within * self.row + blocks * t[:, _GAP]
        short = blocks == t[:, _LAST]
        if short.any():
            starts[short] = (t[short, _LAST_BASE]
                             + (within[short] - blocks[short] * t[short, _K]) * self.row)
        if (starts > t[:, _END]).any():  # cannot happen for a checked layout
            bad = int(np.argmax(starts > t[:, _END]))
            raise CorruptionError(f"sample {int(ids[bad])}: its row lies past the end of shard "
                                  f"{int(shards[bad])}'s file")
        size = dtype.itemsize
        if self._align % size:  # rows not aligned to the dtype: gather bytes, then view them
            lo, view = self._view(np.dtype(np.uint8), self.row)
            return view[starts - lo].view(dtype).reshape(len(ids), items)
        lo, view = self._view(dtype, items)
        return view[(starts - lo) // size]

    def _prepare(self, shards: np.ndarray, within: np.ndarray) -> bool:
        """Hold the maps of the batch's shards and check the blocks it touches for the first
        time; ``False`` when some shard is not uniform."""
        for s in np.unique(shards[self.table[shards, _K] == _NOT_HELD]).tolist():
            if not self._hold(s):
                return False
        t = self.table[shards]
        blocks = within // t[:, _K]
        bits = t[:, _BLOCK0] + blocks
        todo = ~self.checked[bits]
        for s in np.unique(shards[todo]).tolist():
            self._maps[s][1].check(blocks[todo & (shards == s)])
        self.checked[bits[todo]] = True
        return True

    # -- held maps ---------------------------------------------------------------------------
    def _hold(self, s: int) -> bool:
        """Open shard ``s`` through the dataset, check its layout and hold its map; ``False``
        when its blocks are not uniform rows of ``row`` bytes."""
        if not self.uniform[s]:
            return False
        reader = self.dataset.shard_reader(s)
        rows = ShardRows.of(reader, self.row)
        if rows is None:
            self.uniform[s] = False
            return False
        mapped = np.frombuffer(reader.mapped, dtype=np.uint8)
        addr = mapped.ctypes.data
        first = self._bits.get(s)
        if first is None:
            first = self._bits[s] = self._allocate(reader.num_blocks)
        self.checked[first:first + reader.num_blocks] = False  # a new map: first touch again
        base = addr + rows.starts_unchecked(0)
        gap = rows.stride - rows.k * self.row
        short = rows.last_base != rows.starts_unchecked_regular(rows.last)
        row = self.table[s]
        row[_K], row[_BLOCK0], row[_BASE], row[_GAP] = rows.k, first, base, gap
        row[_LAST] = rows.last if short else -1
        row[_LAST_BASE] = addr + rows.last_base
        row[_END] = addr + len(mapped) - self.row
        self._align |= base | gap | self.row | (addr + rows.last_base)
        self._maps[s] = (reader, rows, mapped)
        self._views.clear()
        return True

    def _allocate(self, bits: int) -> int:
        if self._used + bits > len(self.checked):
            grown = np.zeros(max(2 * len(self.checked), self._used + bits), dtype=bool)
            grown[:self._used] = self.checked[:self._used]
            self.checked = grown
        first = self._used
        self._used += bits
        return first

    def _follow_readers(self) -> None:
        """Drop the maps of shards whose reader the dataset evicted or closed."""
        self._generation = self.dataset.reader_generation
        gone = [s for s, (reader, _, _) in self._maps.items()
                if self.dataset.peek_reader(s) is not reader]
        if gone:
            self._views.clear()  # first: the spanning views may reach into the maps dropped
            for s in gone:
                del self._maps[s]
                self.table[s, _K], self.table[s, _BLOCK0], self.table[s, _LAST] = _NOT_HELD, 0, -1

    def _view(self, dtype: np.dtype, items: int) -> tuple[int, np.ndarray]:
        """``(lo, view)``: ``view[p]`` is the ``items`` values of ``dtype`` at address
        ``lo + p * itemsize``, for every address from the lowest held map to the highest end."""
        found = self._views.get((dtype, items))
        if found is None:
            lowest = min(self._maps.values(), key=lambda m: m[2].ctypes.data)[2]
            lo = lowest.ctypes.data
            hi = max(m[2].ctypes.data + len(m[2]) for m in self._maps.values())
            size = dtype.itemsize
            base = lowest[: len(lowest) // size * size].view(dtype)
            view = np.lib.stride_tricks.as_strided(
                base, ((hi - lo) // size - items + 1, items), (size, size), writeable=False)
            found = self._views[dtype, items] = (lo, view)
        return found
