"""StreamingDataset / StreamingDataLoader: global order, exactly-once, and O(1) resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamshard import StateMismatchError, StreamingDataLoader, StreamingDataset, World
from streamshard.testing import assemble_global_batch, assert_resume_equivalent, take

N = 203  # prime, so neither 6 nor 8 divides it: the tail policy is exercised


def ids(batch) -> list[int]:
    return batch["id"].tolist()


def make(path, *, rank=0, world_size=1, G=6, workers=0, **kw):
    ds = StreamingDataset(
        path, global_batch_size=G, seed=kw.pop("seed", 7), world=World(rank, world_size), **kw
    )
    return StreamingDataLoader(ds, num_workers=workers, **({"multiprocessing_context": "fork"} if workers else {}))


def global_batches(path, world_size, steps, G=6, **kw):
    """Reassemble global batches from every rank's device batches (positions from the assignment)."""
    loaders = [make(path, rank=r, world_size=world_size, G=G, **kw) for r in range(world_size)]
    per_rank = [[ids(b) for b in take(loader, steps)] for loader in loaders]
    seq = loaders[0].streaming_dataset.sequence
    return [assemble_global_batch(seq, step, [per_rank[r][step] for r in range(world_size)])
            for step in range(steps)]


@pytest.fixture(scope="module")
def path(id_dataset_factory):
    return id_dataset_factory(N)


