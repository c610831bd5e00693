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


def test_flagger_needs_a_warm_detector():
    with pytest.raises(ConfigError, match="warmed-up"):
        Flagger([1.0, 2.0], CFG)


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
