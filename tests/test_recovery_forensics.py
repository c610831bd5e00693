"""Spike forensics (pure part): suspect, verdict, culprits, bisection, ledger and journal."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamshard import StreamingDataLoader, StreamingDataset, World
from streamshard.errors import ConfigError
from streamshard.recovery import GuardConfig, Journal, Ledger, Recovery, exitcodes
from streamshard.recovery.detectors import SpikeConfig
from streamshard.recovery.forensics import (
    DATA, HARDWARE, UNDECIDED, Flagger, ForensicsConfig, bisect_culprits, excluded_devices, investigate,
    quarantine_event, suspect_rank, verdict_event,
)

CFG = SpikeConfig(window=32, threshold=6.0, min_samples=8)
WINDOW = [2.0 + 0.01 * (i % 5) for i in range(32)]  # a calm loss around 2.02
KEYS = [(0, 100 + i) for i in range(4)]


def flag():
    return Flagger(WINDOW, CFG)


def test_suspect_is_the_largest_local_loss_nan_first():
    assert suspect_rank([2.0, 9.0, 2.1]) == 1
    assert suspect_rank([2.0, 9.0, float("nan")]) == 2
    with pytest.raises(ConfigError):
        suspect_rank([])


def test_data_verdict_names_exactly_the_poisoned_sample():
    poisoned = [2.0, 2.02, 40.0, 2.01]  # sample 2 of rank 1's batch is a bad document
    d = investigate(flag=flag(), local_losses=[2.01, sum(poisoned) / 4], local_counts=[4, 4], keys=KEYS,
                    same=poisoned, other=poisoned)
    assert d.verdict == DATA and d.suspect == 1 and d.culprits == ((0, 102),) and d.exit_code is None
    assert d.evidence["reproduced"] == {"same": True, "other": True}
    assert d.evidence["culprit_losses"] == [40.0]


def test_two_bad_documents_cost_two_samples():
    losses = [30.0, 2.0, 25.0, 2.0]
    d = investigate(flag=flag(), local_losses=[2.0, 14.75], local_counts=[4, 4], keys=KEYS, same=losses,
                    other=losses)
    assert d.verdict == DATA and d.culprits == ((0, 100), (0, 102))


def test_no_reproduction_on_another_rank_is_hardware():
    clean = [2.0, 2.02, 2.01, 2.03]
    d = investigate(flag=flag(), local_losses=[2.01, 80.0, 2.02], local_counts=[4, 4, 4], keys=KEYS,
                    same=clean, other=clean)
    assert d.verdict == HARDWARE and d.suspect == 1 and d.culprits == ()
    assert d.exit_code == exitcodes.REPLACE_NODE and "another rank" in d.evidence["reason"]
    # a device that computes garbage every time: reproduces on itself, not elsewhere -> hardware
    d2 = investigate(flag=flag(), local_losses=[2.01, 80.0], local_counts=[4, 4], keys=KEYS,
                     same=[80.0] * 4, other=clean)
    assert d2.verdict == HARDWARE


def test_single_rank_decides_on_its_own_rerun():
    bad = [2.0, 60.0, 2.0, 2.0]
    one = investigate(flag=flag(), local_losses=[16.5], local_counts=[4], keys=KEYS, same=bad, other=None)
    assert one.verdict == DATA and one.culprits == ((0, 101),)
    gone = investigate(flag=flag(), local_losses=[16.5], local_counts=[4], keys=KEYS, same=[2.0] * 4,
                       other=None)
    assert gone.verdict == HARDWARE


def test_a_whole_bad_batch_is_not_forensics_business():
    bad = [40.0] * 4  # every sample bad: removing max_culprits=2 does not cure it
    d = investigate(flag=flag(), local_losses=[40.0], local_counts=[4], keys=KEYS, same=bad, other=None,
                    cfg=ForensicsConfig(enabled=True, max_culprits=2))
    assert d.verdict == UNDECIDED and d.culprits == ()


def test_a_cold_detector_only_blames_non_finite_samples():
    cold = Flagger([4.1, 4.0], CFG)  # fewer than min_samples=8 values: flags NaN/Inf only
    assert cold(float("nan")) and not cold(400.0)
    nan = [4.0, float("nan"), 4.1, 4.2]
    d = investigate(flag=cold, local_losses=[float("nan")], local_counts=[4], keys=KEYS, same=nan, other=None)
    assert d.verdict == DATA and d.culprits == ((0, 101),) and d.evidence["baseline"] is None
    json.dumps(d.evidence, allow_nan=False)  # journal-safe
    huge = [4.0, 900.0, 4.1, 4.2]  # no baseline yet: a finite outlier is not judged
    d = investigate(flag=cold, local_losses=[228.0], local_counts=[4], keys=KEYS, same=huge, other=None)
    assert d.verdict == UNDECIDED and "does not flag" in d.evidence["reason"]


def test_a_step_flagged_for_its_grad_norm_only_is_not_judged():
    calm = [2.0, 2.01, 2.02, 2.0]  # the loss is normal: another detector fired
    d = investigate(flag=flag(), local_losses=[2.01, 2.0], local_counts=[4, 4], keys=KEYS, same=calm, other=calm)
    assert d.verdict == UNDECIDED and d.exit_code is None


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 64), data=st.data())
def test_bisection_finds_exactly_the_culprits_within_budget(n, data):
    bad = set(data.draw(st.lists(st.integers(0, n - 1), unique=True, max_size=3)))
    calls = []

    def is_bad(group):
        calls.append(len(group))
        return bool(bad & set(group))

    assert bisect_culprits(range(n), is_bad, max_calls=64) == sorted(bad)
    k = max(len(bad), 1)
    assert len(calls) <= 1 + 2 * k * max(1, (n - 1).bit_length())


def test_bisection_budget_is_enforced():
    with pytest.raises(ConfigError, match="max_calls=3"):
        bisect_culprits(range(64), lambda g: True, max_calls=3)


def test_quarantine_event_folds_into_the_ledger_survives_restart_and_reaches_the_loader(
        tmp_path, id_dataset_factory):
    d = investigate(flag=flag(), local_losses=[11.5], local_counts=[4], keys=KEYS, same=[2.0, 40.0, 2, 2],
                    other=None)
    journal = Journal(tmp_path / "j.jsonl")
    guard = Recovery(GuardConfig(), journal=journal)
    guard.record(verdict_event(d, step=30, data_step=41, host="n1"))
    guard.record(quarantine_event(d, step=30, data_step=41))
    guard.record(quarantine_event(d, step=30, data_step=41))  # replayed: idempotent
    assert guard.ledger.quarantine == ((0, 101, 41),)
    again = Recovery(GuardConfig(), journal=Journal(journal.path))  # a restart rebuilds it
    assert again.ledger.quarantine == ((0, 101, 41),)
    assert Ledger.from_json(json.loads(json.dumps(again.ledger.to_json()))) == again.ledger
    old = again.ledger.to_json()
    del old["quarantine"]  # a checkpoint written before this ledger existed
    assert Ledger.from_json(old).merge(again.ledger).quarantine == ((0, 101, 41),)
    loader = StreamingDataLoader(StreamingDataset(id_dataset_factory(203), global_batch_size=6,
                                                  world=World(0, 1)))
    again.apply_to_loader(loader)
    again.apply_to_loader(loader)
    assert loader.state_dict()["quarantine"] == [[0, 101, 41]]


def test_hardware_verdicts_are_listed_for_the_launcher(tmp_path):
    d = investigate(flag=flag(), local_losses=[2.0, 50.0], local_counts=[4, 4], keys=KEYS,
                    same=[2.0] * 4, other=[2.0] * 4)
    journal = Journal(tmp_path / "j.jsonl")
    Recovery(GuardConfig(), journal=journal).record(verdict_event(d, step=9, data_step=9, host="gpu-7"))
    assert excluded_devices(journal.records()) == [("gpu-7", 1)]
    assert Recovery(GuardConfig(), journal=Journal(journal.path)).ledger.quarantine == ()


def test_a_batch_of_merely_hard_samples_costs_no_innocent_sample():
    hard = [5.0, 5.5, 5.2, 5.8]  # all below 3 x baseline (~6.06): reproduces, but no outlier
    d = investigate(flag=flag(), local_losses=[2.0, 5.375], local_counts=[4, 4], keys=KEYS, same=hard,
                    other=hard)
    assert d.verdict == UNDECIDED and d.culprits == () and "3.0 x baseline" in d.evidence["reason"]
    with pytest.raises(ConfigError, match="min_culprit_ratio"):
        ForensicsConfig(min_culprit_ratio=0.5)


def test_investigate_step_and_act_quarantine_rewind_and_retrain(tmp_path, id_dataset_factory):
    from streamshard.recovery.forensics import act, investigate_step
    from streamshard.recovery.policy import SkipUpdate
    from streamshard.recovery import PolicyConfig

    loader = StreamingDataLoader(StreamingDataset(id_dataset_factory(203), global_batch_size=6,
                                                  world=World(0, 1)))
    guard = Recovery(GuardConfig(loss=CFG, grad_norm=None, policy=PolicyConfig()),
                     journal=Journal(tmp_path / "j.jsonl"))
    it = iter(loader)
    for step in range(12):
        next(it)
        assert not isinstance(guard.observe(step, data_step=loader.last_step, loss=2.0 + 0.01 * (step % 3)),
                              SkipUpdate)
    batch = next(it)
    data_step = loader.last_step
    victim = batch["id"].tolist()[4]
    assert isinstance(guard.observe(12, data_step=data_step, loss=9.0), SkipUpdate)

    def rerun(keys):  # the model: sample `victim` is a bad document
        return [40.0 if i == victim else 2.0 for _, i in keys]

    d = investigate_step(guard=guard, loader=loader, data_step=data_step, local_loss=9.0, local_count=6,
                         rank=0, world_size=1, host="h", rerun=rerun, gather=lambda v: [v])
    assert d.verdict == DATA and d.culprits == ((0, victim),) and d.evidence["rerun_ranks"] == [0]
    assert act(d, guard=guard, loader=loader, step=12, data_step=data_step) == "retrain"
    again = next(it)["id"].tolist()  # the same step, served again with the fill
    assert loader.last_step == data_step and victim not in again
    assert [x for k, x in enumerate(again) if k != 4] == [x for k, x in enumerate(batch["id"].tolist()) if k != 4]
    assert guard.healthy and guard.ledger.quarantine == ((0, victim, data_step),)
    assert [r["event"] for r in guard._journal.records()][-2:] == ["forensics", "quarantine"]


@pytest.mark.parametrize("suspect, hosts, want", [
    (0, ["a"], None),  # one rank: no witness
    (1, ["a", "a", "a"], 2),  # one host: the next rank
    (1, ["a", "a", "b", "b"], 2),  # the next rank already sits on another host
    (0, ["a", "a", "b", "b"], 2),  # skip the suspect's node mate
    (3, ["a", "a", "b", "b"], 0),  # wrap around
])
def test_witness_prefers_another_host(suspect, hosts, want):
    from streamshard.recovery.forensics import pick_witness

    assert pick_witness(suspect, hosts) == want
