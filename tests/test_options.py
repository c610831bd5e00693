"""The loaders' option groups (streamshard/options.py): ``order=OrderOptions(...)`` and
``reading=ReadOptions(...)`` define the same loader as the flat keywords of earlier releases;
an option given both ways, an unknown keyword and a bad value are refused by name."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from streamshard import (
    ConfigError, NumpyBatchIterator, OrderOptions, ReadOptions, ShardWriter, StreamingDataLoader,
    StreamingDataset, World,
)
from streamshard.testing import batch_key, take


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("opt") / "ds")
    with ShardWriter(out, columns={"x": "int64", "t": "bytes"}, shard_size="2KB",
                     block_size="512B") as w:  # zstd: the block-aware shuffle applies
        for i in range(120):
            w.write({"x": i, "t": bytes([i % 7]) * (i % 13)})
    return out


FLAT = dict(shuffle=True, seed=5, lanes=3, window=7, drop_last=False, block_shuffle=False,
            blocks_per_group=2, lookahead=4, block_cache="1MB", verify_blocks=True)
GROUPED = dict(order=OrderOptions(shuffle=True, seed=5, lanes=3, window=7, drop_last=False,
                                  block_shuffle=False, blocks_per_group=2),
               reading=ReadOptions(lookahead=4, block_cache="1MB", verify_blocks=True))


def test_grouped_and_flat_forms_give_the_same_loader(path):
    flat = StreamingDataset(path, global_batch_size=8, world=World(), **FLAT)
    grouped = StreamingDataset(path, global_batch_size=8, world=World(), **GROUPED)
    assert flat.order == grouped.order and flat.reading == grouped.reading
    assert flat.lookahead == grouped.lookahead == 4 and flat.seed == 5
    batches = [[batch_key(b) for b in take(StreamingDataLoader(ds), 20)] for ds in (flat, grouped)]
    assert batches[0] == batches[1]
    state = StreamingDataLoader(flat).state_dict()
    assert state == StreamingDataLoader(grouped).state_dict()
    # Mixed: one group plus the other group's fields as keywords.
    mixed = StreamingDataset(path, global_batch_size=8, world=World(), order=GROUPED["order"],
                             lookahead=4, block_cache="1MB")
    assert mixed.order == flat.order and mixed.reading == flat.reading
    # Defaults: nothing given equals the empty groups.
    assert StreamingDataset(path, global_batch_size=8, world=World()).order == OrderOptions()
    # The dataset travels to spawned workers with its options.
    assert pickle.loads(pickle.dumps(grouped.order)) == grouped.order


def test_numpy_iterator_takes_both_forms(path):
    flat = NumpyBatchIterator(path, global_batch_size=8, world=World(), **FLAT)
    grouped = NumpyBatchIterator(path, global_batch_size=8, world=World(), **GROUPED)
    a = [np.asarray(b["x"]).tolist() for b in flat]
    b = [np.asarray(b["x"]).tolist() for b in grouped]
    assert a == b and len(a) == 15
    assert flat.state_dict() == grouped.state_dict()


@pytest.mark.parametrize("kwargs, error, match", [
    # the same option in a group and as a keyword: which one is meant is unclear
    (dict(order=OrderOptions(seed=1), seed=2), ConfigError, "seed is given both"),
    (dict(reading=ReadOptions(), lookahead=3), ConfigError, "lookahead is given both"),
    # a typo is a TypeError, as any Python call
    (dict(sed=3), TypeError, "unexpected keyword argument 'sed'"),
    # a group of the wrong kind
    (dict(order=ReadOptions()), ConfigError, "order must be a streamshard.OrderOptions"),
    (dict(reading={"lookahead": 3}), ConfigError, "reading must be a streamshard.ReadOptions"),
    # bad values, flat or grouped, refused before anything is opened
    (dict(seed=-1), ConfigError, "seed must be a non-negative int"),
    (dict(shuffle="yes"), ConfigError, "shuffle must be True or False"),
    (dict(lanes=0), ConfigError, "lanes must be positive"),
    (dict(window=True), ConfigError, "window must be an int"),
    (dict(block_shuffle=1), ConfigError, "block_shuffle must be a bool or None"),
    (dict(lookahead=0), ConfigError, "lookahead must be a positive int"),
    (dict(block_cache="lots"), ConfigError, "block_cache must be a size"),
    (dict(cache_limit=-5), ConfigError, "cache_limit must be positive"),
    (dict(verify_blocks=None), ConfigError, "verify_blocks must be True or False"),
    (dict(storage_options=[1]), ConfigError, "storage_options must be a dict"),
])
def test_refused_with_the_option_named(kwargs, error, match):
    with pytest.raises(error, match=match):
        StreamingDataset("/nonexistent/never-opened", global_batch_size=8, world=World(),
                         **kwargs)


def test_values_are_frozen_and_normalized():
    order = OrderOptions(lanes=np.int64(4), mixture_block=np.int32(10))
    assert type(order.lanes) is int and order.lanes == 4 and order.mixture_block == 10
    with pytest.raises(AttributeError):
        order.seed = 3  # type: ignore[misc]
    assert ReadOptions(block_cache=0).block_cache == 0  # 0: no block cache
    assert hash(ReadOptions(storage_options={"a": 1})) == hash(ReadOptions())
