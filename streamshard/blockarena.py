"""A batch of fixed-size rows out of compressed shards in one fancy index: the block arena.

A shuffled batch over zstd shards touches about one block per sample (the block-aware shuffle
spreads a lane's step over the ``g`` blocks of its unit), so a gather that visits blocks one by
one in Python pays a few microseconds per sample on top of the decompressions. The arena keeps
a dataset's decompressed blocks in slots of one preallocated buffer instead of in the block LRU;
then a batch is a handful of numpy operations: locate, find each sample's block, look up its
slot (an int array per shard), load the missing blocks, and copy every row with one fancy index
over a sliding-window view of the buffer (``windows[start]`` is the ``row`` bytes at ``start``).

- Each load is ``ShardFileReader.fetch_block`` (xxh64 of the stored bytes, frame, size and
  header checks, counted in ``blocks_read``) plus ``check_rows`` (every sample of the block is
  ``row`` bytes): the same checks as any other read, made on every decompression.
- Slots are reused least recently used first, at batch granularity (a slot a batch uses is never
  reused by that batch); the arena holds ``block_cache`` bytes (what the block-aware shuffle
  reserves), so the shuffle's one-decompression-per-block holds as with the LRU.
- It applies when the dataset has a block cache, the shard is compressed and each block the
  batch needs fits a slot (``max(index.block_size, 24 + row)`` bytes); otherwise the caller
  takes the per-block path (:mod:`streamshard.blockread`).
- Counters as a sample-by-sample read in offset order: one read per missing block, a hit for
  every other sample.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


class BlockArena:
    """Decompressed blocks of one dataset's compressed shards, for gathers of ``row``-byte
    samples, in ``capacity`` bytes. Thread-safe (one gather at a time)."""

    def __init__(self, capacity: int, row: int, block_size: int):
        self.capacity, self.row = int(capacity), int(row)
        self.slot = max(int(block_size), 24 + self.row)  # a block of one sample: 24 + row
        self.slots = self.capacity // self.slot
        self._buf = np.empty(self.slots * self.slot, np.uint8)
        self._view = memoryview(self._buf)
        self._windows = sliding_window_view(self._buf, self.row)
        self._stamp = np.zeros(self.slots, np.int64)  # last batch that used each slot
        self._owner: list[tuple[int, int] | None] = [None] * self.slots
        self._tick = 0
        self._shards: dict[int, tuple[np.ndarray, ...]] = {}
        self._lock = threading.Lock()

    def _shard(self, s: int, reader: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """``(block starts, slot per block (-1: not held), base per block)`` of shard ``s``,
        where a held block ``b``'s sample ``k`` starts at ``base[b] + k * row`` in the buffer;
        ``None`` when some block of the shard does not fit a slot."""
        state = self._shards.get(s)
        if state is None:
            if reader.num_blocks and int(reader.table["raw"].max()) > self.slot:
                return None
            nb = reader.num_blocks
            state = self._shards[s] = (reader.block_starts, np.full(nb, -1, np.int64),
                                       np.zeros(nb, np.int64))
        return state

    def gather(self, dataset: Any, ids: np.ndarray) -> np.ndarray | None:
        """``(len(ids), row)`` uint8 rows of samples ``ids`` (int64, in range), in ``ids``
        order, or ``None`` when the arena cannot serve this batch (then nothing was read)."""
        with self._lock:
            return self._gather(dataset, ids)

    def _gather(self, dataset: Any, ids: np.ndarray) -> np.ndarray | None:
        shards, within = dataset.index.locate(ids)
        self._tick += 1
        tick = self._tick
        present = np.unique(shards).tolist()
        plan = []
        for s in present:
            reader = dataset.shard_reader(s)
            state = self._shard(s, reader) if reader.compressed else None
            if state is None:
                return None
            sel = np.flatnonzero(shards == s) if len(present) > 1 else None
            ks = within if sel is None else within[sel]
            blocks = np.searchsorted(state[0], ks, side="right") - 1
            held = state[1][blocks]
            missing = np.unique(blocks[held < 0]).tolist() if int(held.min()) < 0 else []
            plan.append((s, reader, sel, ks, blocks, held, missing))
        if len(ids) > self.slots and sum(len(np.unique(p[4])) for p in plan) > self.slots:
            return None  # more distinct blocks than slots
        # Mark what the batch already holds, then load the rest into the least recently used
        # slots: those no part of this batch uses (need <= slots leaves enough of them).
        loads = []
        for s, reader, sel, ks, blocks, held, missing in plan:
            self._stamp[held[held >= 0] if missing else held] = tick
            loads += [(s, reader, b) for b in missing]
        if loads:
            m = len(loads)
            free = (np.argpartition(self._stamp, m - 1)[:m] if m < self.slots
                    else np.arange(self.slots))
            for (s, reader, b), i in zip(loads, free.tolist()):
                self._load(s, reader, b, i, tick)
        row = self.row
        if len(plan) == 1:
            _, _, _, ks, blocks, _, _ = plan[0]
            out_starts = self._shards[plan[0][0]][2][blocks] + ks * row
        else:
            out_starts = np.empty(len(ids), np.int64)
            for s, _, sel, ks, blocks, _, _ in plan:
                out_starts[sel] = self._shards[s][2][blocks] + ks * row
        plan[0][1].note_hits(len(ids) - len(loads))
        return self._windows[out_starts]

    def _load(self, s: int, reader: Any, b: int, i: int, tick: int) -> None:
        """Decompress block ``b`` of shard ``s`` into slot ``i`` (checked, rows included)."""
        old = self._owner[i]
        if old is not None:  # the slot is forgotten before it is overwritten
            self._shards[old[0]][1][old[1]] = -1
            self._owner[i] = None
        start = i * self.slot
        dest = self._view[start:start + self.slot]
        head = reader.fetch_block_into(b, dest)
        starts, where, base = self._shards[s]
        reader.check_rows(b, dest[:int(reader.table["raw"][b])], head, self.row)
        where[b], base[b] = i, start + head - int(starts[b]) * self.row
        self._owner[i] = (s, b)
        self._stamp[i] = tick


def arena_rows(dataset: Any, ids: np.ndarray, row: int) -> np.ndarray | None:
    """Rows of ``ids`` through ``dataset``'s arena (made on first use, remade when the block
    cache is resized), or ``None`` when the arena does not apply (no block cache)."""
    capacity = dataset.block_cache_bytes
    if capacity <= 0:
        return None
    arena = dataset.__dict__.get("_block_arena")  # never pickled (Dataset.__getstate__)
    if arena is None or arena.capacity != capacity or arena.row != row:
        arena = BlockArena(capacity, row, dataset.index.block_size)
        if arena.slots < 1:
            return None
        dataset.__dict__["_block_arena"] = arena
    return arena.gather(dataset, ids)
