"""The ladder as a state machine, the journal round trip, and the guard on synthetic streams."""

from __future__ import annotations

import json
import math
import os

import pytest

from streamshard.errors import ConfigError, CorruptionError
from streamshard.recovery import exitcodes
from streamshard.recovery.detectors import PersistenceConfig, SpikeConfig
from streamshard.recovery.guard import GuardConfig, Recovery
from streamshard.recovery.health import FakeProbe
from streamshard.recovery.journal import Journal, last_exit
from streamshard.recovery.policy import (
    PROCEED, CheckpointRef, Exit, Ledger, PolicyConfig, Rollback, SkipUpdate, decide_persistent,
)

POLICY = PolicyConfig(rollback_margin=10, skip_before=2, skip_after=1, lr_factor=0.5, repeat_window=20,
                      max_retries=3, max_rollbacks=10)
CKPTS = [CheckpointRef(s, s + 1000) for s in (0, 20, 40, 60, 80)]  # data step = step + 1000


def spike(ledger, first, last, ckpts=CKPTS, cfg=POLICY):
    return decide_persistent(ledger, cfg, first=(first, first + 1000), last=(last, last + 1000),
                             checkpoints=ckpts, reason="loss spike")


def test_ladder_state_machine():
    ledger = Ledger()
    # rung 2: first persistent spike at 55..57 -> newest checkpoint <= 45 is 40; skip data window
    a, ledger, ev = spike(ledger, 55, 57)
    assert a == Rollback(40, (1053, 1059), 1.0, None, 1, a.reason)
    assert ledger.skips == ((1053, 1059),) and ledger.lr_scale == 1.0 and ledger.generation == 1
    # checkpoint 60 (saved after 40 in generation 0) is now invalid; 40 and older stay valid
    assert [c.step for c in ledger.valid(CKPTS)] == [0, 20, 40]
    # rung 3: again in the same region (within repeat_window) -> LR halves, reseed after the window
    a, ledger, _ = spike(ledger, 61, 63, ckpts=[*CKPTS[:3], CheckpointRef(50, 1050, generation=1)])
    assert isinstance(a, Rollback) and a.attempt == 2 and a.lr_scale == 0.5
    assert a.to_step == 50  # a checkpoint of the new generation, >= 10 steps before 61
    assert a.reseed == (a.skip[1], 2)
    a, ledger, _ = spike(ledger, 58, 60)
    assert isinstance(a, Rollback) and a.attempt == 3 and a.lr_scale == 0.25
    # rung 4: the fourth attempt in the region exceeds max_retries=3 -> do not requeue
    a, ledger, ev = spike(ledger, 59, 61)
    assert a == Exit(exitcodes.DO_NOT_REQUEUE, a.reason) and "max_retries=3" in a.reason
    assert ledger.terminal == (exitcodes.DO_NOT_REQUEUE, a.reason)


def test_new_region_starts_over():
    _, ledger, _ = spike(Ledger(), 55, 57)
    a, ledger, _ = spike(ledger, 200, 202, ckpts=[CheckpointRef(180, 1180, 1)])
    assert a.attempt == 1 and a.lr_scale == 1.0 and a.reseed is None
    assert len(ledger.regions) == 2


# (name, checkpoints, first anomalous step, expected target or None for Exit)
TARGET_TABLE = [
    # the newest checkpoint at least margin (10) before the spike
    ("margin", CKPTS, 55, 40),
    # exactly margin before is allowed
    ("exact_margin", CKPTS, 50, 40),
    # none far enough back: fall back to the newest at or before the spike
    ("fallback", [CheckpointRef(50, 1050)], 55, 50),
    # a checkpoint at the first anomalous step holds the state before it: allowed
    ("at_first", [CheckpointRef(55, 1055)], 55, 55),
    # only checkpoints after the spike: nothing to roll back to -> exit
    ("none_before", [CheckpointRef(60, 1060)], 55, None),
    # no checkpoint at all -> exit
    ("no_ckpt", [], 55, None),
]


