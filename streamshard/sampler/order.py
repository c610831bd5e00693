"""``EpochOrder``: epoch position -> global sample id by per-index bijections (docs/SAMPLER.md).

For epoch ``e`` with ``shuffle=True``:

a. shard order is permuted by ``Permutation(num_shards, derive_key(seed, e, "shards"))`` (slot
   ``i`` holds shard ``perm(i)``); the shuffled sample space is the shards concatenated in slot
   order. Its cumulative sizes are the only per-epoch table: O(#shards), cached.
b. ``L`` lanes split the shuffled space into contiguous runs of ``N//L`` or ``N//L + 1`` samples.
c. position ``t`` -> (lane, k): round-robin over lanes, ``lane = t % L``, ``k = t // L``, for
   ``t < L*(N//L)``; the tail (``< L`` positions) goes to lanes ``0..N%L-1`` at ``k = N//L``.
d. inside a lane, windows of ``W`` samples are each permuted by their own
   ``Permutation(size, derive_key(seed, e, "window", lane, w))``.
e. the shuffled-space position is located in its shard (searchsorted on the cumulative sizes) and
   turned into the global id ``original_shard_start + offset``.

With ``blocks=BlockGroups(k, g)`` (the block-aware shuffle, :mod:`.blockorder`) steps a and d
change: regular shards come first in the slot order, and a lane reads units of ``g`` blocks one at
a time (units permuted, samples permuted within a unit) instead of windows in order.

Nothing of size N is ever built; a call costs O(len(positions) * log(#shards)).
"""

from __future__ import annotations

from math import ceil
from typing import Sequence

import numpy as np

from streamshard.errors import ConfigError
from streamshard.locate import locate, shard_starts
from streamshard.lru import LRU
from streamshard.sampler import blockorder
from streamshard.sampler.blockorder import BlockGroups
from streamshard.sampler.permutation import (
    Permutation,
    check_positions,
    derive_key,
    derive_keys,
    permute_array,
)

# EpochOrder's own default when no global batch size is known (and the default of states saved
# before lanes were sized for locality): min(64, #shards).
DEFAULT_MAX_LANES = 64
# Epoch tables kept per order: a mixture batch can touch a few epochs of a small stream at once.
_EPOCH_CACHE_SIZE = 8


