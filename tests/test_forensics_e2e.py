"""Spike forensics end to end: the example trainer under torchrun (gloo, CPU).

Data: a poisoned document (one never-seen token repeated) served at data step ~350 makes the loss
spike; the re-run on another rank reproduces it, the run quarantines exactly that sample, trains
the step again with its fill, survives a SIGKILL (restart from a checkpoint older than the
quarantine: the journal brings it back) and a resume on 1 rank instead of 2 that crosses into the
next epoch, where the sample would be served again: it never is, and every other sample is.
Hardware: a fault corrupting one rank's loss and gradients once gives a "hardware" verdict on that
rank, exit 77, a restart, and no quarantine.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from streamshard import StreamingDataLoader, StreamingDataset, World
from streamshard.recovery.forensics import excluded_devices
from streamshard.recovery.journal import Journal
from streamshard.testing import take

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "train_gpt.py"
G, SEED, SAMPLES = 8, 17, 4003  # 500 steps per epoch; 3 tail samples drop_last never serves
# One poisoned document in a global batch of 8 lifts this tiny model's loss only ~x2.6 while its
# healthy steps reach ~x1.9 over the median: below the library's default spike rule (log scale,
# tail_factor 2.5, built not to roll back heavy-tailed healthy losses). The test wants that
# document caught, so it runs the sensitive rule: linear robust z, window 32, threshold 8, no tail.
SPIKE = ["--spike-window", "32", "--spike-threshold", "8", "--spike-tail", "0", "--spike-linear"]
ARGS = ["--lr", "1e-2", "--forensics", "--global-batch", str(G), "--seed", str(SEED), *SPIKE]
pytestmark = pytest.mark.slow(reason="two torchrun jobs of a few hundred steps each (~1 min)")


def example():
    spec = importlib.util.spec_from_file_location("train_gpt", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def loader_of(path) -> StreamingDataLoader:
    return StreamingDataLoader(StreamingDataset(str(path), global_batch_size=G, seed=SEED, world=World(0, 1)))


def torchrun(out, data, *, nproc, faults="", restarts=1, args=()) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           f"--max-restarts={restarts}", str(EXAMPLE), "--data", str(data), "--out", str(out), *ARGS, *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), STREAMSHARD_FAULTS=faults)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env)
    assert proc.returncode == 0, f"rc={proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-4000:]}"
    return proc


def journal(out) -> list[dict]:
    """The merged journal of every rank (one file per rank under ``out/journal``)."""
    return list(Journal(Path(out) / "journal").records())


def final_ids(out) -> dict[int, list[int]]:
    """step -> sorted ids that counted: per rank the last line of a step; of those, the newest
    line alone when it holds a whole global batch (a 1-rank run), else the union over ranks."""
    last: dict[int, list[dict]] = {}
    for f in sorted(Path(out).glob("consumed-rank*.jsonl")):
        per_rank = {}
        for line in f.read_text().splitlines():
            rec = json.loads(line)
            per_rank[rec["step"]] = rec
        for step, rec in per_rank.items():
            last.setdefault(step, []).append(rec)
    out_ids = {}
    for step, recs in sorted(last.items()):
        newest = max(recs, key=lambda r: r["t"])
        out_ids[step] = sorted(newest["ids"] if len(newest["ids"]) == G else [i for r in recs for i in r["ids"]])
    return out_ids


def pick_victim(clean) -> tuple[int, int, int]:
    """A sample served at an epoch-0 step in [330, 400) and an epoch-1 step in [500, 560)."""
    seq = loader_of(clean)._sequence()
    late = {int(i): s for s in range(500, 560) for i in seq.global_batch(s)[1]}
    for step in range(330, 400):
        for i in seq.global_batch(step)[1].tolist():
            if i in late:
                return i, step, late[i]
    raise AssertionError("no sample fits")


def test_poisoned_sample_is_quarantined_exactly_and_never_seen_again(tmp_path):
    mod = example()
    clean = tmp_path / "clean"
    mod.make_data(str(clean), SAMPLES, 16, 64)
    victim, first, again = pick_victim(clean)
    data = tmp_path / "poisoned"
    mod.make_data(str(data), SAMPLES, 16, 64, frozenset({victim}))
    out = tmp_path / "run"
    torchrun(out, data, nproc=2, faults="kill@380:rank1", args=["--steps", "420", "--ckpt-every", "50"])
    torchrun(out, data, nproc=1, args=["--steps", "560", "--ckpt-every", "50"])  # world size 2 -> 1

    events = journal(out)
    verdicts = [e for e in events if e["event"] == "forensics"]
    assert [(v["verdict"], v["culprits"], v["data_step"]) for v in verdicts] == [("data", [[0, victim]], first)]
    assert verdicts[0]["evidence"]["reproduced"] == {"same": True, "other": True}
    assert verdicts[0]["evidence"]["rerun_ranks"] == [verdicts[0]["rank"], 1 - verdicts[0]["rank"]]
    assert [e["entries"] for e in events if e["event"] == "quarantine"] == [[[0, victim, first]]]
    assert not [e for e in events if e["event"] == "rollback"]
    assert len([e for e in events if e["event"] == "skip_update"]) == 1  # the spike, then one retrain
    assert len([e for e in events if e["event"] == "start"]) == 2 * 2 + 1  # 2 ranks, a restart; 1 rank

    got = final_ids(out)
    assert sorted(got) == list(range(560))
    reference = loader_of(data)
    reference.quarantine([(0, victim, first)])
    want = {s: sorted(b["id"].tolist()) for s, b in enumerate(take(reference, 560))}
    assert got == want
    assert all(victim not in ids for ids in got.values())
    plain = {s: sorted(b["id"].tolist()) for s, b in enumerate(take(loader_of(data), 560))}
    assert victim in plain[first] and victim in plain[again]  # it would have been served twice
    for s in range(560):  # only the victim's two positions differ: no innocent sample is lost
        lost = set(plain[s]) - set(got[s])
        assert lost == ({victim} if s in (first, again) else set()), s
    epoch0 = [i for s in range(500) for i in got[s]]
    assert len(epoch0) == len(set(epoch0)) == 500 * G  # exactly once (the fill is a tail sample), full
    meta = json.loads((out / "ckpt" / "step-000000550" / "meta.json").read_text())
    assert meta["loader"]["quarantine"] == [[0, victim, first]]


def test_corrupted_rank_is_hardware_exits_77_and_quarantines_nothing(tmp_path):
    mod = example()
    data = tmp_path / "clean"
    mod.make_data(str(data), SAMPLES, 16, 64)
    out = tmp_path / "run"
    torchrun(out, data, nproc=2, faults="flaky@60:rank1=50", args=["--steps", "90", "--ckpt-every", "25"])
    events = journal(out)
    verdicts = [e for e in events if e["event"] == "forensics"]
    assert [(v["verdict"], v["rank"], v["culprits"]) for v in verdicts] == [("hardware", 1, [])]
    assert verdicts[0]["evidence"]["reproduced"] == {"same": False, "other": False}
    assert [e["code"] for e in events if e["event"] == "exit"] == [77]
    assert not [e for e in events if e["event"] == "quarantine"]
    assert excluded_devices(events) == [(verdicts[0]["host"], 1)]
    meta = json.loads((out / "ckpt" / "step-000000075" / "meta.json").read_text())
    assert meta["loader"]["quarantine"] == [] and meta["step"] == 75
    assert [e["step"] for e in events if e["event"] == "done"] == [90, 90]  # one per rank
