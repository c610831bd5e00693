"""Checkpoints you can trust: manifest checked on load, quarantine and fallback, no crash loop on a
truncated file, retention that keeps the last good one, async save, and the same on S3 (moto)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from streamshard.errors import CorruptionError
from streamshard.recovery.checkpoint import CheckpointManager
from streamshard.recovery.journal import Journal
from streamshard.recovery.manifest import MANIFEST


def make_model(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def step_once(model, opt):
    opt.zero_grad()
    model(torch.randn(3, 4)).pow(2).mean().backward()
    opt.step()


def weights(model):
    return [p.detach().clone() for p in model.parameters()]


def save_three(mgr):
    """Checkpoints 10, 20, 30 of one model; returns the weights at each."""
    model, opt = make_model()
    saved = {}
    for s in (10, 20, 30):
        step_once(model, opt)
        mgr.save(s, model=model, optimizer=opt, data_step=s)
        saved[s] = weights(model)
    mgr.wait()
    return saved


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))


# each row: how the newest checkpoint gets damaged after its save finished
DAMAGE = [
    ("flipped", lambda d: flip_byte(next(d.glob("*.distcp")))),          # bit rot / bad copy: same size
    ("truncated", lambda d: (d / "meta.json").write_bytes((d / "meta.json").read_bytes()[:20])),  # disk full
    ("manifest", lambda d: (d / MANIFEST).write_text("{not json")),     # torn manifest
    ("extra", lambda d: (d / "stray.bin").write_bytes(b"x")),           # a file nobody listed
]


@pytest.mark.parametrize("kind,damage", DAMAGE, ids=[k for k, _ in DAMAGE])
def test_damaged_newest_is_quarantined_and_previous_used(tmp_path, kind, damage):
    journal = Journal(tmp_path / "journal", rank=0)
    mgr = CheckpointManager(str(tmp_path / "ckpt"), keep=5, journal=journal)
    saved = save_three(mgr)
    damage(tmp_path / "ckpt" / "step-000000030")
    with pytest.raises(CorruptionError, match="step-000000030"):
        mgr.load(30, model=make_model(5)[0])
    model, opt = make_model(seed=9)
    info, extra = mgr.load_latest(model=model, optimizer=opt)
    assert info.step == 20 and extra == {}
    assert all(torch.equal(a, b) for a, b in zip(weights(model), saved[20]))
    (q,) = journal.events("checkpoint_quarantined")
    assert q["step"] == 30 and "step-000000030" in q["reason"]
    moved = Path(q["moved_to"])
    assert moved.parent.name == "quarantine" and (moved / "REASON.txt").is_file()
    # a restart (a new manager) does not meet the damaged one again: no crash loop
    again = CheckpointManager(str(tmp_path / "ckpt"), keep=5, journal=journal)
    assert [c.step for c in again.list()] == [10, 20] and again.latest().step == 20
    assert len(journal.events("checkpoint_quarantined")) == 1


def test_all_damaged_means_no_checkpoint_not_a_crash(tmp_path):
    mgr = CheckpointManager(str(tmp_path), keep=5)
    save_three(mgr)
    for d in tmp_path.glob("step-*"):
        flip_byte(d / "meta.json")
    assert mgr.load_latest(model=make_model()[0]) is None
    assert mgr.list() == [] and len(list((tmp_path / "quarantine").iterdir())) == 3


def test_retention_keeps_k_and_never_the_last_good_one(tmp_path):
    mgr = CheckpointManager(str(tmp_path), keep=2)
    model, opt = make_model()
    for s in (10, 20):
        mgr.save(s, model=model, optimizer=opt, data_step=s)
    assert mgr.latest().step == 20  # verified: the last good one is 20
    (tmp_path / "step-000000020" / MANIFEST).unlink()  # ...then its manifest vanishes; 10 is the newest finished
    assert mgr.latest().step == 10  # verified now: the last good one is 10
    for s in (30, 40, 50):
        mgr.save(s, model=model, optimizer=opt, data_step=s)
    assert [c.step for c in mgr.list()] == [10, 40, 50]  # keep=2 plus the last verified one
    assert json.loads((tmp_path / "LAST_GOOD.json").read_text()) == {"step": 10}


def test_async_save_captures_the_state_at_save_time(tmp_path):
    journal = Journal(tmp_path / "journal")
    mgr = CheckpointManager(str(tmp_path / "ckpt"), async_save=True, journal=journal)
    model, opt = make_model()
    step_once(model, opt)
    before = weights(model)
    mgr.save(1, model=model, optimizer=opt, data_step=1)
    for _ in range(3):  # training goes on while the background thread writes
        step_once(model, opt)
    mgr.wait()
    assert mgr.stats["saves"] == 1
    (rec,) = journal.events("checkpoint")
    assert rec["step"] == 1 and rec["total_seconds"] >= rec["seconds"] >= 0 and rec["bytes"] > 0
    other, _ = make_model(seed=3)
    mgr.load(1, model=other)
    assert all(torch.equal(a, b) for a, b in zip(weights(other), before))


@pytest.mark.slow(reason="a moto server and ~60 S3 round trips: ~20 s on the dev box")
def test_s3_checkpoints_through_moto(tmp_path):
    s3fs = pytest.importorskip("s3fs")
    from tests.remote_servers import S3Server, s3_options

    server = S3Server().start()
    try:
        opts = s3_options(server.endpoint)
        server.make_bucket("ckpts")
        journal = Journal(tmp_path / "journal")
        mgr = CheckpointManager("s3://ckpts/run1", keep=2, storage_options=opts, journal=journal)
        saved = save_three(mgr)
        assert not Path("s3:").exists()  # the old bug: a local folder named "s3:"
        fs = s3fs.S3FileSystem(**opts)
        assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls("ckpts/run1")) == [
            "step-000000020", "step-000000030"]
        assert fs.exists(f"ckpts/run1/step-000000030/{MANIFEST}")
        # damage the newest object in place: same size, one byte changed
        name = next(p for p in fs.ls("ckpts/run1/step-000000030") if p.endswith(".distcp"))
        data = bytearray(fs.cat_file(name))
        data[len(data) // 2] ^= 1
        fs.pipe_file(name, bytes(data))
        model, opt = make_model(seed=4)
        info, _ = mgr.load_latest(model=model, optimizer=opt)
        assert info.step == 20 and all(torch.equal(a, b) for a, b in zip(weights(model), saved[20]))
        assert journal.events("checkpoint_quarantined")[0]["moved_to"].startswith("ckpts/run1/quarantine/")
    finally:
        server.stop()
