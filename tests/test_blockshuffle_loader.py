"""The block-aware shuffle through StreamingDataset: default for zstd shards, each block
decompressed once per epoch, exactly-once epochs, world-size-free batches, strict state."""

from __future__ import annotations

import numpy as np
import pytest

from streamshard import ShardWriter, StreamingDataLoader, StreamingDataset, World
from streamshard.blockshuffle import cache_bytes_needed, samples_per_block
from streamshard.errors import ConfigError, StateMismatchError
from streamshard.reader import open_dataset
from streamshard.testing import assemble_global_batch

ROW = {"id": "int64", "tok": "uint16[60]"}  # 8 + 120 = 128 bytes: 7 rows per 1 KiB block


def write(path: str, n: int, compression) -> str:
    with ShardWriter(path, columns=ROW, shard_size="20KB", block_size="1KiB",
                     compression=compression) as w:
        for i in range(n):
            w.write({"id": i, "tok": np.full(60, i % 65536, dtype=np.uint16)})
    return path


@pytest.fixture(scope="module")
def zstd_path(tmp_path_factory):
    return write(str(tmp_path_factory.mktemp("bz") / "ds"), 1000, "zstd")


@pytest.fixture(scope="module")
def none_path(tmp_path_factory):
    return write(str(tmp_path_factory.mktemp("bn") / "ds"), 1000, None)


def loader(path, world=World(), **kwargs):
    ds = StreamingDataset(path, global_batch_size=20, seed=3, world=world, **kwargs)
    return ds, StreamingDataLoader(ds)


def test_samples_per_block_is_exact_for_fixed_rows(zstd_path):
    ds = open_dataset(zstd_path)
    k = samples_per_block(ds.index)
    assert k == (1024 - 16) // (128 + 8) == 7
    first = ds.shard_reader(0)
    # every block of the writer's shards but the dataset's last holds exactly k rows
    counts = np.diff(np.append(np.asarray(first._first), first.num_samples))
    assert set(counts.tolist()) == {k}


def test_default_is_block_order_for_zstd_only(zstd_path, none_path):
    assert loader(zstd_path)[0].sequence.order.blocks is not None
    assert loader(none_path)[0].sequence.order.blocks is None
    assert loader(zstd_path, block_shuffle=False)[0].sequence.order.blocks is None
    assert loader(none_path, block_shuffle=True)[0].sequence.order.blocks is not None
    assert loader(zstd_path, shuffle=False)[0].sequence.order.blocks is None
    with pytest.raises(ConfigError, match="block_shuffle must be a bool"):
        loader(zstd_path, block_shuffle="yes")


def test_epoch_decompresses_each_block_once_and_serves_each_sample_once(zstd_path):
    ds, dl = loader(zstd_path)
    reader_ds = ds.datasets[0]
    blocks = sum(reader_ds.shard_reader(s).num_blocks for s in range(reader_ds.num_shards))
    reader_ds.close()
    before = reader_ds.stats["blocks_read"]
    ids = np.concatenate([b["id"].numpy() for b in dl])
    assert len(ids) == 1000 // 20 * 20 and len(np.unique(ids)) == len(ids)
    read = reader_ds.stats["blocks_read"] - before
    # once per block, plus at most one per unit cut by a lane boundary
    assert blocks <= read <= blocks + ds.sequence.order.lanes - 1
    _, window = loader(zstd_path, block_shuffle=False, block_cache=0)
    window.streaming_dataset.datasets[0].close()
    sum(1 for _ in window)
    assert window.streaming_dataset.datasets[0].stats["blocks_read"] > 3 * blocks


def test_cache_is_sized_to_the_units_in_flight(zstd_path):
    ds, _ = loader(zstd_path)
    order = ds.sequence.order
    need = cache_bytes_needed(ds.datasets[0].index, order.blocks, order.lanes)
    assert ds.datasets[0].block_cache_bytes >= need > 0
    assert ds.datasets[0]._blocks.capacity >= need  # the LRU itself grew, not just the field
    fixed, _ = loader(zstd_path, block_cache="1MiB")
    assert fixed.datasets[0].block_cache_bytes == 2**20  # an explicit size is kept


@pytest.mark.parametrize("world_size", [2, 4])
def test_same_global_batches_at_any_world_size(zstd_path, world_size):
    _, whole = loader(zstd_path)
    full = [b["id"].numpy() for b in whole][:10]
    parts = [[b["id"].numpy() for b in loader(zstd_path, World(r, world_size))[1]][:10]
             for r in range(world_size)]
    seq = loader(zstd_path)[0].sequence  # rank batches sit where the rank split puts them
    for step in range(10):
        merged = assemble_global_batch(seq, step, [parts[r][step].tolist() for r in range(world_size)])
        assert merged == full[step].tolist()


def test_state_names_the_order_and_refuses_the_other(zstd_path):
    _, block = loader(zstd_path)
    state = block.state_dict()
    assert state["sequence"]["blocks"] == [7, 16]
    _, window = loader(zstd_path, block_shuffle=False)
    with pytest.raises(StateMismatchError, match="blocks"):
        window.load_state_dict(state)


def test_a_state_from_before_the_block_shuffle_resumes_in_window_order(zstd_path):
    """A checkpoint of a zstd dataset written before the block-aware default (no ``blocks`` in its
    sequence) loads into a loader left on the defaults and continues that run's window order;
    an explicit ``block_shuffle=True`` still refuses it, naming the field."""
    _, old = loader(zstd_path, block_shuffle=False)  # what the previous release served
    head = [b["id"].tolist() for _, b in zip(range(5), old)]
    state = old.state_dict()
    assert "blocks" not in state["sequence"] and head
    tail = [b["id"].tolist() for _, b in zip(range(10), old)]
    ds, resumed = loader(zstd_path)
    assert ds.sequence.order.blocks is not None
    resumed.load_state_dict(state)
    assert ds.sequence.order.blocks is None
    assert [b["id"].tolist() for _, b in zip(range(10), resumed)] == tail
    _, explicit = loader(zstd_path, block_shuffle=True)
    with pytest.raises(StateMismatchError, match="blocks"):
        explicit.load_state_dict(state)
