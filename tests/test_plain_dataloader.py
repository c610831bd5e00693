"""A user's own script passes the dataset to a plain ``torch.utils.data.DataLoader``, as with any
other torch dataset. Whatever the loader's arguments, the result is either correctly collated
device batches (a dict of tensors whose first dim is the device batch size) or a clear error
that names the fix; never the silent nested lists of batch-of-one collation (issue 13, item 8).

The map-style adapter (issue 12, item 3) is what makes this possible: an ``IterableDataset``
could not see the DataLoader's ``batch_size``; a map-style dataset's ``__getitems__`` does."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from streamshard import ConfigError, StreamingDataset, World  # noqa: E402

B = 4


@pytest.fixture
def dataset(id_dataset_factory):
    return StreamingDataset(id_dataset_factory(64), batch_size=B, seed=5, world=World())


def first_batch_or_error(loader):
    """The first batch, or the error raised while getting it."""
    try:
        return next(iter(loader))
    except (ConfigError, TypeError) as exc:
        return exc


def assert_device_batch_or_fix(result, dataset) -> None:
    if isinstance(result, Exception):
        text = str(result)
        # The message must say what to write instead.
        assert "StreamingDataLoader(ds)" in text and "batch_size=None" in text, text
        return
    assert isinstance(result, dict), f"expected a dict of tensors, got {type(result).__name__}"
    assert isinstance(result["id"], torch.Tensor) and result["id"].shape == (B,)
    assert result["tokens"].shape == (B, 4)
    assert len(set(result["id"].tolist())) == B  # distinct samples, not one repeated


# Each row is a way users write it in their own scripts.
@pytest.mark.parametrize("kwargs", [
    pytest.param({}, id="default-batch_size-1"),  # ConfigError: pass batch_size=4
    pytest.param({"batch_size": B}, id="same-batch-size"),  # rank batches
    pytest.param({"batch_size": B + 1}, id="other-batch-size"),  # ConfigError: pass batch_size=4
    pytest.param({"batch_size": 2, "num_workers": 2}, id="workers"),  # ConfigError from a worker
    pytest.param({"batch_size": None}, id="batch_size-None"),  # ConfigError: single indices
    pytest.param({"batch_size": None, "num_workers": 2}, id="batch_size-None-workers"),
])
def test_plain_dataloader_batches_or_names_the_fix(dataset, kwargs):
    dataset.set_epoch(0) if hasattr(dataset, "set_epoch") else None
    if kwargs.get("num_workers"):
        kwargs["multiprocessing_context"] = "fork"
    loader = torch.utils.data.DataLoader(dataset, **kwargs)
    result = first_batch_or_error(loader)
    if kwargs.get("batch_size", 1) is None and not isinstance(result, (dict, Exception)):
        # batch_size=None with the iterable adapter: one device batch of B sample dicts,
        # converted (not collated) by default_convert: flat, not nested.
        samples = list(result)
        assert len(samples) == B and all(isinstance(s, dict) for s in samples)
        assert all(isinstance(int(s["id"]), int) and not isinstance(s["id"], (list, tuple))
                   for s in samples)
        return
    assert_device_batch_or_fix(result, dataset)


def test_batch_size_none_with_default_collate_gives_device_batches(dataset):
    """The documented plain-DataLoader form (dataset.py): one collated device batch per item."""
    from streamshard.collate import collate

    dataset.set_epoch(0)
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, collate_fn=collate)
    batches = list(loader)
    assert len(batches) == len(dataset)
    assert all(b["id"].shape == (B,) for b in batches)
    assert sorted(i for b in batches for i in b["id"].tolist()) == list(range(64))