@pytest.mark.parametrize("name, ckpts, first, target", TARGET_TABLE, ids=[r[0] for r in TARGET_TABLE])
def test_rollback_target_table(name, ckpts, first, target):
    a, _, _ = spike(Ledger(), first, first + 2, ckpts=ckpts)
    if target is None:
        assert isinstance(a, Exit) and a.code == exitcodes.DO_NOT_REQUEUE
    else:
        assert isinstance(a, Rollback) and a.to_step == target
        assert a.skip[0] >= ckpts[[c.step for c in ckpts].index(target)].data_step  # never before the ckpt


def test_max_rollbacks_bounds_the_job():
    cfg = PolicyConfig(rollback_margin=0, repeat_window=0, max_rollbacks=2)
    ledger = Ledger()
    for i in range(2):
        a, ledger, _ = spike(ledger, 100 * (i + 1), 100 * (i + 1) + 2, ckpts=[CheckpointRef(0, 0)], cfg=cfg)
        assert isinstance(a, Rollback)
    a, ledger, _ = spike(ledger, 500, 502, ckpts=[CheckpointRef(0, 0)], cfg=cfg)
    assert isinstance(a, Exit) and "max_rollbacks=2" in a.reason


def test_ledger_json_and_merge_are_idempotent():
    _, ledger, _ = spike(Ledger(), 55, 57)
    _, ledger, _ = spike(ledger, 58, 60, ckpts=CKPTS[:3])
    again = Ledger.from_json(json.loads(json.dumps(ledger.to_json())))
    assert again == ledger
    assert ledger.merge(ledger) == ledger
    assert Ledger().merge(ledger).skips == ledger.skips
    with pytest.raises(ConfigError, match="malformed"):
        Ledger.from_json({"skips": 3})


