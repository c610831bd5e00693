"""CheckpointManager over torch.distributed.checkpoint: round trip, atomicity, pruning, resharding."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from streamshard import StreamingDataLoader, StreamingDataset, World
from streamshard.errors import CorruptionError, StateMismatchError
from streamshard.recovery.checkpoint import CheckpointManager
from streamshard.recovery.policy import CheckpointRef, Ledger
from streamshard.testing import take
from tests.net import free_port


def make_model(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    return model, opt, sched


def train(model, opt, sched, steps):
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(3, 4)).pow(2).mean().backward()
        opt.step()
        sched.step()


@pytest.fixture(scope="module")
def data(id_dataset_factory):
    return id_dataset_factory(200)


def make_loader(data):
    return StreamingDataLoader(StreamingDataset(data, global_batch_size=4, seed=3, world=World()))


def test_round_trip_with_loader_and_rng(tmp_path, data):
    model, opt, sched = make_model()
    train(model, opt, sched, 5)
    loader = make_loader(data)
    take(loader, 7)
    loader.skip(20, 22)
    mgr = CheckpointManager(str(tmp_path))
    saved_loader_state = loader.state_dict()
    torch.manual_seed(1234), random.seed(5), np.random.seed(6)
    mgr.save(5, model=model, optimizer=opt, scheduler=sched, loader=loader, data_step=loader.step, extra={"k": [1]})
    expect_rng = (torch.rand(3), random.random(), np.random.rand())
    expect_next = [b["id"].tolist() for b in take(loader, 20)]

    model2, opt2, sched2 = make_model(seed=99)
    loader2 = make_loader(data)
    torch.manual_seed(0)
    extra = mgr.load(5, model=model2, optimizer=opt2, scheduler=sched2, loader=loader2)
    assert extra == {"k": [1]}
    for a, b in zip(model.state_dict().values(), model2.state_dict().values()):
        assert torch.equal(a, b)
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    for i in s1["state"]:
        for k in s1["state"][i]:
            assert torch.equal(s1["state"][i][k], s2["state"][i][k])
    assert sched2.state_dict() == sched.state_dict()
    got_rng = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(got_rng[0], expect_rng[0]) and got_rng[1:] == expect_rng[1:]
    assert [b["id"].tolist() for b in take(loader2, 20)] == expect_next  # resumes, skip included
    assert loader2.skips == [(20, 22)]
    # nothing of ours is pickled: the metadata is JSON
    meta = json.loads((tmp_path / "step-000000005" / "meta.json").read_text())
    assert meta["data_step"] == 7 and meta["loader"] == json.loads(json.dumps(saved_loader_state))


def test_loader_mismatch_is_refused(tmp_path, data, id_dataset_factory):
    model, opt, sched = make_model()
    mgr = CheckpointManager(str(tmp_path))
    mgr.save(1, model=model, optimizer=opt, loader=make_loader(data), data_step=0)
    other = StreamingDataLoader(StreamingDataset(id_dataset_factory(150), global_batch_size=4, seed=3, world=World()))
    with pytest.raises(StateMismatchError):
        mgr.load(1, model=model, optimizer=opt, loader=other)


def test_unfinished_saves_are_ignored_and_cleaned(tmp_path):
    model, opt, _ = make_model()
    mgr = CheckpointManager(str(tmp_path), keep=5)
    mgr.save(10, model=model, optimizer=opt, data_step=10)
    # a save killed before its manifest was written (files present, no MANIFEST.json)
    mgr.save(30, model=model, optimizer=opt, data_step=30)
    (tmp_path / "step-000000030" / "MANIFEST.json").unlink()
    assert [c.step for c in mgr.list()] == [10]
    assert mgr.latest().step == 10
    with pytest.raises(CorruptionError, match="no manifest"):
        mgr.load(30, model=model)
    mgr.save(40, model=model, optimizer=opt, data_step=40)  # the next save clears the older unfinished one
    assert not (tmp_path / "step-000000030").exists() and mgr.latest().step == 40


def test_keep_last_k_and_prune_invalidated(tmp_path):
    ledger = Ledger()
    mgr = CheckpointManager(str(tmp_path), keep=2, valid=lambda r: ledger.is_valid(r))
    model, opt, _ = make_model()
    for s in (10, 20, 30, 40):
        mgr.save(s, model=model, optimizer=opt, data_step=s)
    assert [c.step for c in mgr.list()] == [30, 40]
    ledger = Ledger(rollbacks=((1, 30),))  # a rollback to 30 invalidates 40 (generation 0)
    assert [r.step for r in mgr.refs()] == [30] and mgr.latest().step == 30
    mgr.save(35, model=model, optimizer=opt, data_step=35, generation=1)
    assert [(c.step, c.generation) for c in mgr.list()] == [(30, 0), (35, 1)]
    assert mgr.list()[0].ref == CheckpointRef(30, 30, 0)


def _save_two_ranks(rank, world_size, port, root, data):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    world = World(rank, world_size)
    model, opt, sched = make_model()
    train(model, opt, sched, 3)  # same seed and inputs per rank: replicated, as after DDP all-reduce
    loader = StreamingDataLoader(StreamingDataset(data, global_batch_size=4, seed=3, world=world))
    take(loader, 6)
    CheckpointManager(root, world=world).save(6, model=model, optimizer=opt, scheduler=sched, loader=loader,
                                              data_step=loader.step)
    dist.destroy_process_group()


def test_saved_at_two_ranks_loads_at_one(tmp_path, data):
    mp.start_processes(_save_two_ranks, args=(2, free_port(), str(tmp_path), data), nprocs=2,
                       start_method="spawn", join=True)
    info = CheckpointManager(str(tmp_path)).latest()
    assert (info.step, info.world_size) == (6, 2)
    assert sorted(p.name for p in Path(info.path).glob("rng-rank*.json")) == ["rng-rank0.json", "rng-rank1.json"]
    model, opt, sched = make_model(seed=42)
    loader = make_loader(data)  # world size 1, same global batch size
    CheckpointManager(str(tmp_path)).load(6, model=model, optimizer=opt, scheduler=sched, loader=loader)
    # every rank trained the same replicated model; the same 3 steps here give the same tensors
    ref_model, ref_opt, ref_sched = make_model()
    train(ref_model, ref_opt, ref_sched, 3)
    for a, b in zip(ref_model.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)
    assert opt.state_dict()["param_groups"] == ref_opt.state_dict()["param_groups"]
    assert sched.state_dict() == ref_sched.state_dict()
    ref_ids = [b["id"].tolist() for b in take(make_loader(data), 10)][6:]
    assert [b["id"].tolist() for b in take(loader, 4)] == ref_ids  # same global batches after resume


def test_model_only_checkpoint(tmp_path):
    model, _, _ = make_model()
    mgr = CheckpointManager(str(tmp_path))
    mgr.save(1, model=model, data_step=0)
    other, _, _ = make_model(seed=7)
    assert mgr.load(1, model=other) == {}
    for a, b in zip(model.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b)
