"""Mixtures that change (sampler level): weight segments from reweight ledger entries and
schedules. Exact counts per block in every segment, every stream exactly once per its own epoch
across segment boundaries, O(1) seek, world-size independence, idempotence, history kept."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamshard.errors import ConfigError
from streamshard.sampler import EpochOrder, Ledgers, MixtureOrder, SampleSequence
from streamshard.sampler.reweight import effective_entries, first_position

SETTINGS = settings(max_examples=25, deadline=None)


def orders(sizes):
    return [EpochOrder([n], seed=20 + i, lanes=1) for i, n in enumerate(sizes)]


@st.composite
def reweighted(draw):
    """A mixture sequence with 1-3 reweight entries (counts may be 0 for a stream)."""
    n_streams = draw(st.integers(2, 4))
    sizes = draw(st.lists(st.integers(3, 60), min_size=n_streams, max_size=n_streams))
    weights = draw(st.lists(st.integers(1, 9), min_size=n_streams, max_size=n_streams))
    g = draw(st.integers(1, min(40, sum(sizes))))
    mix = MixtureOrder(orders(sizes), weights, seed=draw(st.integers(0, 2**20)))
    seq = SampleSequence(mix, global_batch_size=g, drop_last=draw(st.booleans()))
    steps = sorted(set(draw(st.lists(st.integers(0, 3 * seq.steps_per_epoch + 5),
                                     min_size=1, max_size=3))))
    for step in steps:
        counts = draw(st.lists(st.integers(0, 12), min_size=n_streams, max_size=n_streams)
                      .filter(lambda c: sum(c) > 0))
        seq = seq.with_reweight(step, counts)
    return seq


def cuts_of(seq):
    """[(first position, counts), ...] of every segment, the first at 0."""
    mix = seq.order
    out = [(0, mix.counts)]
    for step, counts in effective_entries(mix, seq.reweights):
        pos = first_position(step, seq.global_batch_size, seq.steps_per_epoch, seq.epoch_size)
        if pos == 0:
            out = []
        out.append((pos, counts))
    return out


@SETTINGS
@given(seq=reweighted())
def test_every_block_of_every_segment_has_exact_counts(seq):
    cuts = cuts_of(seq)
    n_streams = len(seq.order.orders)
    for k, (start, counts) in enumerate(cuts):
        m = sum(counts)
        stop = cuts[k + 1][0] if k + 1 < len(cuts) else start + 5 * m
        full = (stop - start) // m
        if not full:
            continue
        streams, _, _ = seq.mixture.locate(np.arange(start, start + full * m))
        per_block = np.stack([np.bincount(streams[b * m:(b + 1) * m], minlength=n_streams)
                              for b in range(full)])
        assert (per_block == np.asarray(counts)).all()


@SETTINGS
@given(seq=reweighted())
def test_each_stream_serves_each_sample_once_per_its_own_epoch_across_segments(seq):
    cuts = cuts_of(seq)
    last_start, last_counts = cuts[-1]
    m = sum(last_counts)
    # Enough full blocks of the last segment to fill every hole left by earlier cuts.
    blocks = len(cuts) * max(sum(c) for _, c in cuts) + 1
    positions = np.arange(last_start + blocks * m)
    streams, epochs, within = seq.mixture.locate(positions)
    _, samples = seq.mixture(positions[:2000])
    for s, order in enumerate(seq.order.orders):
        mine = streams == s
        local = epochs[mine] * order.size + within[mine]
        assert len(np.unique(local)) == len(local)  # no local position twice
        if last_counts[s]:  # still drawn: the locals used are exactly 0 .. K-1, no hole left
            assert np.array_equal(np.sort(local), np.arange(len(local)))
        head = mine[:2000]
        for e in np.unique(epochs[:2000][head]).tolist():  # each stream epoch: distinct samples
            got = samples[head][epochs[:2000][head] == e]
            assert len(np.unique(got)) == len(got)


@SETTINGS
@given(seq=reweighted(), data=st.data())
def test_seek_is_pure_a_fresh_sequence_at_step_n_equals_the_continued_one(seq, data):
    stop = 4 * seq.steps_per_epoch
    n = data.draw(st.integers(0, 3 * seq.steps_per_epoch))
    continued = [seq.global_batch(s) for s in range(stop)]
    fresh = pickle.loads(pickle.dumps(seq.order)).with_segments(())
    fresh = SampleSequence(fresh, global_batch_size=seq.global_batch_size,
                           drop_last=seq.drop_last, reweights=seq.reweights)
    for got, want in zip(fresh.global_batch(n), continued[n]):
        assert np.array_equal(got, want)
    # One vectorized call over a whole epoch equals the step-by-step answers.
    epoch = n // seq.steps_per_epoch
    steps = range(epoch * seq.steps_per_epoch, (epoch + 1) * seq.steps_per_epoch)
    positions = np.concatenate([seq.step_positions(s) for s in steps])
    streams, samples = fresh.map_positions(epoch, positions)
    assert np.array_equal(streams, np.concatenate([continued[s][0] for s in steps]))
    assert np.array_equal(samples, np.concatenate([continued[s][1] for s in steps]))


@SETTINGS
@given(seq=reweighted(), step=st.integers(0, 60), world=st.integers(2, 5))
def test_same_global_batches_at_any_world_size(seq, step, world):
    want_s, want_i = seq.global_batch(step)
    parts = [seq.batch(step, r, world) for r in range(world)]
    got = sorted(zip(np.concatenate([p[0] for p in parts]).tolist(),
                     np.concatenate([p[1] for p in parts]).tolist()))
    assert got == sorted(zip(want_s.tolist(), want_i.tolist()))


@SETTINGS
@given(seq=reweighted(), data=st.data())
def test_a_reweight_changes_nothing_before_its_step_and_is_idempotent(seq, data):
    n_streams = len(seq.order.orders)
    step = data.draw(st.integers(0, 2 * seq.steps_per_epoch))
    counts = data.draw(st.lists(st.integers(0, 30), min_size=n_streams, max_size=n_streams)
                       .filter(lambda c: sum(c) > 0))
    after = seq.with_reweight(step, counts)
    for s in range(step):
        assert all(np.array_equal(a, b) for a, b in zip(after.global_batch(s), seq.global_batch(s)))
    again = after.with_reweight(step, counts)
    assert again.ledgers == after.ledgers
    assert after.ledgers.merged(after.ledgers) == after.ledgers  # merging a copy: no change
    assert Ledgers(reweights=tuple(reversed(after.reweights))).reweights == after.reweights


def test_reweight_replaces_the_schedule_after_it_and_noops_vanish():
    mix = MixtureOrder(orders([50, 50]), [1, 1], seed=3, block=10,
                       schedule=[(5, [1, 3]), (9, [1, 0])])
    assert mix.schedule_counts() == ((5, (3, 7)), (9, (10, 0)))
    seq = SampleSequence(mix, global_batch_size=10)
    assert effective_entries(mix, ()) == [(5, (3, 7)), (9, (10, 0))]
    # A reweight at 7 drops the schedule's later change; an entry equal to what is in force is
    # no change at all.
    assert effective_entries(mix, seq.with_reweight(7, (5, 5)).reweights) == [(5, (3, 7)), (7, (5, 5))]
    # (5, 5) from step 2 is what the weights give: no change, and the schedule is replaced.
    assert effective_entries(mix, seq.with_reweight(2, (5, 5)).reweights) == []
    assert effective_entries(mix, seq.with_reweight(2, (4, 6)).reweights) == [(2, (4, 6))]
    assert effective_entries(mix, seq.with_reweight(0, (5, 5)).reweights) == []


def test_weight_zero_removes_a_stream_from_exactly_its_step():
    mix = MixtureOrder(orders([40, 40, 40]), [1, 1, 1], seed=1)
    seq = SampleSequence(mix, global_batch_size=8)  # 15 steps per epoch, no tail; M = 100
    cut = seq.with_reweight(23, mix.counts_for([1, 0, 2]))
    assert mix.counts_for([1, 0, 2]) == (33, 0, 67)
    before = [cut.global_batch(s)[0] for s in range(23)]
    after = np.concatenate([cut.global_batch(s)[0] for s in range(23, 23 + 40)])
    assert any((b == 1).any() for b in before) and not (after == 1).any()
    # Step 23 starts at position 184, not a multiple of M: the blocks count from there.
    assert np.bincount(after[:200], minlength=3).tolist() == [66, 0, 134]


def test_counts_for_falls_back_to_a_block_that_gives_every_positive_weight_a_slot():
    mix = MixtureOrder(orders([10, 10]), [1, 1], seed=0)
    assert mix.block == 100 and sum(mix.counts_for([1, 1000])) > 100
    assert min(mix.counts_for([1, 1000])) == 1


def test_reweight_after_a_reseed_in_the_epoch_must_start_an_epoch():
    mix = MixtureOrder(orders([50, 50]), [1, 1], seed=2)
    seq = SampleSequence(mix, global_batch_size=10).with_reseed(3, salt=9)  # 10 steps per epoch
    with pytest.raises(ConfigError, match="reweight from an epoch's first step instead .the next is 10"):
        seq.with_reweight(5, (1, 1))
    later = seq.with_reweight(10, (1, 3))  # an epoch's first step: steps before it keep theirs
    for s in range(10):
        assert all(np.array_equal(a, b) for a, b in zip(later.global_batch(s), seq.global_batch(s)))


def test_single_dataset_cannot_be_reweighted():
    seq = SampleSequence(EpochOrder([30], seed=0), global_batch_size=5)
    with pytest.raises(ConfigError, match="reweight needs a mixture"):
        seq.with_reweight(0, (1,))


@pytest.mark.parametrize("rows,message", [
    ([[3]], "reweights must be a list of \\[int, int, ...\\]"),  # no count at all
    ([[3, 0, 0]], "gives every stream 0 slots"),
    ([[3, -1, 2]], "reweight count must be >= 0"),
    ([[3, 1.5]], "reweights must be a list"),
])
def test_malformed_reweight_rows_are_refused(rows, message):
    state = {**Ledgers().to_state(), "reweights": rows}
    with pytest.raises(ConfigError, match=message):
        Ledgers.from_state(state)


def test_ledger_rows_are_canonical_and_old_states_lack_them():
    ledgers = Ledgers(reweights=[(9, 2, 3, 0), (4, 1, 0)])
    assert ledgers.reweights == ((4, 1), (9, 2, 3))  # trailing zeros dropped, sorted by step
    assert ledgers.to_state()["reweights"] == [[4, 1], [9, 2, 3]]
    old = Ledgers().to_state()
    del old["reweights"], old["quarantine"]  # a state from before both ledgers
    assert Ledgers.from_state(old) == Ledgers()
