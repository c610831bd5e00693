"""SampleSequence: world-size invariance, exactly-once epochs, skips, reseeds, locality."""

from __future__ import annotations

import json
import pickle
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamshard.errors import ConfigError
from streamshard.sampler import EpochOrder, Permutation, SampleSequence, derive_key

SETTINGS = settings(max_examples=25, deadline=None)
SIZES = [37, 0, 41, 8, 50, 29, 33, 1, 44, 40, 12, 30]  # N = 325, 12 shards, some tiny
WORLD_SIZES = (1, 2, 3, 4, 6)


def make(g=12, drop_last=True, lanes=4, window=None, seed=3, sizes=SIZES):
    order = EpochOrder(sizes, seed=seed, lanes=lanes, window=window)
    return SampleSequence(order, global_batch_size=g, drop_last=drop_last)


def epoch_samples(seq: SampleSequence, epoch: int) -> np.ndarray:
    steps = range(epoch * seq.steps_per_epoch, (epoch + 1) * seq.steps_per_epoch)
    return np.concatenate([seq.global_batch(s)[1] for s in steps])


def rank_parts(seq: SampleSequence, step: int, world: int, local: int = 1) -> list[np.ndarray]:
    return [seq.batch(step, d, world, local)[1] for d in range(world)]


@pytest.mark.parametrize("drop_last", [True, False])
def test_global_batches_identical_for_every_world_size(drop_last):
    seq = make(drop_last=drop_last)
    for step in (0, 1, seq.steps_per_epoch - 1, seq.steps_per_epoch, 5 * seq.steps_per_epoch + 3):
        streams, want = seq.global_batch(step)
        for world, local in [(1, 1), (2, 1), (3, 1), (4, 2), (5, 1), (6, 3), (7, 2), (12, 4), (13, 4)]:
            parts = rank_parts(seq, step, world, local)
            sizes = [len(p) for p in parts]
            assert max(sizes) - min(sizes) <= 1 and sum(sizes) == 12, (world, sizes)
            # the ranks' positions partition the step's positions; the samples are the global batch
            positions = np.concatenate([seq.device_positions(step, d, world, local)
                                        for d in range(world)])
            assert sorted(positions.tolist()) == sorted(seq.step_positions(step).tolist())
            assert sorted(np.concatenate(parts).tolist()) == sorted(want.tolist()), (step, world)
            if drop_last:  # ranks are disjoint (pad may repeat samples inside a step)
                assert len(set(np.concatenate(parts).tolist())) == len(want)
        assert (streams == 0).all()


@SETTINGS
@given(sizes=st.lists(st.integers(0, 30), min_size=1, max_size=12).filter(lambda s: sum(s) > 0),
       g=st.integers(1, 40), drop_last=st.booleans(), lanes=st.none() | st.integers(1, 8),
       epoch=st.integers(0, 50))
def test_every_epoch_serves_each_sample_once(sizes, g, drop_last, lanes, epoch):
    n = sum(sizes)
    if drop_last and g > n:
        with pytest.raises(ConfigError, match=f"E={n} and global_batch_size G={g}"):
            make(g=g, drop_last=True, lanes=lanes, sizes=sizes)
        return
    seq = make(g=g, drop_last=drop_last, lanes=lanes, sizes=sizes)
    got = epoch_samples(seq, epoch)
    if drop_last:  # exactly E - E % G distinct samples, none twice
        assert len(got) == n - n % g and len(set(got.tolist())) == len(got)
    else:  # every sample at least once; the pad repeats the epoch's first served samples
        assert len(got) == seq.steps_per_epoch * g
        assert set(got.tolist()) == set(range(n))
        assert np.array_equal(got[n:], got[: len(got) - n])