def test_global_batches_do_not_depend_on_world_size(path):
    steps = 2 * (N // 6) + 5  # crosses two epoch boundaries
    reference = global_batches(path, 1, steps)
    for world_size in (2, 3, 4, 5, 6):  # 4 and 5 do not divide G = 6: batches of 2 and 1
        assert global_batches(path, world_size, steps) == reference, world_size


def test_each_epoch_serves_every_sample_once_drop_tail(path):
    loader = make(path)
    for epoch in range(3):
        served = [i for b in loader for i in ids(b)]
        assert len(served) == len(set(served)) == (N // 6) * 6  # drop_last: the 5 tail samples
        assert loader.epoch == epoch + 1


def test_pad_tail_serves_all_samples(path):
    loader = make(path, drop_last=False)
    served = [i for b in loader for i in ids(b)]
    assert set(served) == set(range(N))
    assert len(served) == -(-N // 6) * 6  # padded with repeats of the epoch's first samples


def test_shuffle_false_is_dataset_order(path):
    served = [i for b in make(path, shuffle=False) for i in ids(b)]
    assert served == list(range((N // 6) * 6))


def test_epochs_differ_and_seeds_differ(path):
    loader = make(path)
    e0 = [i for b in loader for i in ids(b)]
    e1 = [i for b in loader for i in ids(b)]
    other = [i for b in make(path, seed=8) for i in ids(b)]
    assert e0 != e1 and e0 != other


@pytest.mark.parametrize("at", [0, 1, 5, 33, 34, 35, 70, 101])  # 33 steps/epoch: 33, 34 straddle
def test_resume_equals_tail_of_uninterrupted_run(path, at):
    assert_resume_equivalent(lambda: make(path), at=at, total=110)


def test_resume_at_every_step_small(id_dataset_factory):
    small = id_dataset_factory(23)
    assert_resume_equivalent(lambda: make(small, G=4), at=range(0, 21), total=20)


@pytest.mark.parametrize("resume_world", [3, 4])
def test_resume_with_other_world_size(path, resume_world):
    """Save on 2 ranks, resume on 3 or 4 (4 does not divide G = 6): global batches continue as
    in the uninterrupted run."""
    reference = global_batches(path, 1, 60)
    loaders = [make(path, rank=r, world_size=2) for r in range(2)]
    for loader in loaders:
        take(loader, 40)
    states = [json.loads(json.dumps(l.state_dict())) for l in loaders]
    assert states[0] == states[1]  # identical on every rank
    tails, seq = [], None
    for r in range(resume_world):
        loader = make(path, rank=r, world_size=resume_world)
        loader.load_state_dict(states[0])
        tails.append([ids(b) for b in take(loader, 20)])
        seq = loader.streaming_dataset.sequence
    for step in range(20):
        merged = assemble_global_batch(seq, 40 + step, [tails[r][step] for r in range(resume_world)])
        assert merged == reference[40 + step]


def test_resume_twice_in_a_row_and_into_epoch_three(path):
    reference = [ids(b) for b in take(make(path), 120)]
    a = make(path)
    take(a, 10)
    b = make(path)
    b.load_state_dict(a.state_dict())
    take(b, 60)
    c = make(path)
    c.load_state_dict(b.state_dict())
    c.load_state_dict(b.state_dict())  # loading the same state twice is harmless
    assert c.epoch == 2 and c.step == 70
    assert [ids(x) for x in take(c, 50)] == reference[70:]


def test_iter_before_load_state_dict_continues_from_loaded_state(path):
    reference = [ids(b) for b in take(make(path), 30)]
    saved = make(path)
    take(saved, 20)
    state = saved.state_dict()
    loader = make(path)
    it = iter(loader)
    assert ids(next(it)) == reference[0]
    loader.load_state_dict(state)
    assert ids(next(it)) == reference[20]  # the live iterator re-plans from the loaded step


def test_state_counts_consumed_not_prefetched(path):
    loader = make(path, workers=2)
    it = iter(loader)
    for _ in range(3):
        next(it)
    assert loader.state_dict()["step"] == 3  # workers have prefetched more than 3


def test_state_is_small_json(path):
    state = make(path).state_dict()
    assert json.loads(json.dumps(state)) == state
    assert len(json.dumps(state)) < 1024


@pytest.mark.parametrize(
    "change, key",
    [
        (dict(seed=8), "sequence.seed"),  # other seed: other order
        (dict(G=12), "steps_per_epoch"),  # other global batch size
        (dict(shuffle=False), "sequence.shuffle"),
        (dict(lanes=2), "sequence.lanes"),
    ],
)
def test_load_state_refuses_mismatch_showing_both_values(path, change, key):
    state = make(path).state_dict()
    with pytest.raises(StateMismatchError) as err:
        make(path, **change).load_state_dict(state)
    assert key in str(err.value) and "saved=" in str(err.value) and "live=" in str(err.value)


def test_load_state_refuses_other_dataset(path, id_dataset_factory):
    state = make(path).state_dict()
    with pytest.raises(StateMismatchError, match="fingerprints: saved="):
        make(id_dataset_factory(N, compression=None)).load_state_dict(state)


def test_load_state_refuses_garbage(path):
    loader = make(path)
    with pytest.raises(StateMismatchError, match="version"):
        loader.load_state_dict({"version": 99})
    state = loader.state_dict()
    state["epoch"] = 5
    with pytest.raises(StateMismatchError, match="epoch"):
        loader.load_state_dict(state)


def test_skip_is_never_served_and_idempotent(path):
    reference = [ids(b) for b in take(make(path), 40)]
    loader = make(path)
    loader.skip(5, 9)
    loader.skip(5, 9)
    loader.skip(7, 10)
    assert loader.skips == [(5, 10)]
    got = [ids(b) for b in take(loader, 35)]
    assert got == reference[:5] + reference[10:40]
    resumed = make(path)
    resumed.load_state_dict(loader.state_dict())
    assert resumed.skips == [(5, 10)]


def test_reseed_keeps_exactly_once_and_changes_the_rest(path):
    plain = [ids(b) for b in make(path)]
    loader = make(path)
    loader.reseed_from(10, salt=3)
    loader.reseed_from(10, salt=3)
    assert loader.reseeds == [(10, 3)]
    reseeded = [ids(b) for b in loader]
    assert reseeded[:10] == plain[:10]
    assert reseeded[10:] != plain[10:]
    flat = [i for b in reseeded for i in b]
    assert len(flat) == len(set(flat))
    assert set(flat) | set(range(N)) == set(range(N))


def test_transform_rng_is_world_size_invariant(path):
    def noise(sample, rng):
        return {"id": sample["id"], "noise": float(rng.random())}

    def pairs(world_size):
        out = {}
        for r in range(world_size):
            for b in take(make(path, rank=r, world_size=world_size, transform=noise), 12):
                out.update(zip(b["id"].tolist(), b["noise"].tolist()))
        return out

    assert pairs(1) == pairs(3)


def test_mixture_proportions_and_resume(id_dataset_factory):
    from streamshard import Stream

    a, b = id_dataset_factory(50), id_dataset_factory(400, shard_size="16KB")

    def mk():
        ds = StreamingDataset([Stream(a, weight=1), Stream(b, weight=3)], global_batch_size=8,
                              seed=1, world=World(), epoch_size=400, mixture_block=8)
        return StreamingDataLoader(ds)

    # Sample ids < 50 are ambiguous; tell the streams apart by token length pattern instead:
    # both streams use the same generator, so count by batch composition through the sampler.
    loader = mk()
    seq = loader.streaming_dataset.sequence
    for step in range(10):
        streams, _ = seq.batch(step)
        assert np.bincount(streams, minlength=2).tolist() == [2, 6]
    assert_resume_equivalent(mk, at=[3, 49, 50, 51], total=80)


def test_num_workers_do_not_change_order(path):
    reference = [ids(b) for b in take(make(path), 40)]
    for workers in (1, 2, 3):
        assert [ids(b) for b in take(make(path, workers=workers), 40)] == reference, workers


def test_resume_with_other_num_workers(path):
    assert_resume_equivalent(
        lambda: make(path, workers=2), make_resumed=lambda: make(path, workers=3), at=[7, 34], total=45
    )


@pytest.mark.slow(reason="spawned DataLoader workers re-import torch: ~13 s here")
def test_spawn_and_persistent_workers_across_epochs(path):
    ds = StreamingDataset(path, global_batch_size=6, seed=7, world=World())
    loader = StreamingDataLoader(ds, num_workers=2, persistent_workers=True, multiprocessing_context="spawn")
    reference = [ids(b) for b in take(make(path), 33 * 2 + 10)]
    got = [ids(b) for b in take(loader, 33 * 2 + 10)]  # three iter() calls on the same workers
    assert got == reference
    # A state loaded between iterations reaches persistent workers too.
    loader.load_state_dict(make(path).state_dict())
    assert [ids(b) for b in take(loader, 3)] == reference[:3]


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(min_value=1, max_value=60),
    g=st.sampled_from([1, 2, 3, 4]),
    k=st.integers(min_value=0, max_value=40),
    seed=st.integers(min_value=0, max_value=2**32),
)
def test_property_resume_equals_tail(id_dataset_factory, n, g, k, seed):
    path = id_dataset_factory(n)
    if n < g:
        return
    total = 40

    def mk():
        return StreamingDataLoader(StreamingDataset(path, global_batch_size=g, seed=seed, world=World()))

    assert_resume_equivalent(mk, at=min(k, total), total=total)


def test_default_lanes_are_fixed_by_the_first_run(path):
    """A state saved with other lanes (e.g. 64, the default before lanes were sized for
    locality) loads into a loader whose lanes are left to the default and continues that run's
    sequence; explicit lanes that differ are refused."""
    old = make(path, lanes=3)  # stands for any lanes a first run fixed
    head = [ids(b) for b in take(old, 10)]
    state = json.loads(json.dumps(old.state_dict()))
    tail = [ids(b) for b in take(old, 25)]
    resumed = make(path)  # lanes=None: the default would be another number
    assert resumed.streaming_dataset.sequence.order.lanes != 3
    resumed.load_state_dict(state)
    assert resumed.streaming_dataset.sequence.order.lanes == 3
    assert head and [ids(b) for b in take(resumed, 25)] == tail
    explicit = make(path, lanes=2)
    with pytest.raises(StateMismatchError, match=r"sequence.lanes: saved=3, live=2"):
        explicit.load_state_dict(state)
    assert explicit.streaming_dataset.sequence.order.lanes == 2
