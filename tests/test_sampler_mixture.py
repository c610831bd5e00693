"""MixtureOrder: exact block proportions, per-stream exactly-once, O(1) seek."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamshard.errors import ConfigError
from streamshard.sampler import EpochOrder, MixtureOrder, SampleSequence
from streamshard.sampler.mixture import block_counts, default_block

SETTINGS = settings(max_examples=20, deadline=None)


def streams(*sizes_per_stream):
    return [EpochOrder(sizes, seed=10 + i, lanes=2) for i, sizes in enumerate(sizes_per_stream)]


COUNT_CASES = [
    # (block, weights, counts)
    (100, [1, 1, 1], [34, 33, 33]),        # tie in remainders: the lower index gets the slot
    (100, [0.7, 0.3], [70, 30]),           # exact quotas, nothing to round
    (10, [1, 2, 3, 4], [1, 2, 3, 4]),      # integer weights summing to the block
    (7, [1, 1], [4, 3]),                   # odd block, equal weights
    (100, [0.5, 0.25, 0.125, 0.125], [50, 25, 13, 12]),  # 12.5/12.5 tie broken by index
]


@pytest.mark.parametrize("block,weights,counts", COUNT_CASES)
def test_largest_remainder_counts(block, weights, counts):
    from fractions import Fraction
    assert block_counts(block, [Fraction(w) for w in weights]) == counts
    assert sum(counts) == block


@SETTINGS
@given(weights=st.lists(st.floats(0.01, 100), min_size=1, max_size=5),
       blocks=st.integers(1, 12), seed=st.integers(0, 2**32))
def test_every_aligned_block_has_exact_counts(weights, blocks, seed):
    orders = streams(*[[7, 5, 3]] * len(weights))
    mix = MixtureOrder(orders, weights, seed=seed)
    m = mix.block
    assert m >= 100 and min(mix.counts) >= 1 and sum(mix.counts) == m
    stream_ids, _ = mix(np.arange(blocks * m))
    for b in range(blocks):
        got = np.bincount(stream_ids[b * m:(b + 1) * m], minlength=len(weights))
        assert got.tolist() == list(mix.counts)


def test_each_stream_is_exactly_once_per_its_epoch():
    orders = streams([30, 20, 13], [9, 4], [50, 50, 50, 27])  # N = 63, 13, 177
    mix = MixtureOrder(orders, [0.5, 0.2, 0.3], seed=4)
    positions = np.arange(20 * mix.block)
    stream_ids, sample_ids = mix(positions)
    located, epochs, within = mix.locate(positions)
    assert np.array_equal(located, stream_ids)
    for s, order in enumerate(orders):
        in_s = stream_ids == s
        # 20 blocks give stream s exactly 20 * c_s slots: local positions 0 .. 20*c_s - 1
        local = epochs[in_s] * order.size + within[in_s]
        assert sorted(local.tolist()) == list(range(20 * mix.counts[s]))
        full = 20 * mix.counts[s] // order.size
        assert full >= 1
        for e in range(full):
            at = in_s & (epochs == e)
            assert sorted(sample_ids[at].tolist()) == list(range(order.size))
            assert np.array_equal(sample_ids[at], order(e, within[at]))


def test_locate_scalar_and_far_positions():
    orders = streams([1000] * 100, [500] * 7)
    mix = MixtureOrder(orders, [3, 1], seed=1)
    far = np.array([10**12, 10**12 + 1, 10**15], dtype=np.int64)
    stream_ids, sample_ids = mix(far)
    for p, s, x in zip(far.tolist(), stream_ids.tolist(), sample_ids.tolist()):
        assert mix(p) == (s, x)
        assert 0 <= x < orders[s].size
    with pytest.raises(IndexError, match="mixture position -1"):
        mix(-1)


def test_default_block_is_smallest_that_gives_every_stream_a_slot():
    from fractions import Fraction
    assert default_block([Fraction(1), Fraction(1)]) == 100
    # share 1/1001: 100..499 give it 0 (remainders too small); the search finds the first M
    weights = [Fraction(1000), Fraction(1)]
    m = default_block(weights)
    assert min(block_counts(m, weights)) == 1 and min(block_counts(m - 1, weights)) == 0


@pytest.mark.parametrize("kwargs,message", [
    (dict(weights=[1.0]), "got 1 weights for 2 streams"),
    (dict(weights=[0.0, 0.0]), "at least one positive value"),  # 0 alone is fine: no slot
    (dict(weights=[1.0, -1.0]), "weight of stream 1 must be a non-negative number, got -1.0"),
    (dict(weights=[1.0, float("nan")]), "weight of stream 1 must be a non-negative number"),
    (dict(weights=[0.99, 0.01], block=10), "block=10 gives stream 1 .* no slot"),
    (dict(weights=[1e-9, 1.0]), "pass block= explicitly"),
    (dict(weights=[1, 1], epoch_size=0), "epoch_size must be positive, got 0"),
])
def test_rejects_bad_config(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        MixtureOrder(streams([5], [6]), seed=0, **kwargs)


def test_sequence_over_a_mixture_and_its_reseed():
    orders = streams([40, 40, 40], [30, 30])
    mix = MixtureOrder(orders, [2, 1], seed=5, epoch_size=150)
    seq = SampleSequence(mix, global_batch_size=10)
    assert (seq.epoch_size, seq.steps_per_epoch, seq.lanes) == (150, 15, 1)
    # world-size invariance also holds for mixtures
    s_all, x_all = seq.global_batch(17)
    s_dev, x_dev = seq.batch(17, 1, 2)
    # one lane: rank d of 2 reads the second half of the batch, in position order
    assert np.array_equal(s_dev, s_all[5:]) and np.array_equal(x_dev, x_all[5:])
    # epoch e is absolute mixture positions [e*E, (e+1)*E)
    assert np.array_equal(seq.global_batch(16)[1], mix(np.arange(160, 170))[1])
    re = seq.with_reseed(18, salt=3)
    pairs = lambda q, e: sorted(zip(*(a.tolist() for a in q.map_positions(e, np.arange(150)))))
    for epoch in (1, 2):  # same multiset of (stream, sample) per epoch, reordered
        assert pairs(re, epoch) == pairs(seq, epoch)
    assert np.array_equal(re.global_batch(17)[1], seq.global_batch(17)[1])
    assert not np.array_equal(re.global_batch(31)[1], seq.global_batch(31)[1])
    fields = re.state_fields()
    assert fields["kind"] == "mixture" and fields["weights"] == [2.0, 1.0]
    assert fields["block"] == mix.block and len(fields["streams"]) == 2
