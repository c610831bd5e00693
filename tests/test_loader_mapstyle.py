"""The map-style adapter as users' scripts drive it: StreamingDataLoader, a plain torch
DataLoader (batch sampler or batch_size), and torchdata's StatefulDataLoader (O(1) resume)."""

from __future__ import annotations

import json
import logging
import pickle

import pytest
import torch.utils.data

from streamshard import ConfigError, StreamingDataLoader, StreamingDataset, World
from streamshard.batch_keys import BatchCollate, BatchKey
from streamshard.testing import take

N, G = 203, 6


def ids(batch) -> list[int]:
    return batch["id"].tolist()


@pytest.fixture(scope="module")
def path(id_dataset_factory):
    return id_dataset_factory(N)


def dataset(path, **kw) -> StreamingDataset:
    return StreamingDataset(path, global_batch_size=G, seed=7, world=kw.pop("world", World(1, 2)), **kw)


def reference(path, steps: int) -> list[list[int]]:
    return [ids(b) for b in take(StreamingDataLoader(dataset(path)), steps)]


def test_keys_are_small_stateless_values(path):
    ds = dataset(path)
    keys = list(ds.batch_sampler())
    assert len(keys) == ds.steps_per_epoch == N // G and [k.step for k in keys] == list(range(33))
    key = keys[5]
    assert isinstance(key, BatchKey) and len(key) == 3 and pickle.loads(pickle.dumps(key)) == key
    want = ds.sequence.batch(5, 1, 2)[1].tolist()
    assert list(key.sample_ids) == want
    assert [s["id"] for s in ds.__getitems__(key)] == want  # a worker needs nothing but the key


@pytest.mark.parametrize("workers", [0, 2])
def test_plain_dataloader_with_the_batch_sampler(path, workers):
    ds = dataset(path)
    loader = torch.utils.data.DataLoader(
        ds, batch_sampler=ds.batch_sampler(columnar=True), collate_fn=BatchCollate(),
        num_workers=workers, **({"multiprocessing_context": "fork"} if workers else {}))
    assert [ids(b) for b in loader] == reference(path, 33)
    assert [ids(b) for b in loader][:3] == reference(path, 36)[33:]  # the next epoch


def test_plain_dataloader_with_batch_size_none(path):
    ds = dataset(path)
    assert ds.batch_size == 3 and len(ds) == 33
    loader = torch.utils.data.DataLoader(ds, batch_size=None, collate_fn=BatchCollate())
    assert [ids(b) for b in loader] == reference(path, 33)
    ds.set_epoch(1)
    assert [ids(b) for b in loader][:2] == reference(path, 35)[33:]


def test_batching_again_is_a_clear_error_and_the_loader_takes_the_same_size(path):
    ds = dataset(path)
    for size in (3, 4):  # a DataLoader that batches rank batches again, whatever the size
        with pytest.raises(ConfigError, match=r"use StreamingDataLoader\(ds\) \(it accepts "
                                              r"batch_size=3\), DataLoader\(ds, batch_size=None\)"):
            next(iter(torch.utils.data.DataLoader(ds, batch_size=size)))
    assert len(take(StreamingDataLoader(ds, batch_size=3), 2)) == 2  # the same value is accepted
    with pytest.raises(ConfigError, match="batch_size=4 differs from the StreamingDataset's batch of 3"):
        StreamingDataLoader(ds, batch_size=4)


@pytest.mark.parametrize("workers", [0, 2])
def test_stateful_dataloader_resumes_by_arithmetic(path, workers, caplog):
    stateful = pytest.importorskip("torchdata.stateful_dataloader")

    def make():
        ds = dataset(path)
        return stateful.StatefulDataLoader(
            ds, batch_sampler=ds.batch_sampler(columnar=True), collate_fn=BatchCollate(),
            num_workers=workers, **({"multiprocessing_context": "fork"} if workers else {}))

    want = reference(path, 33 + 10)
    first = make()
    it = iter(first)
    head = [ids(next(it)) for _ in range(20)]
    state = json.loads(json.dumps(first.state_dict()))  # through JSON, as a checkpoint would
    assert '"fingerprints"' in json.dumps(state)  # it holds the batch sampler's loader state
    resumed = make()
    resumed.load_state_dict(state)
    with caplog.at_level(logging.WARNING):
        tail = [ids(b) for b in resumed]
    assert "fast-forwarding" not in caplog.text  # torchdata did not replay batches
    assert head + tail == want[:33]
    assert [ids(b) for b in resumed][:10] == want[33:]  # and the next epoch follows


def test_iterating_the_dataset_itself_serves_this_ranks_batches(path):
    ds = dataset(path)
    assert [[s["id"] for s in batch] for batch in ds] == reference(path, 33)
    ds.set_epoch(1)
    assert [[s["id"] for s in batch] for batch in ds][:2] == reference(path, 35)[33:]
    assert [s["id"] for s in ds[0]] == reference(path, 34)[33]  # item i: rank batch i of the epoch
    with pytest.raises(IndexError, match=r"rank batch 33 out of range \[0, 33\)"):
        ds[33]
