"""The loader state inside a torch.distributed.checkpoint (DCP) state dict, and torchdata's
Stateful protocol."""

from __future__ import annotations

import json

import pytest
import torch
import torch.utils.data
import torch.distributed.checkpoint as dcp

from streamshard import StreamingDataLoader, StreamingDataset, World
from streamshard.testing import take


def make(path):
    return StreamingDataLoader(StreamingDataset(path, global_batch_size=4, seed=3, world=World()))


def test_stateful_protocol(id_dataset_factory):
    stateful = pytest.importorskip("torchdata.stateful_dataloader")  # in the [test] extra
    loader = make(id_dataset_factory(50))
    assert isinstance(loader, stateful.Stateful)  # a runtime-checkable Protocol
    # map-style: a batch sampler in the main process owns the state, workers hold none
    assert not isinstance(loader.streaming_dataset, torch.utils.data.IterableDataset)
    assert isinstance(loader.streaming_dataset.batch_sampler(), stateful.Stateful)


def test_loader_state_rides_in_dcp_checkpoint(tmp_path, id_dataset_factory):
    path = id_dataset_factory(50)
    reference = [b["id"].tolist() for b in take(make(path), 30)]
    model = torch.nn.Linear(3, 2)
    loader = make(path)
    take(loader, 17)
    # JSON text in the checkpoint: DCP stores non-tensor values by pickling them, and a plain
    # string is the one value every loader of that checkpoint can read back safely.
    dcp.save({"model": model.state_dict(), "loader": json.dumps(loader.state_dict())},
             checkpoint_id=str(tmp_path / "ckpt"))

    restored_model = torch.nn.Linear(3, 2)
    target = {"model": restored_model.state_dict(), "loader": ""}
    dcp.load(target, checkpoint_id=str(tmp_path / "ckpt"))
    restored_model.load_state_dict(target["model"])
    resumed = make(path)
    resumed.load_state_dict(json.loads(target["loader"]))
    assert torch.equal(restored_model.weight, model.weight)
    assert [b["id"].tolist() for b in take(resumed, 13)] == reference[17:]