@pytest.mark.parametrize("kwargs, match", [
    ({"lr_factor": 0}, "lr_factor"), ({"rollback_margin": -1}, "rollback_margin"), ({"max_retries": 0}, "max_retries"),
])
def test_policy_config_validation(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        PolicyConfig(**kwargs)


# ---- journal --------------------------------------------------------------------------------


def test_journal_round_trip_restores_ledger(tmp_path):
    j = Journal(tmp_path / "j.jsonl")
    ledger = Ledger()
    for first, last, ckpts in [(55, 57, CKPTS), (58, 60, CKPTS[:3])]:
        _, ledger, ev = spike(ledger, first, last, ckpts)
        j.append(ev.pop("event"), **ev)
    j.append("fault", key="kill@3-3:rank1", step=3)
    assert Journal(tmp_path / "j.jsonl").ledger() == ledger
    assert Journal(tmp_path / "j.jsonl").fired() == {"kill@3-3:rank1"}
    # restoring twice (a second restart) gives the same ledger: idempotent
    assert Journal(tmp_path / "j.jsonl").ledger() == Journal(tmp_path / "j.jsonl").ledger()


def test_journal_torn_lines_never_block_a_start(tmp_path):
    j = Journal(tmp_path / "j")
    j.append("start", step=0)
    with open(j.file, "ab") as f:
        f.write(b'{"v":1,"event":"rollb')  # SIGKILL in the middle of a write
    assert [r["event"] for r in j.records()] == ["start"]
    # the restarted process appends after the torn piece: the torn line is now in the middle
    j2 = Journal(tmp_path / "j")
    j2.append("done", step=1)
    with open(j.file, "ab") as f:
        f.write(b'{"v":99,"event":"x"}\n[1,2]\n')  # a record of another version, a non-object
    assert [r["event"] for r in j2.records()] == ["start", "done"]


def test_journal_one_file_per_rank_merged_by_time(tmp_path):
    clock = iter([5.0, 1.0, 3.0]).__next__
    a, b = Journal(tmp_path / "j", rank=0, clock=clock), Journal(tmp_path / "j", rank=3, clock=clock)
    a.append("late")
    b.append("early")
    a.append("middle")
    assert sorted(p.name for p in (tmp_path / "j").iterdir()) == ["rank0.jsonl", "rank3.jsonl"]
    assert [(r["event"], r["rank"]) for r in Journal(tmp_path / "j").records()] == [
        ("early", 3), ("middle", 0), ("late", 0)]


def test_last_exit(tmp_path):
    j = Journal(tmp_path / "j.jsonl")
    assert last_exit(j.path) is None
    j.append("hang", code=exitcodes.HANG, phase="step")
    j.append("exit", code=exitcodes.REPLACE_NODE, reason="xid")
    assert last_exit(j.path) == exitcodes.REPLACE_NODE


# ---- guard ----------------------------------------------------------------------------------


def guard_cfg() -> GuardConfig:
    return GuardConfig(loss=SpikeConfig(window=32, threshold=6.0, min_samples=8), grad_norm=None,
                       persistence=PersistenceConfig(3), policy=POLICY)


def feed(guard, losses, start=0, data_offset=1000):
    return [guard.observe(start + i, data_step=start + i + data_offset, loss=x) for i, x in enumerate(losses)]


def test_guard_ladder_end_to_end(tmp_path):
    j = Journal(tmp_path / "j.jsonl")
    g = Recovery(guard_cfg(), journal=j, checkpoints=lambda: CKPTS)
    base = [2.0 + 0.01 * ((i * 7) % 5) for i in range(55)]
    acts = feed(g, base)
    assert all(a is PROCEED for a in acts)
    # one NaN: skip that update only
    assert isinstance(g.observe(55, data_step=1055, loss=math.nan), SkipUpdate)
    assert g.observe(56, data_step=1056, loss=2.01) is PROCEED
    # three spikes in a row: skip, skip, rollback
    acts = feed(g, [20.0, 21.0, 22.0], start=57)
    assert isinstance(acts[0], SkipUpdate) and isinstance(acts[1], SkipUpdate) and isinstance(acts[2], Rollback)
    # data steps of 57..59 are 1057..1059; window [1057 - skip_before, 1059 + 1 + skip_after)
    assert acts[2].to_step == 40 and acts[2].skip == (1055, 1061)
    # a restarted process rebuilds the same ledger from the journal
    g2 = Recovery(guard_cfg(), journal=Journal(j.path), checkpoints=lambda: CKPTS)
    assert g2.ledger == g.ledger and g2.startup() is None
    events = [r["event"] for r in j.records()]
    assert events == ["skip_update", "skip_update", "skip_update", "rollback"]


def test_guard_applies_ledger_to_loader_idempotently():
    class RecordingLoader:  # records what the guard asks the loader to do
        def __init__(self):
            self.calls = []

        def skip(self, a, b):
            self.calls.append(("skip", a, b))

        def reseed_from(self, s, salt):
            self.calls.append(("reseed", s, salt))

    g = Recovery(guard_cfg())
    _, g.ledger, _ = spike(g.ledger, 55, 57)
    _, g.ledger, _ = spike(g.ledger, 58, 60, ckpts=CKPTS[:3])
    loader = RecordingLoader()
    g.apply_to_loader(loader)
    assert loader.calls == [("skip", *g.ledger.skips[0]), ("skip", *g.ledger.skips[1]),
                            ("reseed", *g.ledger.reseeds[0])]


def test_guard_terminal_decision_survives_restart(tmp_path):
    j = Journal(tmp_path / "j.jsonl")
    j.append("exit", code=exitcodes.DO_NOT_REQUEUE, reason="retries spent")
    g = Recovery(guard_cfg(), journal=j)
    assert g.startup() == Exit(exitcodes.DO_NOT_REQUEUE, "retries spent")
    assert isinstance(g.observe(0, data_step=0, loss=1.0), Exit)


def test_guard_fake_xid_gives_replace_node(tmp_path):
    j = Journal(tmp_path / "j.jsonl")
    g = Recovery(guard_cfg(), journal=j)
    probe = FakeProbe()
    assert g.observe_health(3, probe.poll()) is PROCEED
    probe.inject_xid(79)
    action = g.observe_health(4, probe.poll())
    assert action == Exit(exitcodes.REPLACE_NODE, action.reason) and "XID 79" in action.reason
    assert last_exit(j.path) == exitcodes.REPLACE_NODE


def test_guard_names_straggler_once(tmp_path):
    j = Journal(tmp_path / "j.jsonl")
    g = Recovery(GuardConfig(), journal=j, world_size=4, log=lambda m: None)
    for i in range(12):
        g.observe_ranks(i, [0.1, 0.1, 0.1, 0.3])
    named = j.events("straggler")
    assert len(named) == 1 and named[0]["ranks"] == [3]


def test_guard_state_dict_round_trip():
    g = Recovery(guard_cfg())
    feed(g, [2.0 + 0.01 * (i % 3) for i in range(20)])
    _, g.ledger, _ = spike(g.ledger, 55, 57)
    h = Recovery(guard_cfg())
    h.load_state_dict(json.loads(json.dumps(g.state_dict())))
    assert h.ledger == g.ledger
    assert h.observe(21, data_step=21, loss=9.0) == g.observe(21, data_step=21, loss=9.0)
    with pytest.raises(ConfigError, match="version"):
        h.load_state_dict({"version": 99})


def test_journal_appends_are_whole_lines_from_many_writers(tmp_path):
    path = tmp_path / "j"
    pids = []
    for r in range(4):
        pid = os.fork()
        if pid == 0:  # child: append 50 records and leave without running pytest teardown
            jr = Journal(path, rank=r)
            for i in range(50):
                jr.append("tick", i=i, pad="x" * 200)
            os._exit(0)
        pids.append(pid)
    for pid in pids:
        assert os.waitpid(pid, 0)[1] == 0
    records = list(Journal(path).records())
    assert len(records) == 200 and {r["rank"] for r in records} == {0, 1, 2, 3}


def test_guard_watches_grad_norm_separately():
    cfg = GuardConfig(loss=SpikeConfig(window=32, min_samples=8), grad_norm=SpikeConfig(window=32, min_samples=8),
                      persistence=PersistenceConfig(3), policy=POLICY)
    g = Recovery(cfg)
    for i in range(20):
        assert g.observe(i, data_step=i, loss=2.0 + 0.01 * (i % 3), grad_norm=1.0 + 0.02 * (i % 4)) is PROCEED
    a = g.observe(20, data_step=20, loss=2.01, grad_norm=50.0)  # the loss looks fine, the gradient does not
    assert isinstance(a, SkipUpdate) and a.reason.startswith("grad_norm spike")
    assert not g.healthy  # a run of anomalies is open: no checkpoint now
    assert g.observe(21, data_step=21, loss=2.0, grad_norm=1.01) is PROCEED and g.healthy


def test_a_rung_before_rollback_can_decide_or_pass():
    from streamshard.recovery.policy import Anomaly, climb, rollback_rung

    seen = []

    def verdict_rung(ledger, cfg, anomaly: Anomaly):  # e.g. forensics: re-run the batch, quarantine it
        seen.append(anomaly)
        if anomaly.first[0] == 55:
            return Exit(exitcodes.DO_NOT_REQUEUE, "forensics says: bad data"), ledger, {"event": "verdict", "x": 1}
        return None

    a = Anomaly((55, 55), (57, 57), "loss spike", tuple(CKPTS))
    action, _, event = climb([verdict_rung], Ledger(), POLICY, a)
    assert isinstance(action, Exit) and event["event"] == "verdict"
    b = Anomaly((60, 60), (62, 62), "loss spike", tuple(CKPTS))
    assert climb([verdict_rung], Ledger(), POLICY, b) == rollback_rung(Ledger(), POLICY, b)  # passed on
    # the guard consults its rungs on a persistent anomaly
    g = Recovery(guard_cfg(), checkpoints=lambda: CKPTS, rungs=[verdict_rung])
    for i in range(20):
        g.observe(i + 40, data_step=i + 40, loss=2.0 + 0.01 * (i % 3))
    for s in (60, 61, 62):
        action = g.observe(s, data_step=s, loss=50.0)
    assert isinstance(action, Rollback) and seen[-1].first == (60, 60)
