"""Batch reads out of compressed shards (streamshard/blockread.py): the same bytes as the
uncompressed copy of the same samples, counters as exact as sample-by-sample reads, and every
check still made (xxh64 of the stored block, the sample sizes a fixed-size schema needs)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import zstandard
from hypothesis import given, settings, strategies as st

from streamshard import ShardWriter, StreamingDataLoader, StreamingDataset, World, open_dataset
from streamshard import blockarena, blockread, fastpath
from streamshard.errors import CorruptionError
from streamshard.shardfile import ShardFileReader, ShardFileWriter, pack_raw_block
from streamshard.testing import batch_key, take

COLUMNS = {"tok": "uint16[6]", "n": "int32"}


def sample(i: int) -> dict:
    return {"tok": ((np.arange(6) * 31 + i * 7) % 65536).astype(np.uint16), "n": -i}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """The same 173 samples written with zstd and uncompressed: several shards, blocks of 8
    rows (block_size 256 B), a short last block."""
    root = tmp_path_factory.mktemp("pair")
    for comp in ("zstd", None):
        with ShardWriter(str(root / str(comp)), columns=COLUMNS, shard_size="2KB",
                         block_size=256, compression=comp) as w:
            for i in range(173):
                w.write(sample(i))
    return str(root / "zstd"), str(root / "None")


@pytest.mark.parametrize("cache", [0, "1KiB", "64MiB"])  # per-block path; arena of 4 slots; big
@settings(max_examples=30, deadline=None)
@given(ids=st.lists(st.integers(0, 172), min_size=1, max_size=40))
def test_batches_equal_the_uncompressed_copy_and_count_like_sample_reads(pair, cache, ids):
    zstd_ds, none_ds = open_dataset(pair[0], block_cache=cache), open_dataset(pair[1])
    cols = fastpath.layout(zstd_ds.schema)
    got = fastpath.read_batch(zstd_ds, cols, ids)
    want = fastpath.read_batch(none_ds, cols, ids)
    assert batch_key(got) == batch_key(want)
    assert got["n"].tolist() == [-i for i in ids]
    # Counters: one decompression per distinct block a sorted sample-by-sample read would
    # fetch (a fresh dataset), a hit for every other read.
    stats = zstd_ds.stats
    blocks = {(s, int(np.searchsorted(zstd_ds.shard_reader(s).block_starts, k, "right")))
              for s, k in zip(*(a.tolist() for a in zstd_ds.index.locate(np.asarray(ids))))}
    assert stats["blocks_read"] == len(blocks)
    assert stats["blocks_read"] + stats["block_cache_hits"] == len(ids)
    # Dataset.read_rows (NumpyBatchIterator's compressed path) reads the same bytes.
    row = zstd_ds.schema.fixed_size
    a, b = bytearray(len(ids) * row), bytearray(len(ids) * row)
    zstd_ds.read_rows(ids, memoryview(a))
    none_ds.read_rows(ids, memoryview(b))
    assert a == b


@pytest.mark.parametrize("block_shuffle", [True, False])
def test_loader_batches_equal_for_zstd_and_uncompressed(tmp_path, block_shuffle):
    # One shard each (shard_size counts stored bytes, so a multi-shard split would differ),
    # blocks of 8 rows, 4 lanes: the same sequence, so the same batches, epoch after epoch.
    def batches(comp):
        path = str(tmp_path / str(comp))
        with ShardWriter(path, columns=COLUMNS, block_size=256, compression=comp) as w:
            for i in range(173):
                w.write(sample(i))
        ds = StreamingDataset(path, global_batch_size=8, seed=5, world=World(), lanes=4,
                              block_shuffle=block_shuffle)
        return [batch_key(b) for b in take(StreamingDataLoader(ds), 45)]  # 2+ epochs

    assert batches("zstd") == batches(None)


def test_corrupted_block_names_shard_and_block(pair, tmp_path):
    import shutil

    dest = tmp_path / "ds"
    shutil.copytree(pair[0], dest)
    ds = open_dataset(str(dest))
    reader = ds.shard_reader(1)
    offset = int(reader.table["offset"][2])
    path = os.path.join(str(dest), ds.index.shards[1].file)
    data = bytearray(open(path, "rb").read())
    data[offset + 9] ^= 0x20
    open(path, "wb").write(bytes(data))
    fresh = open_dataset(str(dest))
    ids = [int(ds.index.offsets[1]) + int(reader.table["first"][2]) + j for j in (0, 3)]
    with pytest.raises(CorruptionError, match=r"shard 1 \(.*\) block 2: xxh64 checksum mismatch"):
        fastpath.read_batch(fresh, fastpath.layout(fresh.schema), [0] + ids)


def test_a_sample_of_another_size_is_refused(tmp_path):
    # A shard whose block 1 holds a 5-byte sample among 4-byte ones (a schema of 4-byte rows):
    # written by hand, the writer would refuse it.
    path = str(tmp_path / "odd.sss")
    cctx = zstandard.ZstdCompressor(write_content_size=True)
    with open(path, "wb") as f:
        w = ShardFileWriter(f, compressed=True)
        for samples in ([b"aaaa", b"bbbb", b"cccc"], [b"dddd", b"eeeee", b"ffff"]):
            raw = pack_raw_block(samples)
            w.add_block(cctx.compress(raw), len(raw), len(samples))
        w.finish()
    reader = ShardFileReader(path, decode=lambda buf, start, length: bytes(buf[start:start + length]),
                             name="shard 0 (odd.sss)")
    dest = np.zeros((2, 4), np.uint8)
    blockread.copy_rows(reader, np.array([0, 1]), 4, dest)  # block 0 is uniform
    assert bytes(dest) == b"aaaabbbb"
    with pytest.raises(CorruptionError, match=r"shard 0 \(odd.sss\) block 1 sample 4: 5 bytes"):
        blockread.copy_rows(reader, np.array([3]), 4, np.zeros((1, 4), np.uint8))
    # The arena makes the same check on every block it decompresses.
    host = _OneShard(reader)
    assert bytes(blockarena.arena_rows(host, np.array([1, 0, 2]), 4)) == b"bbbbaaaacccc"
    with pytest.raises(CorruptionError, match=r"shard 0 \(odd.sss\) block 1 sample 4: 5 bytes"):
        blockarena.arena_rows(host, np.array([3]), 4)


def test_arena_reuses_slots_and_stays_exact(pair):
    # 1 KiB of block cache: 4 slots of 256 bytes (the block size). 300 random batches of up to
    # 4 samples reuse slots all the time; batches needing more than 4 blocks take the per-block
    # path. Every batch equals the uncompressed copy; each block read once per batch at most.
    zstd_ds, none_ds = open_dataset(pair[0], block_cache="1KiB"), open_dataset(pair[1])
    cols = fastpath.layout(zstd_ds.schema)
    rng = np.random.default_rng(3)
    total = 0
    for _ in range(300):
        ids = rng.integers(0, 173, int(rng.integers(1, 7))).tolist()
        total += len(ids)
        got = fastpath.read_batch(zstd_ds, cols, ids, token_dtype=None)
        assert batch_key(got) == batch_key(fastpath.read_batch(none_ds, cols, ids, token_dtype=None))
    arena = zstd_ds.__dict__["_block_arena"]
    assert arena.slots == 4 and arena.per_block == 10
    assert len(arena._regular) == 3 and all(arena._regular.values())  # it served the batches
    stats = zstd_ds.stats
    assert stats["blocks_read"] + stats["block_cache_hits"] == total
    assert stats["blocks_read"] > 100  # 4 slots for ~25 blocks: slots were reused


class _Index:
    """What a BlockArena asks of a dataset's index, for one hand-written shard of 6 samples of
    4 bytes, 3 to a block (the writer's rule for block_size 56)."""

    block_size, num_samples = 56, 6
    schema = type("Schema", (), {"fixed_size": 4})()
    shards = type("Shards", (), {"samples": np.array([6])})()

    def locate(self, ids):
        return np.zeros(len(ids), np.int64), np.asarray(ids, np.int64)


class _OneShard:
    def __init__(self, reader):
        self.index, self.reader, self.block_cache_bytes = _Index(), reader, 1 << 16

    def shard_reader(self, s):
        return self.reader


def test_shard_truncated_after_open_is_a_corruption_error(pair, tmp_path):
    # Compressed shards are mmapped: the fetch compares the file's size with the block's end
    # first, so a shard cut while open fails with a clear error instead of SIGBUS.
    import shutil

    dest = tmp_path / "ds"
    shutil.copytree(pair[0], dest)
    ds = open_dataset(str(dest), block_cache=0)
    assert ds[0]["n"] == 0  # shard 0 open and mapped
    reader = ds.shard_reader(0)
    last = reader.num_blocks - 1
    os.truncate(os.path.join(str(dest), ds.index.shards[0].file), int(reader.table["offset"][last]) + 3)
    k = int(reader.table["first"][last])
    with pytest.raises(CorruptionError, match=rf"shard 0 \(.*\) block {last}: read 3 of \d+ bytes "
                                              r"\(truncated shard\)"):
        ds[k]
    with pytest.raises(CorruptionError, match="truncated shard"):
        fastpath.read_batch(ds, fastpath.layout(ds.schema), [k])