def check_int(value, name: str, *, minimum: int | None = None) -> int:
    """An int (numpy ints accepted, bool refused), optionally ``>= minimum``, else ConfigError."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ConfigError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    value = int(value)
    if minimum is not None and value < minimum:
        what = "positive" if minimum == 1 else f">= {minimum}"
        raise ConfigError(f"{name} must be {what}, got {value}")
    return value


def default_lanes(num_shards: int, global_batch_size: int) -> int:
    """Lanes for locality at any world size (docs/SAMPLER.md, "Lanes and nodes").

    ``cap = min(#shards, G)``; the largest divisor of ``G`` that is ``<= cap`` when it is at least
    ``cap / 2`` (then every step holds ``G / L`` positions of every lane: the split among nodes is
    the same every step), else ``cap // 2`` (lanes then drift by under one position per step).
    Measured on 4,096 shards: bytes per node / share <= 1.07 at 8..1,024 ranks, 8 per node.
    """
    num_shards = check_int(num_shards, "num_shards", minimum=0)
    g = check_int(global_batch_size, "global_batch_size", minimum=1)
    cap = max(1, min(num_shards, g))
    best, d = 1, 1
    while d * d <= g:
        if g % d == 0:
            best = max([best] + [x for x in (d, g // d) if x <= cap])
        d += 1
    return best if 2 * best >= cap else max(1, cap // 2)


class EpochOrder:
    """The shuffled order of one dataset: ``order(epoch, positions) -> global sample ids``.

    Immutable and picklable; safe to share between threads (the per-epoch table cache is only
    ever replaced, never mutated in place). Positions and results are int64 (ints stay ints).
    """

    def __init__(self, shard_sizes: Sequence[int], *, seed: int, shuffle: bool = True,
                 lanes: int | None = None, window: int | None = None,
                 blocks: BlockGroups | None = None):
        sizes = np.asarray(shard_sizes)
        if sizes.ndim != 1 or (sizes.size and sizes.dtype.kind not in "iu"):
            raise ConfigError(f"shard_sizes must be a 1-D sequence of ints, got {sizes!r:.80}")
        sizes = sizes.astype(np.int64)
        if sizes.size and sizes.min() < 0:
            bad = int(np.argmax(sizes < 0))
            raise ConfigError(f"shard_sizes must be non-negative, shard {bad} has {sizes[bad]}")
        self._seed = check_int(seed, "seed")
        if not isinstance(shuffle, (bool, np.bool_)):
            raise ConfigError(f"shuffle must be a bool, got {shuffle!r}")
        self._shuffle = bool(shuffle)
        self._sizes = sizes
        self._starts = shard_starts(sizes)
        self._n = int(self._starts[-1])
        num_shards = int(sizes.size)
        self._lanes = (max(1, min(DEFAULT_MAX_LANES, num_shards)) if lanes is None
                       else check_int(lanes, "lanes", minimum=1))
        self._window = (max(1, 4 * ceil(self._n / num_shards)) if window is None and num_shards
                        else 1 if window is None else check_int(window, "window", minimum=1))
        if blocks is not None and not isinstance(blocks, BlockGroups):
            raise ConfigError(f"blocks must be a BlockGroups or None, got {blocks!r:.80}")
        self._blocks = blocks
        self._cache: LRU[int, tuple[np.ndarray, np.ndarray]] = LRU(_EPOCH_CACHE_SIZE)

    # -- read-only description ------------------------------------------------------------
    @property
    def size(self) -> int:
        """N, the number of samples; every epoch is a permutation of ``[0, N)``."""
        return self._n

    @property
    def seed(self) -> int:
        return self._seed

    @property
    def shuffle(self) -> bool:
        return self._shuffle

    @property
    def lanes(self) -> int:
        return self._lanes

    @property
    def window(self) -> int:
        return self._window

    @property
    def blocks(self) -> BlockGroups | None:
        """The block-aware shuffle's grouping, or ``None`` for window mode."""
        return self._blocks

    @property
    def num_shards(self) -> int:
        return int(self._sizes.size)

    @property
    def shard_sizes(self) -> np.ndarray:
        """Samples per shard (a read-only view)."""
        view = self._sizes.view()
        view.flags.writeable = False
        return view

    def state_fields(self) -> dict:
        """JSON-able definition of this order (what a checkpoint must match)."""
        fields = {"size": self._n, "num_shards": self.num_shards, "seed": self._seed,
                  "shuffle": self._shuffle, "lanes": self._lanes, "window": self._window}
        if self._blocks is not None:  # absent in window mode: older states stay valid
            fields["blocks"] = self._blocks.state_fields()
        return fields

    def __repr__(self) -> str:
        return (f"EpochOrder(size={self._n}, num_shards={self.num_shards}, seed={self._seed}, "
                f"shuffle={self._shuffle}, lanes={self._lanes}, window={self._window}, "
                f"blocks={self._blocks})")

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_cache"] = LRU(_EPOCH_CACHE_SIZE)  # each copy (and process) fills its own
        return state

    def reseeded(self, seed: int) -> "EpochOrder":
        """The same order definition with another seed (shares the O(#shards) arrays)."""
        clone = object.__new__(EpochOrder)
        clone.__dict__.update(self.__getstate__())
        clone._seed = check_int(seed, "seed")
        return clone

    def with_lanes(self, lanes: int) -> "EpochOrder":
        """The same order definition with another number of lanes (e.g. a saved state's)."""
        clone = object.__new__(EpochOrder)
        clone.__dict__.update(self.__getstate__())
        clone._lanes = check_int(lanes, "lanes", minimum=1)
        return clone

    def with_blocks(self, blocks: BlockGroups | None) -> "EpochOrder":
        """The same order definition with another block grouping (``None``: window order)."""
        if blocks is not None and not isinstance(blocks, BlockGroups):
            raise ConfigError(f"blocks must be a BlockGroups or None, got {blocks!r:.80}")
        clone = object.__new__(EpochOrder)
        clone.__dict__.update(self.__getstate__())
        clone._blocks = blocks
        return clone

    # -- mapping --------------------------------------------------------------------------
    def __call__(self, epoch: int, positions):
        """Global sample ids at ``positions`` (int or int array in ``[0, N)``) of ``epoch``."""
        epoch = check_int(epoch, "epoch", minimum=0)
        pos, scalar = check_positions(positions, self._n, "position")
        out = self.map_checked(epoch, pos)
        return int(out) if scalar else out

    def map_checked(self, epoch: int, positions: np.ndarray) -> np.ndarray:
        """``order(epoch, positions)`` for an int64 array the caller has range-checked."""
        return self._map(epoch, positions) if self._shuffle else positions.copy()

    def shard_of(self, sample_ids):
        """Index of the shard that holds each global sample id (int or int64 array)."""
        ids, scalar = check_positions(sample_ids, self._n, "sample id")
        out, _ = locate(self._starts, ids)
        return int(out) if scalar else out

    def shards_per_lane_at_once(self) -> int:
        """Most shards one lane reads at the same time: a window (window mode), or a unit or
        the lane's edge (block mode: its tail and head pieces, two runs of < c samples)."""
        if self._blocks is None:
            return self.shards_touched_by_run(self._window)
        return min(self.num_shards, 2 * self.shards_touched_by_run(self._blocks.unit))

    def shards_touched_by_run(self, run: int) -> int:
        """Most shards a run of ``run`` consecutive samples can touch (in any shard order)."""
        nonempty = self._sizes[self._sizes > 0]
        if nonempty.size == 0 or run <= 0:
            return 0
        # A run of r samples over shards of >= m samples crosses at most ceil((r-1)/m) borders.
        return int(min(nonempty.size, ceil((run - 1) / int(nonempty.min())) + 1))

    def lane_slot_ranges(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(first slot, last slot) of the shuffled shard space each lane's run overlaps in
        ``epoch`` (slots of :meth:`epoch_tables`; a lane of 0 samples gets ``last < first``)."""
        q, r = divmod(self._n, self._lanes)
        lane = np.arange(self._lanes, dtype=np.int64)
        start = lane * q + np.minimum(lane, r)
        size = q + (lane < r)
        _, cum = self._epoch_tables(epoch)
        first = np.searchsorted(cum, start, side="right") - 1
        last = np.searchsorted(cum, start + size - 1, side="right") - 1
        return first, np.where(size > 0, last, first - 1)

    def epoch_tables(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(slot -> original shard, cumulative sizes in slot order) of ``epoch`` (read-only)."""
        views = [table.view() for table in self._epoch_tables(check_int(epoch, "epoch", minimum=0))]
        for view in views:
            view.flags.writeable = False
        return views[0], views[1]

    def _epoch_tables(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(slot -> original shard, cumulative sizes in slot order) for one epoch; cached."""
        tables = self._cache.get(epoch)
        if tables is None:
            if self._blocks is not None:
                slot_to_shard = blockorder.slot_order(self._sizes, self._blocks, self._seed, epoch)
            else:
                perm = Permutation(self.num_shards, derive_key(self._seed, epoch, "shards"))
                slot_to_shard = perm(np.arange(self.num_shards, dtype=np.int64))
            cum = np.concatenate([[0], np.cumsum(self._sizes[slot_to_shard])]).astype(np.int64)
            tables = (slot_to_shard, cum)
            self._cache.put(epoch, tables)
        return tables

    def _map(self, epoch: int, t: np.ndarray) -> np.ndarray:
        n, lanes, window = self._n, self._lanes, self._window
        q, r = divmod(n, lanes)
        body = t < lanes * q
        lane = np.where(body, t % lanes, t - lanes * q)
        k = np.where(body, t // lanes, q)
        lane_size = q + (lane < r)
        lane_start = lane * q + np.minimum(lane, r)
        if self._blocks is not None:
            shuffled = blockorder.lane_offsets(k, lane, lane_start, lane_size, self._blocks,
                                               self._seed, epoch)
        else:
            w = k // window
            j = k - w * window
            size = np.minimum(window, lane_size - w * window)
            keys = derive_keys((self._seed, epoch, "window"), lane, w)
            shuffled = lane_start + w * window + permute_array(j, size, keys)
        slot_to_shard, cum = self._epoch_tables(epoch)
        slot = np.searchsorted(cum, shuffled, side="right") - 1  # skips empty shards
        return self._starts[slot_to_shard[slot]] + (shuffled - cum[slot])
