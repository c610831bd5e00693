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
one held map: a row's address is its block's first-row address plus ``(id - block's first id)
* row``, and a block gets an address only once it is checked (its header against its block
table and its xxh64, :class:`streamshard.gather.ShardRows`) with all its rows inside the map
(a ``CorruptionError`` otherwise). Ids outside ``[0, num_samples)`` fall on sentinel rows of
the shard table that are never held, so they reach the slow path, which refuses them; an id
inside its shard is inside its block's rows because the reader checked the index's per-shard
counts against the file. A map cannot be unmapped while it is held: this object keeps a numpy
view of each held map (``mmap.close`` then refuses, and ``ShardFileReader.close`` leaves the
map to the garbage collector), and drops a map only under its lock after dropping the
spanning views. Held maps follow the dataset's reader LRU: a map is held only while its reader
is the dataset's open reader of that shard (checked whenever ``Dataset.reader_generation``
moves), so a gather holds no more than ``max_open_shards`` maps plus one batch's worth.

First touch: each block a batch touches is checked once per gather (its xxh64 once per process,
:mod:`streamshard.blockcheck`), exactly as the per-sample path does. A dataset-wide array of
block addresses (0: not checked, or its shard not held) makes "every block of this batch is
checked and held" one vectorized test, and is the batch's address arithmetic too: a batch costs
about ten numpy calls.
"""

from __future__ import annotations

import os
import threading

import numpy as np

from streamshard.errors import CorruptionError
from streamshard.gather import ShardRows


# Columns of FlatGather.table: row ``s + 1`` is shard ``s``; rows 0 and ``S + 1`` stand for ids
# before the first and past the last shard (never held, so they reach _prepare, which refuses).
_OFF, _K, _BLOCK0 = range(3)
# A shard whose map is not held has K = _NOT_HELD (so every sample falls in "block" 0) and
# BLOCK0 = 0, whose address stays 0 ("not checked"): the one test "are all blocks of this batch
# checked" is then also "are all its shards held".
_NOT_HELD = 1 << 62


class OutOfRange(Exception):
    """A batch holds an id outside ``[0, num_samples)``."""


class FlatGather:
    """Per-dataset state of the one-index gather of ``row``-byte samples (uncompressed shards).

    :meth:`gather` returns ``None`` for a batch it cannot serve (a shard whose blocks are not
    uniform rows): the caller reads that batch sample by sample. Thread-safe (one lock)."""

    def __init__(self, dataset, row: int):
        index = dataset.index
        s = index.num_shards
        self.dataset = dataset
        self.row = row
        # Per shard: first sample id, rows per block, and its block 0's slot in ``address``.
        self.offsets = np.asarray(index.offsets, dtype=np.int64)
        self.table = np.zeros((s + 2, 3), dtype=np.int64)
        self.table[1:-1, _OFF] = self.offsets[:-1]
        self.table[:, _K] = _NOT_HELD
        self.uniform = np.ones(s, dtype=bool)  # False once ShardRows.of refused the shard
        # Per block slot: the address of the block's first row once the block is checked and
        # its map held, else 0. Slot 0 is never used by a shard (see _NOT_HELD).
        self.address = np.zeros(1024, dtype=np.int64)
        self._used = 1  # slots of ``address`` allocated
        self._slots: dict[int, int] = {}  # shard -> its first slot, kept when its map is dropped
        self._align = 0  # OR of every checked block's address and the row size
        self._maps: dict[int, tuple[object, ShardRows, np.ndarray]] = {}
        self._views: dict[tuple[np.dtype, int], tuple[int, np.ndarray]] = {}
        self._generation = dataset.reader_generation
        self._lock = threading.Lock()
        self._pid = os.getpid()

    def gather(self, ids: np.ndarray, dtype: np.dtype, items: int) -> np.ndarray | None:
        """``(len(ids), items)`` array of ``dtype``: row ``i`` is sample ``ids[i]``'s bytes
        (int64 ``ids``), or ``None`` when some shard is not uniform. :class:`OutOfRange` when
        an id is negative or past the last sample (the caller names it)."""
        if self._pid != os.getpid():  # a forked worker: the parent's lock may have been held
            self._lock, self._pid = threading.Lock(), os.getpid()
        with self._lock:
            return self._gather(ids, dtype, items)

    def _gather(self, ids: np.ndarray, dtype: np.dtype, items: int) -> np.ndarray | None:
        ds = self.dataset
        if ds.reader_generation != self._generation:
            self._follow_readers()
        rows_of = self.offsets.searchsorted(ids, side="right")  # shard + 1
        t = self.table[rows_of]
        blocks, rows = np.divmod(ids - t[:, _OFF], t[:, _K])
        slots = t[:, _BLOCK0] + blocks
        first = self.address[slots]
        if not first.all():  # a first touch, or a shard not held yet
            if not self._prepare(rows_of - 1, ids - t[:, _OFF]):
                return None
            t = self.table[rows_of]
            blocks, rows = np.divmod(ids - t[:, _OFF], t[:, _K])
            first = self.address[t[:, _BLOCK0] + blocks]
        if len(self.offsets) - 1 > ds.max_open_shards:  # else the reader LRU never evicts
            ds.touch_readers((rows_of - 1).tolist())
        # rows < the block's row count: every id lies inside its shard (the sentinel rows of
        # ``table`` send any other to _prepare, which raises; the per-shard counts of the index
        # were checked against the file by its reader), and every row of a checked block lies
        # inside its held map (_check).
        starts = first + rows * self.row
        size = dtype.itemsize
        if self._align % size:  # rows not aligned to the dtype: gather bytes, then view them
            lo, view = self._view(np.dtype(np.uint8), self.row)
            return view[starts - lo].view(dtype).reshape(len(ids), items)
        lo, view = self._view(dtype, items)
        starts -= lo
        starts //= size
        return view[starts]

    def _prepare(self, shards: np.ndarray, within: np.ndarray) -> bool:
        """Hold the maps of the batch's shards and check the blocks it touches for the first
        time; ``False`` when some shard is not uniform."""
        if shards.min() < 0 or shards.max() >= len(self.table) - 2:
            raise OutOfRange
        for s in np.unique(shards[self.table[shards + 1, _K] == _NOT_HELD]).tolist():
            if not self._hold(s):
                return False
        t = self.table[shards + 1]
        blocks = within // t[:, _K]
        todo = self.address[t[:, _BLOCK0] + blocks] == 0
        for s in np.unique(shards[todo]).tolist():
            self._check(s, np.unique(blocks[todo & (shards == s)]))
        return True

    def _check(self, s: int, blocks: np.ndarray) -> None:
        """First touch of blocks ``blocks`` of held shard ``s``: check them (checksum, header)
        and record their first row's address."""
        reader, rows, mapped = self._maps[s]
        rows.check(blocks)
        addr = mapped.ctypes.data
        regular = addr + rows.starts_unchecked_regular(0) + blocks * rows.stride
        first = np.where(blocks == rows.last, addr + rows.last_base, regular)
        count = np.minimum(rows.k, reader.num_samples - blocks * rows.k)
        if (first + count * self.row > addr + len(mapped)).any():
            b = int(blocks[np.argmax(first + count * self.row > addr + len(mapped))])
            raise CorruptionError(f"{reader.name} block {b}: its rows lie past the end of the file")
        self.address[self._slots[s] + blocks] = first
        self._align |= int(np.bitwise_or.reduce(first)) | self.row

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
        first = self._slots.get(s)
        if first is None:
            first = self._slots[s] = self._allocate(reader.num_blocks)
        self.address[first:first + reader.num_blocks] = 0  # a new map: first touch again
        self.table[s + 1, _K], self.table[s + 1, _BLOCK0] = rows.k, first
        self._maps[s] = (reader, rows, mapped)
        self._views.clear()
        return True

    def _allocate(self, slots: int) -> int:
        if self._used + slots > len(self.address):
            grown = np.zeros(max(2 * len(self.address), self._used + slots), dtype=np.int64)
            grown[:self._used] = self.address[:self._used]
            self.address = grown
        first = self._used
        self._used += slots
        return first

    def _follow_readers(self) -> None:
        """Drop the maps of shards whose reader the dataset evicted or closed."""
        self._generation = self.dataset.reader_generation
        gone = [s for s, (reader, _, _) in self._maps.items()
                if self.dataset.peek_reader(s) is not reader]
        if gone:
            self._views.clear()  # first: the spanning views may reach into the maps dropped
            for s in gone:
                first = self._slots[s]
                self.address[first:first + self._maps[s][0].num_blocks] = 0
                del self._maps[s]
                self.table[s + 1, _K], self.table[s + 1, _BLOCK0] = _NOT_HELD, 0

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
