"""The one-index batch gather over held shard maps (streamshard/flatgather.py): equal to
per-sample decoding whatever the shards, block sizes, evictions and threads; first-touch checks
of block headers even without checksums; maps held only while the dataset holds the reader."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest
import torch

from streamshard import ShardWriter, fastpath, open_dataset
from streamshard.collate import collate, shared_empty
from streamshard.errors import CorruptionError
from streamshard.merge import merge_datasets
from streamshard.testing import batch_key

TOKENS = {"tok": "uint16[16]"}


def row(i: int) -> dict:
    return {"tok": ((np.arange(16) * 13 + i * 257) % 65536).astype(np.uint16)}


def write(path: str, ids: range, block_size: str) -> None:
    with ShardWriter(path, columns=TOKENS, shard_size="1KB", block_size=block_size,
                     compression=None) as w:
        for i in ids:
            w.write(row(i))


@pytest.fixture(scope="module")
def mixed_path(tmp_path_factory):
    """Two parts with different rows per block (3 and 7), merged: many small shards, short
    last blocks, and per-shard layouts that differ."""
    root = tmp_path_factory.mktemp("flat") / "m"
    write(str(root / "a"), range(0, 100), "150B")
    write(str(root / "b"), range(100, 230), "350B")
    merge_datasets([str(root / "a"), str(root / "b")], str(root))
    return str(root)


def expected(ds, ids) -> object:
    return batch_key(collate([ds[int(i)] for i in ids], token_dtype=torch.int64))


def test_equals_per_sample_across_layouts_and_evictions(mixed_path):
    ds = open_dataset(mixed_path, max_open_shards=2)
    ks = {ds.shard_reader(s).num_samples // max(1, ds.shard_reader(s).num_blocks)
          for s in range(ds.num_shards)}
    assert ds.num_shards > 8 and len(ks) > 1  # several shards, two block layouts
    columns = fastpath.layout(ds.schema)
    rng = np.random.default_rng(1)
    for _ in range(30):
        ids = rng.integers(0, len(ds), 13)
        assert batch_key(fastpath.read_batch(ds, columns, ids)) == expected(ds, ids)
        flat = ds.__dict__["_flat_gather"]
        # Held maps follow the dataset's LRU: at most its readers plus one batch's shards.
        assert len(flat._maps) <= 2 + 13
    assert batch_key(fastpath.read_batch(ds, columns, [-1, 0])) == expected(ds, [229, 0])
    ids = rng.integers(0, len(ds), 9)
    want = expected(ds, ids)
    closed = [reader for reader, _, _ in ds.__dict__["_flat_gather"]._maps.values()]
    ds.close()  # every reader is closed: the next batch reopens, and holds no closed one
    assert batch_key(fastpath.read_batch(ds, columns, ids)) == want
    held = ds.__dict__["_flat_gather"]._maps
    assert held and not any(reader is old for reader, _, _ in held.values() for old in closed)


def test_header_checked_on_first_touch_without_checksums(tmp_path):
    """verify_blocks=False skips the xxh64, not the block's offsets: positions are computed
    from the layout, so a header that disagrees with it is refused before any row is read."""
    path = str(tmp_path / "d")
    write(path, range(40), "150B")
    ds = open_dataset(path)
    shard = os.path.join(path, ds.index.shards[0].file)
    with open(shard, "r+b") as f:  # block 1's second offset: 32 -> 34
        stride = 16 + 3 * (8 + 32)
        f.seek(32 + stride + 8 + 8)
        f.write((34).to_bytes(8, "little"))
    bad = open_dataset(path, verify_blocks=False)
    columns = fastpath.layout(bad.schema)
    assert fastpath.read_batch(bad, columns, [0, 1, 2])["tok"].shape == (3, 16)  # block 0
    with pytest.raises(CorruptionError, match="block 1: sample offsets"):
        fastpath.read_batch(bad, columns, [0, 4])
    with pytest.raises(CorruptionError, match="block 1"):  # checked on: its xxh64 first
        fastpath.read_batch(open_dataset(path), columns, [4])


def test_short_last_block_header_checked(tmp_path):
    path = str(tmp_path / "d")
    write(path, range(8), "150B")  # one shard: blocks of 3, 3, 2
    ds = open_dataset(path, verify_blocks=False)
    assert ds.num_shards == 1 and ds.shard_reader(0).num_blocks == 3
    shard = os.path.join(path, ds.index.shards[0].file)
    with open(shard, "r+b") as f:  # the last block's n: 2 -> 3
        f.seek(32 + 2 * (16 + 3 * (8 + 32)))
        f.write((3).to_bytes(8, "little"))
    columns = fastpath.layout(ds.schema)
    assert fastpath.read_batch(ds, columns, [5])["tok"][0].tolist() == row(5)["tok"].tolist()
    with pytest.raises(CorruptionError, match="block 2"):
        fastpath.read_batch(ds, columns, [6])


def test_shard_without_uniform_rows_falls_back_to_per_sample(mixed_path, monkeypatch):
    from streamshard import gather

    real = gather.ShardRows.of
    monkeypatch.setattr(gather.ShardRows, "of",
                        classmethod(lambda cls, r, n: None if "00002" in r.name else real(r, n)))
    ds = open_dataset(mixed_path)
    columns = fastpath.layout(ds.schema)
    ids = np.arange(len(ds))[::-3]
    assert batch_key(fastpath.read_batch(ds, columns, ids)) == expected(ds, ids)
    flat = ds.__dict__["_flat_gather"]
    assert not flat.uniform[2] and flat.uniform.sum() == ds.num_shards - 1


def test_threads_share_one_gather(mixed_path):
    ds = open_dataset(mixed_path, max_open_shards=3)
    columns = fastpath.layout(ds.schema)
    batches = [np.random.default_rng(i).integers(0, len(ds), 11) for i in range(40)]
    want = [expected(ds, ids) for ids in batches]
    got: list = [None] * len(batches)

    def work(part: int) -> None:
        for i in range(part, len(batches), 4):
            got[i] = batch_key(fastpath.read_batch(ds, columns, batches[i]))

    threads = [threading.Thread(target=work, args=(p,)) for p in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert got == want


def test_shared_empty_is_shared_and_shaped():
    t = shared_empty((4, 3), torch.int32)
    assert t.is_shared() and tuple(t.shape) == (4, 3) and t.dtype == torch.int32
    t.numpy()[...] = 7
    assert int(t.sum()) == 84
    assert tuple(shared_empty((0, 5), torch.int64).shape) == (0, 5)


def test_workers_send_tokens_as_stored_and_the_loader_casts(mixed_path):
    """With workers, token columns cross to the main process as uint16 (a quarter of the shared
    memory) and come out of StreamingDataLoader as token_dtype, equal to 0 workers."""
    from streamshard import StreamingDataLoader, StreamingDataset, World
    from streamshard.batch_keys import BatchKey
    from streamshard.testing import take

    def loader(**kw):
        ds = StreamingDataset(mixed_path, global_batch_size=8, seed=2, world=World())
        return StreamingDataLoader(ds, **kw)

    two = loader(num_workers=2, multiprocessing_context="fork")
    assert two._cast_tokens and two._keys.raw_tokens
    assert not loader()._cast_tokens and not loader(num_workers=2, pin_memory=True)._cast_tokens
    got = take(two, 12)
    assert all(b["tok"].dtype == torch.int64 for b in got)
    assert [batch_key(b) for b in got] == [batch_key(b) for b in take(loader(), 12)]
    ds = two.streaming_dataset
    raw = ds.__getitems__(BatchKey(0, (0, 0), (3, 4), columnar=True, raw_tokens=True))
    assert raw["tok"].dtype == torch.uint16
    assert raw["tok"].long().tolist() == [row(3)["tok"].tolist(), row(4)["tok"].tolist()]
