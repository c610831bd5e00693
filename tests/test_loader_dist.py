"""Real torchrun (gloo, CPU) runs: global batches recorded at 2, 3 and 4 processes equal a
single-process reference, a state saved at one world size resumes at another, and two torchrun
agents of 2 processes each (2 nodes) read exactly the samples and shards the planner predicts."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from streamshard import StreamingDataLoader, StreamingDataset, World
from streamshard.blockshuffle import block_groups
from streamshard.capacity import node_shards
from streamshard.reader import open_dataset
from streamshard.sampler import SampleSequence
from streamshard.testing import assemble_global_batch, take
from tests.net import free_port

JOB = os.path.join(os.path.dirname(__file__), "jobs", "loader_job.py")
G = 12  # divisible by 2 and 3, not by 5 (rank batches of 3 and 2 at 5 processes)
ENV = dict(os.environ, OMP_NUM_THREADS="1",
           PYTHONPATH=os.path.dirname(os.path.dirname(JOB)) + "/..")


def torchrun(nproc: int, out: str, *args: str, nnodes: int = 1) -> list[dict]:
    """``nnodes`` torchrun agents of ``nproc`` processes each (static rendezvous on loopback)."""
    os.makedirs(out, exist_ok=True)
    port = free_port()
    procs = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
         f"--nnodes={nnodes}", f"--node-rank={node}", "--master-addr=127.0.0.1",
         f"--master-port={port}", JOB, "--out", out, *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
        for node in range(nnodes)]
    try:
        outputs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outputs)
    return [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in range(nproc * nnodes)]


def sequence_of(data: str) -> SampleSequence:
    return StreamingDataset(data, global_batch_size=G, seed=11, world=World()).sequence


def merge(records: list[dict], seq: SampleSequence) -> tuple[list[int], list[list[int]]]:
    """Put rank batches back into global batches at the positions the rank split gives them."""
    steps = records[0]["steps"]
    assert all(r["steps"] == steps for r in records), "ranks disagree on the step sequence"
    local = records[0]["world"][3]
    return steps, [assemble_global_batch(seq, step, [rec["ids"][i] for rec in records],
                                         local_world_size=local)
                   for i, step in enumerate(steps)]


@pytest.fixture(scope="module")
def data(id_dataset_factory):
    return id_dataset_factory(301, shard_size="512B")  # ~10 shards: lanes and nodes matter


@pytest.fixture(scope="module")
def reference(data):
    loader = StreamingDataLoader(StreamingDataset(data, global_batch_size=G, seed=11, world=World()))
    return [b["id"].tolist() for b in take(loader, 40)]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, data):
    """One 2-process torchrun of 40 steps that also saves its state after 17: the 2-rank case of
    the equality test and the start of the resume test (one job start instead of two)."""
    tmp = tmp_path_factory.mktemp("two")
    state = str(tmp / "state.json")
    records = torchrun(2, str(tmp / "run"), "--data", data, "--global-batch", str(G), "--steps", "40",
                       "--workers", "0", "--save-at", "17", "--save", state)
    return records, state


@pytest.mark.slow(reason="real torchrun with gloo process groups")
@pytest.mark.parametrize("nproc, workers", [(2, 0), (3, 2), (5, 0)])
def test_torchrun_matches_single_process(request, tmp_path, data, reference, nproc, workers):
    if nproc == 2:
        records = request.getfixturevalue("two_ranks")[0]
    else:
        records = torchrun(nproc, str(tmp_path / "run"), "--data", data, "--global-batch", str(G),
                           "--steps", "40", "--workers", str(workers))
    assert [len(r["ids"][0]) for r in records] == sequence_of(data).assignment(nproc).rank_sizes().tolist()
    steps, batches = merge(records, sequence_of(data))
    assert steps == list(range(40))  # 25 steps per epoch: crosses an epoch boundary
    assert batches == reference


@pytest.mark.slow(reason="real torchrun with gloo process groups")
def test_torchrun_save_at_two_resume_at_three(tmp_path, data, reference, two_ranks):
    state = two_ranks[1]  # saved by 2 ranks after 17 global batches
    records = torchrun(3, str(tmp_path / "b"), "--data", data, "--global-batch", str(G),
                       "--steps", "23", "--load", state, "--workers", "1")
    steps, batches = merge(records, sequence_of(data))
    assert steps == list(range(17, 40))
    assert batches == reference[17:]


@pytest.mark.slow(reason="two real torchrun agents of two gloo processes")
def test_two_agents_of_two_read_what_the_planner_predicts(tmp_path, data, reference):
    """2 nodes x 2 ranks (LOCAL_WORLD_SIZE=2 from torchrun): every rank reads exactly its part
    of the split, and each node only shards the planner lists for it."""
    steps_per_epoch = sequence_of(data).steps_per_epoch
    records = torchrun(2, str(tmp_path / "run"), "--data", data, "--global-batch", str(G),
                       "--steps", str(steps_per_epoch), nnodes=2)
    assert [r["world"] for r in records] == [[0, 4, 0, 2], [1, 4, 1, 2], [2, 4, 0, 2], [3, 4, 1, 2]]
    seq = sequence_of(data)
    for rank, rec in enumerate(records):
        for step, ids in zip(rec["steps"], rec["ids"]):
            assert ids == seq.batch(step, rank, 4, 2)[1].tolist()
    steps, batches = merge(records, seq)
    assert batches == reference[:steps_per_epoch]  # the same global batches as one process
    with open_dataset(data) as ds:
        sizes = [s.samples for s in ds.index.shards]
        offsets = ds.index.offsets
        blocks = block_groups(ds.index)  # the loader's order for compressed shards
    predicted = node_shards(sizes, world_size=4, local_world_size=2, global_batch_size=G, seed=11,
                            blocks=blocks)
    for node in (0, 1):
        ids = np.concatenate([records[r]["ids"] for r in (2 * node, 2 * node + 1)]).ravel()
        shards = np.searchsorted(offsets, ids, side="right") - 1
        assert predicted[node, shards].all(), node