def test_steps_and_errors():
    assert make(g=12).steps_per_epoch == 325 // 12
    assert make(g=12, drop_last=False).steps_per_epoch == 28
    # any world size: 12 on 5 ranks is 3, 3, 2, 2, 2 (ranks round-robin over nodes get the +1)
    assert [len(make(g=12).batch(0, d, 5)[1]) for d in range(5)] == [3, 3, 2, 2, 2]
    assert [len(make(g=12).batch(0, d, 5, 2)[1]) for d in range(5)] == [3, 2, 3, 2, 2]
    with pytest.raises(ConfigError, match="rank must be < world_size=2, got 2"):
        make().batch(0, 2, 2)
    with pytest.raises(ConfigError, match="global_batch_size must be positive, got 0"):
        make(g=0)


def test_device_positions_partition_the_step_and_pad_wraps():
    seq = make(g=12, drop_last=False)
    parts = [seq.device_positions(1, d, 3).tolist() for d in range(3)]
    assert sorted(sum(parts, [])) == list(range(12, 24))
    assert all(p == sorted(p) and len(p) == 4 for p in parts)
    last = seq.steps_per_epoch - 1  # positions 324..335 of E = 325 wrap to 324, 0..10
    assert seq.device_positions(last, 0, 1).tolist() == [324] + list(range(11))
    assert seq.step_positions(last).tolist() == [324] + list(range(11))


def lane_shards(order: EpochOrder, epoch: int, lane: int) -> set[int]:
    """Shards overlapping lane's run of the shuffled space (slots from the shard Permutation)."""
    sizes = order.shard_sizes
    perm = Permutation(order.num_shards, derive_key(order.seed, epoch, "shards"))
    slots = perm(np.arange(order.num_shards))
    cum = np.concatenate([[0], np.cumsum(sizes[slots])])
    q, r = divmod(order.size, order.lanes)
    start = lane * q + min(lane, r)
    stop = start + q + (lane < r)
    return {int(slots[i]) for i in range(len(slots))
            if sizes[slots[i]] and cum[i] < stop and cum[i + 1] > start}


@pytest.mark.parametrize("world", [1, 2, 4, 8])
def test_device_reads_only_its_lanes(world):
    # D | L and L | G, one rank per node: rank d reads exactly the lanes its node owns.
    order = EpochOrder([64] * 32, seed=8, lanes=8, window=16)
    seq = SampleSequence(order, global_batch_size=16)
    _, owner = seq.assignment(world).lane_line()
    for epoch in (0, 3):
        for d in range(world):
            lanes = np.nonzero(owner == d)[0].tolist()
            assert len(lanes) == 8 // world
            allowed = set().union(*(lane_shards(order, epoch, l) for l in lanes))
            steps = range(epoch * seq.steps_per_epoch, (epoch + 1) * seq.steps_per_epoch)
            touched = {int(s) for step in steps
                       for s in order.shard_of(seq.batch(step, d, world)[1])}
            assert touched <= allowed
            assert len(touched) >= len(allowed) - 2  # and it does read them (not vacuous)


def test_working_set_bound():
    order = EpochOrder([64] * 32, seed=8, lanes=8, window=16)
    seq = SampleSequence(order, global_batch_size=48)
    # lanes read x (a window of 16 touches <= ceil(15/64) + 1 = 2 shards; +1 next).
    assert [seq.working_set_shards(0, d) for d in (1, 2, 4, 8)] == [24, 12, 6, 3]
    for world in (3, 4, 5):
        for step in range(0, 2 * seq.steps_per_epoch):
            for d in range(world):
                shards = set(order.shard_of(seq.batch(step, d, world)[1]).tolist())
                assert len(shards) <= seq.working_set_shards(d, world)
    plain = SampleSequence(EpochOrder([10] * 50, seed=0, shuffle=False), global_batch_size=25)
    assert plain.working_set_shards(0, 1) == 4 + 1  # 25 consecutive samples touch <= 4 shards


# -- skips ----------------------------------------------------------------------------------
SKIP_LEDGERS = [
    # (ranges added, normalized ledger)
    ([(3, 5)], ((3, 5),)),
    ([(3, 5), (3, 5)], ((3, 5),)),                 # the same range twice: idempotent
    ([(3, 5), (4, 9)], ((3, 9),)),                 # overlapping ranges unite
    ([(3, 5), (5, 7)], ((3, 7),)),                 # adjacent ranges merge
    ([(10, 12), (1, 2)], ((1, 2), (10, 12))),      # sorted whatever the insertion order
    ([(4, 4)], ()),                                # an empty range skips nothing
    ([(2, 20), (5, 6)], ((2, 20),)),               # a contained range changes nothing
]


