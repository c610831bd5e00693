"""Block-aware shuffle (EpochOrder(blocks=BlockGroups(k, g))): exactly-once, the documented
unit layout (scalar reference), O(1) seek, world-size-free batches and once-per-epoch blocks."""

from __future__ import annotations

import pickle
from collections import OrderedDict
from math import gcd

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamshard.errors import ConfigError
from streamshard.sampler import BlockGroups, EpochOrder, Permutation, SampleSequence, derive_key

SETTINGS = settings(max_examples=40, deadline=None)


def reference(order: EpochOrder, epoch: int, t: int) -> int:
    """docs/SAMPLER.md "Block groups", one position at a time with scalar Permutations."""
    sizes = [int(s) for s in order.shard_sizes]
    k, c = order.blocks.samples_per_block, order.blocks.unit
    regular = [s for s in range(len(sizes)) if sizes[s] % k == 0]
    other = [s for s in range(len(sizes)) if sizes[s] % k != 0]
    slots = []
    for members, name in ((regular, "shards"), (other, "shards-tail")):
        perm = Permutation(len(members), derive_key(order.seed, epoch, name))
        slots += [members[perm(i)] for i in range(len(members))]
    n, lanes = order.size, order.lanes
    q, r = divmod(n, lanes)
    lane, kk = (t % lanes, t // lanes) if t < lanes * q else (t - lanes * q, q)
    size = q + (1 if lane < r else 0)
    start = lane * q + min(lane, r)
    p0 = min((-start) % c, size)
    m = (size - p0) // c
    if kk < m * c:
        u2 = Permutation(m, derive_key(order.seed, epoch, "units", lane))(kk // c)
        key = derive_key(order.seed, epoch, "unit", lane, u2)
        b, a = key % c, (2 + (key >> 32) % (c - 2) if c > 2 else 1)
        while gcd(a, c) != 1:
            a = 2 + (a - 1) % (c - 2)
        z = u2 * c + (a * (kk % c) + b) % c
    else:
        z = m * c + Permutation(size - m * c, derive_key(order.seed, epoch, "edge", lane))(kk - m * c)
    x = start + (z + p0) % size
    for shard in slots:
        if x < sizes[shard]:
            return sum(sizes[:shard]) + x
        x -= sizes[shard]
    raise AssertionError("position beyond the shuffled space")


def blocks_of(order: EpochOrder, ids: np.ndarray) -> np.ndarray:
    """Block id of each sample, if every shard packs k samples per block from its start."""
    k = order.blocks.samples_per_block
    starts = np.concatenate([[0], np.cumsum(order.shard_sizes)])
    shard = np.searchsorted(starts, ids, side="right") - 1
    return shard * (1 << 32) + (ids - starts[shard]) // k


def lru_misses(blocks: np.ndarray, capacity: int) -> int:
    cache: OrderedDict = OrderedDict()
    misses = 0
    for b in blocks.tolist():
        if b in cache:
            cache.move_to_end(b)
            continue
        misses += 1
        cache[b] = None
        if len(cache) > capacity:
            cache.popitem(last=False)
    return misses


EDGE_CASES = [
    # (shard_sizes, lanes, k, g)
    ([10], None, 1, 1),                  # one shard, one-sample blocks, units of one sample
    ([12, 12, 12], 2, 4, 3),             # shards exactly one unit each; lanes cut a unit
    ([0, 8, 0, 0, 7, 0], None, 2, 2),    # empty shards; 7 is irregular (7 % 2 != 0)
    ([3, 2], 8, 2, 2),                   # N < L: lanes of 0 or 1 sample, no full unit
    ([5, 1, 9, 2, 30, 4], 4, 3, 2),      # uneven, mostly irregular shards
    ([40, 40, 40, 13], 1, 5, 2),         # one lane: a full shuffle of units
    ([6, 6, 6], 3, 100, 4),              # unit larger than every lane: all edge
]


@pytest.mark.parametrize("sizes,lanes,k,g", EDGE_CASES)
def test_edge_shapes_are_exactly_once_and_match_reference(sizes, lanes, k, g):
    order = EpochOrder(sizes, seed=7, lanes=lanes, blocks=BlockGroups(k, g))
    for epoch in (0, 3):
        got = order(epoch, np.arange(order.size))
        assert np.array_equal(np.sort(got), np.arange(order.size))
        assert got.tolist() == [reference(order, epoch, t) for t in range(order.size)]


@SETTINGS
@given(sizes=st.lists(st.integers(0, 60), min_size=1, max_size=12).filter(lambda s: sum(s) > 0),
       lanes=st.none() | st.integers(1, 12), k=st.integers(1, 7), g=st.integers(1, 5),
       seed=st.integers(0, 2**64 - 1), epoch=st.integers(0, 10**6))
def test_every_epoch_is_a_permutation_with_o1_seek(sizes, lanes, k, g, seed, epoch):
    order = EpochOrder(sizes, seed=seed, lanes=lanes, blocks=BlockGroups(k, g))
    got = order(epoch, np.arange(order.size))
    assert np.array_equal(np.sort(got), np.arange(order.size))
    # Seek: any single position, alone, gives the same sample as the full epoch.
    for t in {0, order.size - 1, order.size // 2}:
        assert order(epoch, t) == got[t]


@SETTINGS
@given(shards=st.integers(1, 6), blocks_per_shard=st.integers(1, 40), k=st.integers(1, 9),
       g=st.integers(1, 6), lanes=st.integers(1, 6), short=st.integers(0, 8),
       seed=st.integers(0, 1000))
def test_fixed_size_blocks_are_decompressed_once_per_epoch(shards, blocks_per_shard, k, g, lanes,
                                                           short, seed):
    # Every shard holds whole blocks of k samples except a short last one (as the writer makes
    # a fixed-size dataset); a reader whose LRU holds 2 (g + 1) blocks per lane decompresses
    # each block once, plus at most one per unit cut by a lane boundary.
    sizes = [blocks_per_shard * k] * shards + ([short] if short else [])
    order = EpochOrder(sizes, seed=seed, lanes=lanes, blocks=BlockGroups(k, g))
    blocks = blocks_of(order, order(0, np.arange(order.size)))
    distinct = len(np.unique(blocks))
    assert lru_misses(blocks, order.lanes * 2 * (g + 1)) <= distinct + (order.lanes - 1)


def test_window_mode_reads_each_block_many_times():
    # The same data and cache in window mode: the failure the block mode fixes (the test above
    # can fail: this is what a wrong unit layout looks like).
    sizes = [15 * 64] * 4
    groups = BlockGroups(15, 4)
    block_mode = EpochOrder(sizes, seed=1, blocks=groups)
    window_mode = EpochOrder(sizes, seed=1)
    blocks_w = blocks_of(block_mode, window_mode(0, np.arange(window_mode.size)))
    blocks_b = blocks_of(block_mode, block_mode(0, np.arange(block_mode.size)))
    capacity = 4 * 2 * (4 + 1)
    assert lru_misses(blocks_b, capacity) == 4 * 64
    assert lru_misses(blocks_w, capacity) > 4 * 4 * 64


def test_units_are_read_one_at_a_time_per_lane():
    # Lane l serves positions l, l+L, ...; its first c samples are one whole unit: c
    # consecutive ids of one shard, in shuffled order.
    k, g, lanes = 4, 3, 5
    order = EpochOrder([k * 30] * 5, seed=3, lanes=lanes, blocks=BlockGroups(k, g))
    ids = order(0, np.arange(order.size))
    c = k * g
    for lane in range(lanes):
        served = ids[lane::lanes]
        starts = served.reshape(-1)[: (len(served) // c) * c].reshape(-1, c)
        # Skip the lane's edge (last n - m*c samples); every full unit is aligned and whole.
        for unit in starts[: len(served) // c - 2]:
            assert unit.max() - unit.min() == c - 1 and unit.min() % c == 0
            assert not np.array_equal(unit, np.sort(unit)) or c == 1


@SETTINGS
@given(n=st.integers(1, 5000), key=st.integers(0, 2**64 - 1))
def test_affine_unit_permutation_is_a_bijection(n, key):
    from streamshard.sampler.blockorder import affine_permute

    out = affine_permute(np.arange(n), n, np.uint64(key))
    assert np.array_equal(np.sort(out), np.arange(n))


@pytest.mark.parametrize("world", [1, 2, 3, 4, 6, 12])
def test_global_batches_identical_for_every_world_size(world):
    order = EpochOrder([37, 64, 0, 50, 21], seed=5, lanes=6, blocks=BlockGroups(3, 2))
    seq = SampleSequence(order, global_batch_size=12)
    for step in (0, 5, seq.steps_per_epoch - 1, seq.steps_per_epoch + 2):
        whole = seq.global_batch(step)[1]
        parts = [seq.batch(step, r, world)[1] for r in range(world)]
        merged = np.empty_like(whole)
        first = seq.step_positions(step)[0]
        for r, part in enumerate(parts):  # each rank's samples at its positions (the rank split)
            merged[(seq.device_positions(step, r, world) - first) % seq.epoch_size] = part
        assert np.array_equal(merged, whole)


@SETTINGS
@given(sizes=st.lists(st.integers(0, 40), min_size=1, max_size=8).filter(lambda s: sum(s) >= 24),
       lanes=st.integers(1, 9), k=st.integers(1, 6), g=st.integers(1, 4),
       world=st.sampled_from([1, 2, 3, 4, 6, 12]), seed=st.integers(0, 2**32))
def test_any_world_size_reassembles_the_global_batches(sizes, lanes, k, g, world, seed):
    order = EpochOrder(sizes, seed=seed, lanes=lanes, blocks=BlockGroups(k, g))
    seq = SampleSequence(order, global_batch_size=12, drop_last=False)
    for step in range(seq.steps_per_epoch + 1):
        whole = seq.global_batch(step)[1]
        merged = np.empty_like(whole)
        first = seq.step_positions(step)[0]
        for r in range(world):  # each rank's samples at its positions (the rank split)
            merged[(seq.device_positions(step, r, world) - first) % seq.epoch_size] = \
                seq.batch(step, r, world)[1]
        assert np.array_equal(merged, whole)


def test_state_fields_repr_pickle_and_reseeded():
    order = EpochOrder([20, 30], seed=1, blocks=BlockGroups(5, 2))
    assert order.state_fields()["blocks"] == [5, 2]
    assert "blocks" not in EpochOrder([20, 30], seed=1).state_fields()
    clone = pickle.loads(pickle.dumps(order))
    assert np.array_equal(clone(1, np.arange(50)), order(1, np.arange(50)))
    other = order.reseeded(2)
    assert other.blocks == order.blocks
    assert not np.array_equal(other(0, np.arange(50)), order(0, np.arange(50)))
    seq = SampleSequence(order, global_batch_size=5).with_reseed(3, 9)
    seen = np.concatenate([seq.global_batch(s)[1] for s in range(seq.steps_per_epoch)])
    assert np.array_equal(np.sort(seen), np.arange(50))


@pytest.mark.parametrize("args,message", [
    ((0, 4), "samples_per_block must be a positive int, got 0"),
    ((4, -1), "blocks_per_group must be a positive int, got -1"),
    ((True, 4), "samples_per_block must be a positive int, got True"),
])
def test_block_groups_validate(args, message):
    with pytest.raises(ConfigError, match=message):
        BlockGroups(*args)


def test_order_rejects_a_non_block_groups_value():
    with pytest.raises(ConfigError, match="blocks must be a BlockGroups"):
        EpochOrder([4], seed=0, blocks=(4, 2))
