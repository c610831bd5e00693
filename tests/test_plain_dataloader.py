"""A user's own script passes the dataset to a plain ``torch.utils.data.DataLoader``, as with any
other torch dataset. Whatever the loader's arguments, the result is either correctly collated
device batches (a dict of tensors whose first dim is the device batch size) or a clear
``ConfigError`` that names the fix; never the silent nested lists of batch-of-one collation
(issue 13, item 8).

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
    """The first batch, or the ConfigError raised while getting it."""
    try:
        return next(iter(loader))
    except ConfigError as exc:
        return exc


def assert_device_batch_or_fix(result, dataset) -> None:
    if isinstance(result, ConfigError):
        text = str(result)
        # The message must say what to write instead.
        assert "StreamingDataLoader" in text or "batch_size" in text, text
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
    pytest.param({"batch_size": None}, id="batch_size-None"),  # ConfigError: single indices
])
def test_plain_dataloader_batches_or_names_the_fix(dataset, kwargs):
    dataset.set_epoch(0) if hasattr(dataset, "set_epoch") else None
    loader = torch.utils.data.DataLoader(dataset, **kwargs)
    result = first_batch_or_error(loader)
    if kwargs.get("batch_size", 1) is None and isinstance(result, list):
        # batch_size=None with the iterable adapter: a device batch of B sample dicts,
        # converted (not collated) by default_convert: a flat list, not nested.
        assert len(result) == B and all(isinstance(s, dict) for s in result)
        assert all(not isinstance(s["id"], (list, tuple)) for s in result)
        return
    assert_device_batch_or_fix(result, dataset)
