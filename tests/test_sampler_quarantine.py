"""Quarantine ledger: never served, batches stay full, exactly-once for the rest, history kept."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamshard.errors import ConfigError
from streamshard.sampler import EpochOrder, Ledgers, MixtureOrder, SampleSequence

SETTINGS = settings(max_examples=40, deadline=None)


def make(sizes, g, drop_last=True, lanes=None, seed=5, **ledgers):
    return SampleSequence(EpochOrder(sizes, seed=seed, lanes=lanes), global_batch_size=g,
                          drop_last=drop_last, **ledgers)


def epoch_pairs(seq, epoch):
    steps = range(epoch * seq.steps_per_epoch, (epoch + 1) * seq.steps_per_epoch)
    batches = [seq.global_batch(s) for s in steps]
    assert all(len(b[1]) == seq.global_batch_size for b in batches)  # full batches
    return list(zip(np.concatenate([b[0] for b in batches]).tolist(),
                    np.concatenate([b[1] for b in batches]).tolist()))


sizes_st = st.lists(st.integers(0, 25), min_size=1, max_size=8).filter(lambda s: sum(s) >= 8)


@SETTINGS
@given(sizes=sizes_st, g=st.integers(1, 9), lanes=st.none() | st.integers(1, 5),
       epoch=st.integers(0, 3), data=st.data())
def test_drop_last_fill_keeps_exactly_once_and_never_serves_quarantined(sizes, g, lanes, epoch, data):
    n = sum(sizes)
    base = make(sizes, g, lanes=lanes)
    tail = n - base.steps_per_epoch * g
    # Up to tail + 2 entries: beyond the tail the rule falls back to repeats (counted below).
    ids = data.draw(st.lists(st.integers(0, n - 1), unique=True, max_size=tail + 2))
    seq = make(sizes, g, lanes=lanes, quarantine=[(0, i, 0) for i in ids])
    got = [s for _, s in epoch_pairs(seq, epoch)]
    assert not set(got) & set(ids)
    before = {s for _, s in epoch_pairs(base, epoch)}
    assert before - set(ids) <= set(got)  # every innocent sample of the epoch is still served
    repeats = len(got) - len(set(got))
    if len(ids) <= tail:
        assert repeats == 0  # the drop_last tail absorbs every fill: exactly-once
    else:
        assert repeats <= len(ids) - tail


@settings(max_examples=25, deadline=None)
@given(sizes=sizes_st, g=st.integers(3, 9), drop_last=st.booleans(), data=st.data())
def test_adding_an_entry_changes_only_steps_from_its_from_step(sizes, g, drop_last, data):
    n = sum(sizes)
    base = make(sizes, g, drop_last=drop_last)
    horizon = 2 * base.steps_per_epoch
    old = data.draw(st.lists(st.tuples(st.just(0), st.integers(0, n - 1), st.integers(0, horizon)),
                             max_size=4))
    new = (0, data.draw(st.integers(0, n - 1)), data.draw(st.integers(0, horizon)))
    a = make(sizes, g, drop_last=drop_last, quarantine=old)
    b = a.with_quarantine(*new)
    f = min([e[2] for e in b.quarantine if e[:2] == new[:2]])
    for step in range(horizon):
        same = np.array_equal(a.global_batch(step)[1], b.global_batch(step)[1])
        if step < f:
            assert same, step
    if drop_last:  # and from f on the id is gone
        for step in range(f, horizon):
            assert new[1] not in b.global_batch(step)[1].tolist()


@settings(max_examples=15, deadline=None)
@given(sizes=sizes_st, g=st.sampled_from([4, 6, 12]), data=st.data())
def test_world_sizes_agree_on_filled_batches(sizes, g, data):
    n = sum(sizes)
    q = [(0, i, 0) for i in data.draw(st.lists(st.integers(0, n - 1), unique=True, max_size=5))]
    if g > n:
        return
    seq = make(sizes, g, quarantine=q)
    for step in list(range(seq.steps_per_epoch)) + [seq.steps_per_epoch + 1]:
        want = seq.global_batch(step)[1]
        for world in (2, 3, 4, 6):
            if g % world:
                continue
            rebuilt = np.empty_like(want)
            first = seq.step_positions(step)[0]
            for d in range(world):  # put each rank's samples back at its positions
                slots = (seq.device_positions(step, d, world) - first) % seq.epoch_size
                rebuilt[slots] = seq.batch(step, d, world)[1]
            assert np.array_equal(rebuilt, want)


def test_reseed_and_quarantine_compose_exactly_once():
    sizes = [13, 7, 22, 9, 4]  # N = 55, G = 8: S = 6, tail 7
    base = make(sizes, 8, lanes=3)
    victims = base.global_batch(8)[1][:3].tolist()  # epoch 1
    seq = base.with_reseed(7, 11)
    for v in victims:
        seq = seq.with_quarantine(0, v, 6)
    got = [s for _, s in epoch_pairs(seq, 1)]
    assert len(got) == len(set(got)) == 48 and not set(got) & set(victims)


def test_from_step_keeps_history_and_marks_fills():
    seq = make([30, 30], 10)  # N = 60, S = 6, no tail: fills are repeats
    first = seq.global_batch(1)[1]
    q = seq.with_quarantine(0, int(first[4]), 1)
    assert np.array_equal(q.global_batch(0)[1], seq.global_batch(0)[1])
    streams, samples, filled = q.map_positions_marked(0, np.arange(10, 20))
    assert filled.tolist() == [i == 4 for i in range(10)]
    assert samples[4] != first[4] and (samples[np.arange(10) != 4] == np.delete(first, 4)).all()
    late = seq.with_quarantine(0, int(first[4]), 2)  # served at step 1, before from_step 2
    assert np.array_equal(late.global_batch(1)[1], first)


def test_mixture_never_serves_a_quarantined_sample():
    orders = [EpochOrder([20, 20], seed=1), EpochOrder([15, 9], seed=2)]
    seq = SampleSequence(MixtureOrder(orders, [0.6, 0.4], seed=4), global_batch_size=10)
    s0, i0 = (int(x[0]) for x in seq.global_batch(0))
    bad = [(s0, i0, 0), (1, 3, 0)]
    q = seq.with_ledgers(Ledgers(quarantine=bad))
    for step in range(3 * q.steps_per_epoch):
        pairs = set(zip(*(a.tolist() for a in q.global_batch(step))))
        assert not pairs & {(s0, i0), (1, 3)}


def test_every_sample_quarantined_is_a_clear_error():
    seq = make([5, 5], 4, drop_last=False, quarantine=[(0, i, 0) for i in range(10)])
    with pytest.raises(ConfigError, match="all 10 served samples are quarantined"):
        seq.global_batch(0)


@SETTINGS
@given(a=st.lists(st.tuples(st.integers(0, 2), st.integers(0, 50), st.integers(0, 9)), max_size=6),
       b=st.lists(st.tuples(st.integers(0, 2), st.integers(0, 50), st.integers(0, 9)), max_size=6),
       skips=st.lists(st.tuples(st.integers(0, 9), st.integers(10, 20)), max_size=3))
def test_ledgers_merge_is_commutative_and_idempotent(a, b, skips):
    x, y = Ledgers(skips=skips, quarantine=a), Ledgers(quarantine=b, reseeds=[(3, 1)])
    assert x.merged(y) == y.merged(x) == x.merged(y).merged(x)
    assert Ledgers.from_state(x.merged(y).to_state()) == x.merged(y)
    earliest = {}
    for s, i, f in a + b:
        earliest[(s, i)] = min(earliest.get((s, i), f), f)
    assert {e[:2]: e[2] for e in x.merged(y).quarantine} == earliest


@pytest.mark.parametrize("state, message", [
    ({"skips": [], "reseeds": [], "quarantine": [[0, 1]]}, "quarantine must be a list of"),  # short row
    ({"skips": [], "reseeds": [], "quarantine": [[0, 1, True]]}, "quarantine must be"),  # bool is no int
    ({"skips": [], "reseeds": [], "quarantine": [[0, -1, 2]]}, "sample_id"),  # negative id
    ({"skips": []}, "no 'reseeds' ledger"),  # a required ledger missing
])
def test_ledger_state_is_validated(state, message):
    with pytest.raises(ConfigError, match=message):
        Ledgers.from_state(state)


def test_old_state_without_quarantine_reads_as_empty():
    assert Ledgers.from_state({"skips": [[1, 2]], "reseeds": []}) == Ledgers(skips=[(1, 2)])
