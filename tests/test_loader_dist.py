"""Real torchrun (gloo, CPU) runs: global batches recorded at 2 and 3 processes equal a
single-process reference, and a state saved at one world size resumes at another."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from streamshard import StreamingDataLoader, StreamingDataset, World
from streamshard.testing import take
from tests.net import free_port

JOB = os.path.join(os.path.dirname(__file__), "jobs", "loader_job.py")
G = 12  # divisible by 2 and 3


def torchrun(nproc: int, out: str, *args: str) -> list[dict]:
    os.makedirs(out, exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           "--master-addr=127.0.0.1", f"--master-port={free_port()}", JOB, "--out", out, *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.path.dirname(os.path.dirname(JOB)) + "/..")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in range(nproc)]


def merge(records: list[dict]) -> tuple[list[int], list[list[int]]]:
    """Interleave device batches back into global batches (device d holds positions d + D*i)."""
    world = len(records)
    steps = records[0]["steps"]
    assert all(r["steps"] == steps for r in records), "ranks disagree on the step sequence"
    batches = []
    for i in range(len(steps)):
        merged = [None] * G
        for d, rec in enumerate(records):
            merged[d::world] = rec["ids"][i]
        batches.append(merged)
    return steps, batches


@pytest.fixture(scope="module")
def data(id_dataset_factory):
    return id_dataset_factory(301)


@pytest.fixture(scope="module")
def reference(data):
    loader = StreamingDataLoader(StreamingDataset(data, global_batch_size=G, seed=11, world=World()))
    return [b["id"].tolist() for b in take(loader, 40)]


@pytest.mark.slow(reason="real torchrun with gloo process groups")
@pytest.mark.parametrize("nproc, workers", [(2, 0), (3, 2)])
def test_torchrun_matches_single_process(tmp_path, data, reference, nproc, workers):
    records = torchrun(nproc, str(tmp_path / "run"), "--data", data, "--global-batch", str(G),
                       "--steps", "40", "--workers", str(workers))
    steps, batches = merge(records)
    assert steps == list(range(40))  # 25 steps per epoch: crosses an epoch boundary
    assert batches == reference


@pytest.mark.slow(reason="real torchrun with gloo process groups")
def test_torchrun_save_at_two_resume_at_three(tmp_path, data, reference):
    state = str(tmp_path / "state.json")
    torchrun(2, str(tmp_path / "a"), "--data", data, "--global-batch", str(G), "--steps", "17",
             "--save-at", "17", "--save", state)
    records = torchrun(3, str(tmp_path / "b"), "--data", data, "--global-batch", str(G),
                       "--steps", "23", "--load", state, "--workers", "1")
    steps, batches = merge(records)
    assert steps == list(range(17, 40))
    assert batches == reference[17:]
