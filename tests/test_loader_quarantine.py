"""Loader quarantine and samples_at: never served, full batches, same on every rank and resume."""

from __future__ import annotations

import json

import pytest

from streamshard import StateMismatchError, StreamingDataLoader, StreamingDataset, World
from streamshard.sampler import Ledgers
from streamshard.testing import assemble_global_batch, take

N = 203  # G = 6: 33 steps per epoch, a tail of 5 positions that drop_last never serves


def make(path, *, rank=0, world_size=1, workers=0):
    ds = StreamingDataset(path, global_batch_size=6, seed=7, world=World(rank, world_size))
    return StreamingDataLoader(ds, num_workers=workers,
                               **({"multiprocessing_context": "fork"} if workers else {}))


@pytest.fixture(scope="module")
def path(id_dataset_factory):
    return id_dataset_factory(N)


def ids(batch) -> list[int]:
    return batch["id"].tolist()


def test_quarantined_samples_are_never_served_and_the_rest_exactly_once(path):
    plain = [i for b in make(path) for i in ids(b)]
    bad = [plain[3], plain[100], plain[-1]]
    for workers in (0, 2):  # the ledger also reaches DataLoader workers through the plan
        loader = make(path, workers=workers)
        loader.quarantine([(0, i, 0) for i in bad])
        served = [i for b in loader for i in ids(b)]
        assert len(served) == len(set(served)) == len(plain)  # full batches, no repeat
        assert not set(served) & set(bad) and set(plain) - set(bad) <= set(served)


def test_quarantine_mid_epoch_keeps_history_and_world_sizes_agree(path):
    reference = make(path)
    head = take(reference, 10)
    upcoming = reference.samples_at(20, keys=False)
    victim = upcoming[2].sample_id
    state = reference.state_dict()
    state["quarantine"] = [[0, victim, 10]]  # as `streamshard quarantine add` writes it
    rebuilt = []
    for world in (1, 3):
        loaders = [make(path, rank=r, world_size=world) for r in range(world)]
        for loader in loaders:
            loader.load_state_dict(json.loads(json.dumps(state)))
        per_rank = [[ids(b) for b in take(loader, 23)] for loader in loaders]
        steps = []
        seq = loaders[0].streaming_dataset.sequence_with(loaders[0]._ledgers)
        for s in range(23):
            step = loaders[0].last_step - 22 + s
            steps.append(assemble_global_batch(seq, step, [per_rank[r][s] for r in range(world)]))
        rebuilt.append(steps)
        assert all(l.state_dict() == loaders[0].state_dict() for l in loaders)
    assert rebuilt[0] == rebuilt[1]
    epoch = [i for b in head for i in ids(b)] + [i for s in rebuilt[0] for i in s]
    assert victim not in epoch[60:] and len(epoch) == len(set(epoch)) == 198
    assert rebuilt[0][10][2] != victim and [r.sample_id for r in upcoming if r.index != 2] == \
        [x for k, x in enumerate(rebuilt[0][10]) if k != 2]


def test_samples_at_reports_what_each_rank_reads_and_fills(path):
    loaders = [make(path, rank=r, world_size=2) for r in range(2)]
    victim = loaders[0].samples_at(4, keys=False)[1].sample_id
    for loader in loaders:
        loader.quarantine([(0, victim, 0)])
    got = [[ids(b) for b in take(loader, 5)][4] for loader in loaders]
    refs = loaders[1].samples_at(4)
    assert [r.keys["id"] for r in refs] == [r.sample_id for r in refs]  # the id column is read
    for ref in refs:
        assert ref.sample_id in got[ref.rank]
        assert ref.filled == (ref.index == 1) and (ref.replaces == (0, victim)) == ref.filled
        assert loaders[0].streaming_dataset.datasets[0].index.locate(ref.sample_id) == (ref.shard, ref.offset)
    assert sorted(loaders[0].samples_between(3, 6)) == [3, 4, 5]


def test_state_carries_the_ledger_and_old_states_load(path):
    loader = make(path)
    loader.quarantine([(0, 5, 2), (0, 5, 9), (0, 1, 0)])  # idempotent: 5 keeps step 2
    state = loader.state_dict()
    assert state["quarantine"] == [[0, 1, 0], [0, 5, 2]] and "quarantine" not in state["sequence"]
    other = make(path)
    other.load_state_dict(json.loads(json.dumps(state)))
    assert other.ledgers == loader.ledgers == Ledgers(quarantine=[(0, 1, 0), (0, 5, 2)])
    old = dict(state)
    del old["quarantine"]  # a state written before the quarantine ledger existed
    other.load_state_dict(old)
    assert other.ledgers.quarantine == ()
    with pytest.raises(StateMismatchError, match="quarantine must be a list of"):
        other.load_state_dict({**state, "quarantine": [[0, 1]]})


@pytest.mark.parametrize("drop_last", [True, False])
def test_ranks_of_match_the_sequence_device_rule_also_on_the_padded_step(drop_last):
    from streamshard.explain import ranks_of
    from streamshard.sampler import EpochOrder, SampleSequence

    seq = SampleSequence(EpochOrder([9, 14, 6], seed=2), global_batch_size=12, drop_last=drop_last)
    for step in (0, seq.steps_per_epoch - 1):  # the last step of a drop_last=False epoch is padded
        _, samples = seq.global_batch(step)
        for world in (1, 2, 3, 4):
            ranks = ranks_of(seq, step, world)
            for r in range(world):
                assert seq.batch(step, r, world)[1].tolist() == samples[ranks == r].tolist()
