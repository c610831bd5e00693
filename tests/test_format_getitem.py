"""``ds[i]``'s fast path: the inlined locate, the last-reader shortcut (never a reader the LRU
evicted or ``close()`` closed) and the first-touch block check it must keep."""

from __future__ import annotations

import numpy as np
import pytest

from streamshard import ShardWriter, open_dataset
from streamshard.errors import CorruptionError
from streamshard.lru import LRU

ROWS = np.arange(600 * 64, dtype=np.uint16).reshape(600, 64)  # 128 B samples


@pytest.fixture
def ds_dir(tmp_path):
    with ShardWriter(str(tmp_path / "ds"), columns={"t": "uint16[64]"}, compression=None,
                     shard_size="20KB", block_size="2KiB") as w:
        for row in ROWS:
            w.write({"t": row})
    return tmp_path / "ds"


def test_getitem_matches_locate_for_every_kind_of_index(ds_dir):
    ds = open_dataset(ds_dir)
    assert ds.num_shards >= 4
    for i in (0, 1, 155, 156, 599, -1, -600, np.int64(17), np.uint32(300)):
        s, k = ds.locate(i)
        assert np.array_equal(ds[i]["t"], ds.read(s, k)["t"]) and np.array_equal(
            ds[i]["t"], ROWS[int(i)])
    for bad in (600, -601):
        with pytest.raises(IndexError, match=f"sample index {bad} out of range"):
            ds[bad]
    with pytest.raises(TypeError):
        ds[1.0]
    with pytest.raises(TypeError):
        ds[True]
    for bad in (-1, ds.num_shards):  # the shortcut's "no reader" marker matches no shard
        with pytest.raises(IndexError, match=f"shard {bad} out of range"):
            ds.shard_reader(bad)
    ds.close()
    with pytest.raises(IndexError, match="shard -1 out of range"):
        ds.read(-1, 0)


def test_last_reader_is_forgotten_on_eviction_and_close(ds_dir):
    ds = open_dataset(ds_dir, max_open_shards=1)
    per_shard = ds.index.shards[0].samples
    order = [0, 1, per_shard, 2, per_shard + 1, 3, 0]  # shard 0, 0, 1, 0, 1, 0, 0
    for i in order:
        assert np.array_equal(ds[i]["t"], ROWS[i])
    # one open at a time: every change of shard evicted the other and reopened it
    assert ds.stats["shards_opened"] == 5 and ds.stats["open_shards"] == 1
    evicted = ds._readers.peek(0)
    assert ds._last == (0, evicted)
    ds.close()
    assert ds._last[1] is None and evicted.mapped is None  # closed, and not remembered
    assert np.array_equal(ds[5]["t"], ROWS[5]) and ds.stats["shards_opened"] == 6


def test_first_touch_check_still_runs_on_the_fast_path(ds_dir):
    ds = open_dataset(ds_dir)
    info = ds.index.shards[1]
    path = ds_dir / info.file
    data = bytearray(path.read_bytes())
    data[40] ^= 0xFF  # inside the first block's samples
    path.write_bytes(bytes(data))
    assert np.array_equal(ds[3]["t"], ROWS[3])  # shard 0 untouched: the shortcut now points there
    with pytest.raises(CorruptionError, match="block 0: xxh64 checksum mismatch"):
        ds[info.samples]  # first sample of shard 1


def test_lru_peek_counts_nothing():
    lru: LRU[str, int] = LRU(2)
    lru.put("a", 1)
    lru.put("b", 2)
    assert lru.peek("a") == 1 and lru.peek("z") is None and lru.hits == lru.misses == 0
    lru.put("c", 3)  # "a" is still the least recent: peek did not count as a use
    assert "a" not in lru and lru.peek("b") == 2
