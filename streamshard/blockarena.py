"""A batch of fixed-size rows out of compressed shards in one fancy index: the block arena.

A shuffled batch over zstd shards touches about one block per sample (the block-aware shuffle
spreads a lane's step over the ``g`` blocks of its unit, and a batch reads every lane), so a
gather that visits blocks one by one in Python pays a few microseconds per sample on top of the
decompressions. The arena keeps a dataset's decompressed blocks in slots of one preallocated
buffer instead of in the block LRU, and serves a batch with about fifteen numpy calls whatever
the number of shards and blocks it touches:

- A fixed-size schema packs exactly ``k`` samples per block and every shard starts a new block
  (docs/SAMPLER.md "Block groups"), so sample ``i`` of shard ``s`` is row ``i % k`` of the
  shard's block ``i // k``, whose dataset-wide number is ``first_block[s] + i // k``
  (``first_block`` from the index's sample counts alone). A shard's block table is checked to
  follow that rule (and every block to fit a slot) before any of its blocks is loaded; a shard
  that does not is served by the per-block path (:mod:`streamshard.blockread`).
- Held blocks are found with one ``searchsorted`` over the sorted numbers of the held blocks;
  the missing ones are loaded with ``ShardFileReader.fetch_block_into`` (xxh64 of the stored
  bytes, frame, size and header checks, counted in ``blocks_read``), decompressed straight into
  their slot, and ``check_rows`` (every sample of the block is ``row`` bytes); the rows are then
  copied with one fancy index over a sliding-window view of the buffer.
- Slots are reused least recently used first, at batch granularity (a slot a batch uses is never
  reused by that batch); the arena holds ``block_cache`` bytes (what the block-aware shuffle
  reserves), so the shuffle's one decompression per block holds as with the LRU.
- Counters as a sample-by-sample read in offset order: one read per missing block, a hit for
  every other sample.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from streamshard.blockshuffle import samples_per_block


class BlockArena:
    """Decompressed blocks of one dataset's compressed shards, for gathers of ``row``-byte
    samples packed ``per_block`` to a block, in ``capacity`` bytes. Thread-safe (one gather at
    a time)."""

    def __init__(self, capacity: int, row: int, block_size: int, per_block: int,
                 shard_samples: np.ndarray):
        self.capacity, self.row, self.per_block = int(capacity), int(row), int(per_block)
        self.slot = max(int(block_size), 24 + self.row)  # a block of one sample: 24 + row
        self.slots = self.capacity // self.slot
        blocks = -(-np.asarray(shard_samples, np.int64) // self.per_block)
        self._first_block = np.concatenate([[0], np.cumsum(blocks)]).astype(np.int64)
        self._buf = np.empty(self.slots * self.slot, np.uint8)
        self._view = memoryview(self._buf)
        self._windows = sliding_window_view(self._buf, self.row)
        self._stamp = np.zeros(self.slots, np.int64)  # last batch that used each slot
        self._owner = np.full(self.slots, -1, np.int64)  # dataset-wide block number per slot
        self._base = np.zeros(self.slots, np.int64)  # buffer offset of each slot's first row
        self._held, self._held_slot = self._owner.copy(), np.arange(self.slots)  # sorted
        self._regular: dict[int, bool] = {}  # shard -> follows the k-per-block rule
        self._tick = 0
        self._lock = threading.Lock()

    def gather(self, dataset: Any, ids: np.ndarray) -> np.ndarray | None:
        """``(len(ids), row)`` uint8 rows of samples ``ids`` (int64, in range), in ``ids``
        order, or ``None`` when the arena cannot serve this batch (then nothing was read)."""
        with self._lock:
            return self._gather(dataset, ids)

    def _lookup(self, blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(slot, held)`` of each dataset-wide block number."""
        pos = np.minimum(np.searchsorted(self._held, blocks), self.slots - 1)
        return self._held_slot[pos], self._held[pos] == blocks

    def _gather(self, dataset: Any, ids: np.ndarray) -> np.ndarray | None:
        shards, within = dataset.index.locate(ids)
        local, j = np.divmod(within, self.per_block)
        blocks = self._first_block[shards] + local
        slots, held = self._lookup(blocks)
        self._tick += 1
        tick = self._tick
        if held.all():
            self._stamp[slots] = tick
            loads = 0
        else:
            missing = np.unique(blocks[~held]).tolist()
            if len(ids) > self.slots and len(np.unique(blocks)) > self.slots:
                return None  # more distinct blocks than slots
            owners = np.searchsorted(self._first_block, missing, side="right") - 1
            plan = []
            for g, s in zip(missing, owners.tolist()):
                reader = dataset.shard_reader(s)
                if not self._fits(s, reader):
                    return None
                plan.append((g, reader, g - int(self._first_block[s])))
            self._stamp[slots[held]] = tick
            # The least recently used slots: none of them holds a block of this batch.
            m = len(plan)
            free = (np.argpartition(self._stamp, m - 1)[:m] if m < self.slots
                    else np.arange(self.slots))
            try:
                for (g, reader, b), i in zip(plan, free.tolist()):
                    self._load(g, reader, b, i, tick)
            finally:
                order = np.argsort(self._owner, kind="stable")
                self._held, self._held_slot = self._owner[order], order
            slots, _ = self._lookup(blocks)
            loads = m
        dataset.shard_reader(int(shards[0])).note_hits(len(ids) - loads)
        return self._windows[self._base[slots] + j * self.row]

    def _fits(self, s: int, reader: Any) -> bool:
        """Whether shard ``s`` (checked once) is compressed, packs ``per_block`` samples in
        each block but its last, and has no block larger than a slot."""
        ok = self._regular.get(s)
        if ok is None:
            starts = reader.block_starts
            ok = (reader.compressed
                  and len(starts) == int(self._first_block[s + 1] - self._first_block[s])
                  and bool(np.array_equal(starts, np.arange(len(starts)) * self.per_block))
                  and (not len(starts) or int(reader.table["raw"].max()) <= self.slot))
            self._regular[s] = ok
        return ok

    def _load(self, g: int, reader: Any, b: int, i: int, tick: int) -> None:
        """Decompress block ``b`` of ``reader``'s shard (dataset-wide ``g``) into slot ``i``,
        checked, its rows included."""
        self._owner[i] = -1  # forgotten before it is overwritten
        start = i * self.slot
        dest = self._view[start:start + self.slot]
        head = reader.fetch_block_into(b, dest)
        reader.check_rows(b, dest[:int(reader.table["raw"][b])], head, self.row)
        self._owner[i], self._base[i], self._stamp[i] = g, start + head, tick


def arena_rows(dataset: Any, ids: np.ndarray, row: int) -> np.ndarray | None:
    """Rows of ``ids`` through ``dataset``'s arena (made on first use, remade when the block
    cache is resized), or ``None`` when the arena does not apply (no block cache, no block
    size in the index, a shard that does not follow the packing rule)."""
    capacity = dataset.block_cache_bytes
    block_size = dataset.index.block_size
    if capacity <= 0 or block_size <= 0:
        return None
    arena = dataset.__dict__.get("_block_arena")  # never pickled (Dataset.__getstate__)
    if arena is None or arena.capacity != capacity or arena.row != row:
        arena = BlockArena(capacity, row, block_size, samples_per_block(dataset.index),
                           dataset.index.shards.samples)
        if arena.slots < 1:
            return None
        dataset.__dict__["_block_arena"] = arena
    return arena.gather(dataset, ids)
