"""EpochOrder: exactly-once per epoch, the documented lane/window layout, edge shapes."""

from __future__ import annotations

import pickle
from math import ceil

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamshard.errors import ConfigError
from streamshard.sampler import EpochOrder, Permutation, derive_key

SETTINGS = settings(max_examples=30, deadline=None)


def reference(order: EpochOrder, epoch: int, positions) -> list[int]:
    """Steps a-e of docs/SAMPLER.md, one scalar at a time with scalar Permutations."""
    sizes = [int(s) for s in order.shard_sizes]
    slot_perm = Permutation(len(sizes), derive_key(order.seed, epoch, "shards"))
    slots = [slot_perm(i) for i in range(len(sizes))]
    return [reference_sample(order, epoch, t, sizes, slots) for t in positions]


def reference_sample(order: EpochOrder, epoch: int, t: int, sizes, slots) -> int:
    n, lanes, window = order.size, order.lanes, order.window
    q, r = divmod(n, lanes)
    lane, k = (t % lanes, t // lanes) if t < lanes * q else (t - lanes * q, q)
    lane_size = q + (1 if lane < r else 0)
    lane_start = lane * q + min(lane, r)
    w, j = divmod(k, window)
    size = min(window, lane_size - w * window)
    j2 = Permutation(size, derive_key(order.seed, epoch, "window", lane, w))(j)
    x = lane_start + w * window + j2
    for shard in slots:  # walk the shuffled space shard by shard
        if x < sizes[shard]:
            return sum(sizes[:shard]) + x
        x -= sizes[shard]
    raise AssertionError("position beyond the shuffled space")


def assert_permutation(order: EpochOrder, epoch: int) -> np.ndarray:
    got = order(epoch, np.arange(order.size))
    assert np.array_equal(np.sort(got), np.arange(order.size)), "not exactly once"
    return got


EDGE_CASES = [
    # (shard_sizes, lanes, window)
    ([10], None, None),                 # a single shard: one lane
    ([1, 1, 1, 1, 1], None, None),      # shards of one sample
    ([0, 5, 0, 0, 3, 0], None, None),   # empty shards in between and at both ends
    ([0, 0, 7], None, None),            # only the last shard has samples
    ([3, 2], 8, None),                  # N < L: every lane holds 0 or 1 sample
    ([5, 1, 9, 2, 30, 4], 4, 3),        # uneven sizes, N % L != 0, windows cut lanes unevenly
    ([5, 1, 9, 2, 30, 4], 1, None),     # one lane: a shuffled single stream
    ([6, 6, 6], 3, 1),                  # window 1: each lane read in shuffled-space order
    ([6, 6, 6], 2, 1000),               # window larger than a lane
    ([4] * 70, None, None),             # more than 64 shards: lanes default to 64
    ([], None, None),                   # no shards at all: N = 0
]


@pytest.mark.parametrize("sizes,lanes,window", EDGE_CASES)
def test_edge_shapes_are_exactly_once_and_match_reference(sizes, lanes, window):
    order = EpochOrder(sizes, seed=11, lanes=lanes, window=window)
    for epoch in (0, 1, 5):
        got = assert_permutation(order, epoch)
        assert got.tolist() == reference(order, epoch, range(order.size))


@SETTINGS
@given(sizes=st.lists(st.integers(0, 40), min_size=1, max_size=30),
       lanes=st.none() | st.integers(1, 20), window=st.none() | st.integers(1, 50),
       seed=st.integers(0, 2**64 - 1), epoch=st.integers(0, 10**6))
def test_every_epoch_is_a_permutation(sizes, lanes, window, seed, epoch):
    order = EpochOrder(sizes, seed=seed, lanes=lanes, window=window)
    got = assert_permutation(order, epoch)
    probe = list(range(0, order.size, max(1, order.size // 7)))
    assert got[probe].tolist() == reference(order, epoch, probe)


def test_defaults_follow_the_contract():
    order = EpochOrder([100] * 100, seed=0)
    assert (order.size, order.num_shards, order.lanes, order.window) == (10_000, 100, 64, 400)
    small = EpochOrder([7, 8, 9], seed=0)
    assert (small.lanes, small.window) == (3, 4 * ceil(24 / 3))


def test_epochs_and_seeds_differ_and_are_deterministic():
    sizes = [50] * 20
    a = EpochOrder(sizes, seed=1)
    x = np.arange(a.size)
    assert np.array_equal(a(3, x), EpochOrder(sizes, seed=1)(3, x))
    assert not np.array_equal(a(0, x), a(1, x))
    assert not np.array_equal(a(0, x), EpochOrder(sizes, seed=2)(0, x))
    assert np.array_equal(a.reseeded(2)(0, x), EpochOrder(sizes, seed=2)(0, x))


def test_shuffle_false_is_dataset_order():
    order = EpochOrder([3, 0, 5], seed=9, shuffle=False)
    assert order(0, np.arange(8)).tolist() == list(range(8))
    assert order(7, 5) == 5


def test_lane_owns_a_contiguous_run_of_the_shuffled_space():
    # With one shard the shuffled space is the dataset itself, so lane l's samples must be
    # exactly its run [l*q + min(l, r), ... + n_l).
    order = EpochOrder([103], seed=5, lanes=4, window=10)
    got = order(2, np.arange(103))
    q, r = divmod(103, 4)
    for lane in range(4):
        start = lane * q + min(lane, r)
        n_l = q + (lane < r)
        assert sorted(got[lane::4].tolist()) == list(range(start, start + n_l))


def test_windows_bound_the_shuffle():
    # One shard, one lane: position t must stay inside its window of W samples.
    order = EpochOrder([1000], seed=3, lanes=1, window=64)
    got = order(0, np.arange(1000))
    assert np.array_equal(got // 64, np.arange(1000) // 64)
    assert not np.array_equal(got, np.arange(1000))


def test_shard_of():
    order = EpochOrder([3, 0, 2, 4], seed=0)
    assert order.shard_of(np.arange(9)).tolist() == [0, 0, 0, 2, 2, 3, 3, 3, 3]
    assert order.shard_of(4) == 2


def test_huge_index_in_constant_memory():
    # 10^6 shards of 10^6 samples: N = 10^12; only O(#shards) tables are built.
    order = EpochOrder(np.full(10**6, 10**6), seed=1)
    pos = np.array([0, 10**12 - 1, 123_456_789_012], dtype=np.int64)
    got = order(4, pos)
    assert ((got >= 0) & (got < 10**12)).all() and len(set(got.tolist())) == 3
    assert order(4, 10**12 - 1) == got[1]


def test_scalar_and_array_agree_and_pickle():
    order = EpochOrder([5, 7, 11], seed=2, lanes=2)
    arr = order(1, np.arange(23))
    assert [order(1, t) for t in range(23)] == arr.tolist()
    clone = pickle.loads(pickle.dumps(order))
    assert np.array_equal(clone(1, np.arange(23)), arr)


@pytest.mark.parametrize("kwargs,message", [
    (dict(shard_sizes=[1, -2], seed=0), "shard 1 has -2"),
    (dict(shard_sizes=[1], seed=0, lanes=-3), "lanes must be positive, got -3"),
    (dict(shard_sizes=[1], seed=0, window=0), "window must be positive, got 0"),
    (dict(shard_sizes=[1], seed=1.5), "seed must be an int"),
    (dict(shard_sizes=[1], seed=0, shuffle="yes"), "shuffle must be a bool"),
    (dict(shard_sizes=[[1, 2]], seed=0), "1-D sequence of ints"),
])
def test_rejects_bad_config(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        EpochOrder(**kwargs)


def test_rejects_bad_positions():
    order = EpochOrder([4, 4], seed=0)
    with pytest.raises(IndexError, match=r"position 8 out of range \[0, 8\)"):
        order(0, np.array([1, 8]))
    with pytest.raises(ConfigError, match="epoch must be >= 0, got -1"):
        order(-1, 0)