@pytest.mark.parametrize("ranges,ledger", SKIP_LEDGERS)
def test_skip_ledger_normalization(ranges, ledger):
    seq = make()
    for start, stop in ranges:
        seq = seq.with_skip(start, stop)
    assert seq.skips == ledger
    for start, stop in ranges:  # re-adding anything already there is a no-op
        assert seq.with_skip(start, stop).skips == ledger
    with pytest.raises(ConfigError, match=r"start <= stop, got \[5, 4\)"):
        seq.with_skip(5, 4)


@SETTINGS
@given(ranges=st.lists(st.tuples(st.integers(0, 60), st.integers(0, 15)), max_size=6),
       start=st.integers(0, 70), n=st.integers(0, 40))
def test_served_steps_skip_and_nth_agree(ranges, start, n):
    seq = make()
    for a, length in ranges:
        seq = seq.with_skip(a, a + length)
    skipped = {s for a, length in ranges for s in range(a, a + length)}
    served = list(seq.served_steps(start, 200))
    assert served == [s for s in range(start, 200) if s not in skipped]
    assert seq.next_served_step(start) == served[0]
    assert seq.nth_served_step(start, n) == served[n]
    # worker w of W serves nth_served_step(start, w + W*i): the workers partition the steps
    workers = 3
    shares = [[seq.nth_served_step(start, w + workers * i) for i in range(10)]
              for w in range(workers)]
    assert sorted(s for share in shares for s in share) == served[: workers * 10]
    # served_run: the same steps in bulk, cut at the count and at the stop
    for count, stop in ((n, 200), (n, start + n // 2), (0, 200)):
        assert seq.served_run(start, count, stop) == [s for s in served if s < stop][:count]


# -- reseeds --------------------------------------------------------------------------------
def test_reseed_keeps_exactly_once_and_the_past():
    seq = make(g=12)
    s = seq.steps_per_epoch  # 27 steps per epoch
    r = 2 * s + 9
    new = seq.with_reseed(r, salt=77)
    for epoch in (2, 3, 4):
        got = epoch_samples(new, epoch)
        assert len(set(got.tolist())) == len(got) == 324
    for step in range(2 * s, r):  # before the reseed: unchanged
        assert np.array_equal(new.global_batch(step)[1], seq.global_batch(step)[1])
    after = [step for step in range(r, 3 * s)
             if not np.array_equal(new.global_batch(step)[1], seq.global_batch(step)[1])]
    assert len(after) >= (3 * s - r) - 2
    # positions [p0, E) (dropped tail included) hold the same set of samples, reordered
    tail = np.arange(9 * 12, seq.epoch_size)
    samples_at = lambda q: set(q.map_positions(2, tail)[1].tolist())
    assert samples_at(new) == samples_at(seq)
    # later epochs use a derived seed: differ from the un-reseeded run, and equal that order
    assert not np.array_equal(epoch_samples(new, 3), epoch_samples(seq, 3))
    derived = SampleSequence(seq.order.reseeded(derive_key(3, 77)), global_batch_size=12)
    assert np.array_equal(epoch_samples(new, 4), epoch_samples(derived, 4))
    # earlier epochs untouched
    assert np.array_equal(epoch_samples(new, 1), epoch_samples(seq, 1))


def test_reseed_preserves_lanes_and_matches_reference():
    seq = make(g=12, lanes=4)
    r, salt = 5, 99
    new = seq.with_reseed(r, salt)
    e, p0, lanes = seq.epoch_size, 5 * 12, 4
    positions = np.arange(e)
    # reference: class c of [p0, E) permuted by Permutation(n_c, derive_key(salt, "reseed", r, c))
    want = positions.copy()
    for c in range(lanes):
        members = np.arange(p0 + c, e, lanes)
        perm = Permutation(len(members), derive_key(salt, "reseed", r, c))
        want[members] = members[perm(np.arange(len(members)))]
    assert np.array_equal(new.map_positions(0, positions)[1], seq.map_positions(0, want)[1])
    assert np.array_equal(want % lanes, positions % lanes)


def test_reseeds_compose_latest_first_and_are_idempotent():
    seq = make(g=12)
    one = seq.with_reseed(4, 1)
    two = one.with_reseed(9, 2)
    assert two.with_reseed(9, 2).reseeds == two.reseeds == ((4, 1), (9, 2))
    assert seq.with_reseed(9, 2).with_reseed(4, 1).reseeds == two.reseeds
    for step in range(0, 9):  # the second reseed leaves everything before step 9 alone
        assert np.array_equal(two.global_batch(step)[1], one.global_batch(step)[1])
    got = epoch_samples(two, 0)
    assert len(set(got.tolist())) == len(got)
    # composition: the step-9 permutation first, then the step-4 one, on the original order
    pos = np.arange(seq.epoch_size)
    p9 = two._reseed_map(pos, 9, 2)
    assert np.array_equal(two.map_positions(0, pos)[1],
                          seq.map_positions(0, one._reseed_map(p9, 4, 1))[1])


def test_reseed_in_pad_mode_keeps_every_sample():
    seq = make(g=12, drop_last=False).with_reseed(3, 5)
    got = epoch_samples(seq, 0)
    assert set(got.tolist()) == set(range(325))


# -- O(1), state, pickling ------------------------------------------------------------------
def test_far_steps_are_constant_time_and_memory():
    order = EpochOrder(np.full(61_036, 16_384), seed=1)
    seq = SampleSequence(order, global_batch_size=1024).with_reseed(10**9, 5).with_skip(7, 9)
    step = 10**12 // 1024 + 17  # epoch ~1000, position ~10^12 from the start
    ids = seq.batch(step, 3, 8)[1]
    assert len(ids) == 128 and len(set(ids.tolist())) == 128 and ids.max() < order.size


def test_state_fields_are_json_and_pickle_round_trips():
    seq = make().with_skip(2, 4).with_reseed(7, 11)
    fields = seq.state_fields()
    assert json.loads(json.dumps(fields)) == fields
    assert fields["skips"] == [[2, 4]] and fields["reseeds"] == [[7, 11]]
    assert (fields["lanes"], fields["global_batch_size"], fields["kind"]) == (4, 12, "epoch")
    clone = pickle.loads(pickle.dumps(seq))
    assert clone.state_fields() == fields
    assert np.array_equal(clone.batch(40, 1, 2)[1], seq.batch(40, 1, 2)[1])
    rebuilt = SampleSequence(seq.order, global_batch_size=12, skips=fields["skips"],
                             reseeds=fields["reseeds"])
    assert rebuilt.skips == seq.skips and rebuilt.reseeds == seq.reseeds


@SETTINGS
@given(reseeds=st.lists(st.tuples(st.integers(0, 80), st.integers(0, 2**64 - 1)), max_size=4),
       new=st.tuples(st.integers(0, 80), st.integers(0, 99)), drop_last=st.booleans(),
       lanes=st.integers(1, 6))
def test_any_reseed_ledger_keeps_epochs_exact_and_the_past(reseeds, new, drop_last, lanes):
    base = make(g=12, drop_last=drop_last, lanes=lanes)
    for step, salt in reseeds:
        base = base.with_reseed(step, salt)
    seq = base.with_reseed(*new)
    for epoch in range(4):  # S = 27 or 28: steps 0..80 reach epochs 0..2; epoch 3 follows
        positions = np.arange(seq.epoch_size)
        got = seq.map_positions(epoch, positions)[1]
        assert sorted(got.tolist()) == list(range(325))
    # adding a reseed never changes anything served before its step
    for step in range(max(0, new[0] - 3), new[0]):
        assert np.array_equal(seq.global_batch(step)[1], base.global_batch(step)[1])
    # world-size invariance survives reseeds
    want = seq.global_batch(new[0])[1]
    assert sorted(np.concatenate(rank_parts(seq, new[0], 3)).tolist()) == sorted(want.tolist())
