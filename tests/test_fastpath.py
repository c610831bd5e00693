"""The columnar fast path for fixed-size schemas returns exactly what per-sample decoding plus
torch's default_collate returns (token arrays cast to the token dtype), compressed and
uncompressed, in and out of workers; the vectorized gather checks what it reads."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest
import torch
from torch.utils.data import default_collate

from streamshard import ShardWriter, StreamingDataLoader, StreamingDataset, World, open_dataset
from streamshard import fastpath
from streamshard.collate import collate
from streamshard.errors import ConfigError, CorruptionError
from streamshard.testing import batch_key, take

COLUMNS = {"i": "int32", "u": "uint8", "h": "float16", "f": "float64", "b": "bool",
           "tok": "uint16[5]", "img": "float32[2,3]", "m": "bool[4]"}


def sample(i: int) -> dict:
    rng = np.random.default_rng(i)
    return {"i": -i, "u": i % 256, "h": float(np.float16(i / 7)), "f": i / 3, "b": i % 2 == 0,
            "tok": rng.integers(0, 60000, 5).astype(np.uint16),
            "img": rng.random((2, 3)).astype(np.float32), "m": rng.random(4) > 0.5}


@pytest.fixture(scope="module", params=["zstd", None])
def path(request, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("fp") / "ds")
    with ShardWriter(out, columns=COLUMNS, shard_size="3KB", block_size="1KiB",
                     compression=request.param) as w:
        for i in range(150):
            w.write(sample(i))
    return out


@pytest.mark.parametrize("workers", [0, 2])
def test_fast_path_equals_default_collate(path, workers):
    def loader(collate_fn):
        ds = StreamingDataset(path, global_batch_size=8, seed=4, world=World())
        kw = {"multiprocessing_context": "fork"} if workers else {}
        return StreamingDataLoader(ds, num_workers=workers, collate_fn=collate_fn, **kw)

    def int64_tokens(samples):
        batch = default_collate(samples)
        batch["tok"] = batch["tok"].long()
        return batch

    assert loader(None).streaming_dataset._columns is not None  # the fast path is taken
    fast = [batch_key(b) for b in take(loader(None), 25)]
    slow = [batch_key(b) for b in take(loader(int64_tokens), 25)]
    assert fast == slow
    first = next(iter(loader(None)))
    assert str(first["i"].dtype) == "torch.int64" and str(first["h"].dtype) == "torch.float64"
    assert tuple(first["img"].shape) == (8, 2, 3) and str(first["tok"].dtype) == "torch.int64"


def test_variable_schema_takes_the_general_path(id_dataset_factory, tmp_path):
    out = str(tmp_path / "v")
    with ShardWriter(out, columns={"t": "uint16[]"}) as w:
        w.write({"t": np.arange(3, dtype=np.uint16)})
    ds = StreamingDataset(out, global_batch_size=1, world=World())
    assert ds._columns is None


TOKENS = {"tok": "uint16[64]"}


def token_sample(i: int) -> dict:
    return {"tok": ((np.arange(64) * 7 + i * 131) % 65536).astype(np.uint16)}


@pytest.fixture(scope="module")
def tokens_path(tmp_path_factory):
    # Uncompressed, several shards, blocks of 4 rows, a short last block (203 % 4 != 0).
    out = str(tmp_path_factory.mktemp("tok") / "ds")
    with ShardWriter(out, columns=TOKENS, shard_size="5KB", block_size="600B",
                     compression=None) as w:
        for i in range(203):
            w.write(token_sample(i))
    return out


@pytest.mark.parametrize("token_dtype", [torch.int64, torch.int32, None])
def test_vectorized_gather_equals_per_sample_decode(tokens_path, token_dtype):
    ds = open_dataset(tokens_path)
    assert ds.num_shards > 3
    columns = fastpath.layout(ds.schema)
    rng = np.random.default_rng(0)
    for ids in ([0], [202], list(range(203)), rng.integers(0, 203, 57).tolist(),
                [5, 5, 200, 0]):
        got = fastpath.read_batch(ds, columns, ids, token_dtype=token_dtype)
        want = collate([ds[i] for i in ids], token_dtype=token_dtype)
        assert batch_key(got) == batch_key(want)
    assert str(got["tok"].dtype) == str(token_dtype or torch.uint16)
    assert fastpath.read_batch(ds, columns, [])["tok"].shape == (0, 64)


def test_gather_reads_no_sample_one_by_one(tokens_path, monkeypatch):
    ds = open_dataset(tokens_path)
    monkeypatch.setattr(ds, "read_rows", None)  # the per-sample fallback must not be taken
    batch = fastpath.read_batch(ds, fastpath.layout(ds.schema), list(range(203)))
    assert batch["tok"][150].tolist() == token_sample(150)["tok"].astype(np.int64).tolist()


def test_gather_checks_block_offsets_on_first_touch(tokens_path, tmp_path):
    import shutil

    copy = str(tmp_path / "bad")
    shutil.copytree(tokens_path, copy)
    shard = os.path.join(copy, open_dataset(copy).index.shards[1].file)
    with open(shard, "r+b") as f:  # block 0's second sample offset: 128 -> 130
        f.seek(32 + 8 + 8)
        f.write((130).to_bytes(8, "little"))
    ds = open_dataset(copy)
    first = int(ds.index.offsets[1])
    fastpath.read_batch(ds, fastpath.layout(ds.schema), [0, first + 7])  # other blocks: fine
    with pytest.raises(CorruptionError, match="block 0"):
        fastpath.read_batch(ds, fastpath.layout(ds.schema), [0, first + 1])


def test_out_of_range_and_bad_token_dtype(tokens_path):
    ds = open_dataset(tokens_path)
    with pytest.raises(IndexError, match="sample index 203 out of range"):
        fastpath.read_batch(ds, fastpath.layout(ds.schema), [1, 203])
    with pytest.raises(IndexError, match="sample index -204 out of range"):
        fastpath.read_batch(ds, fastpath.layout(ds.schema), [1, -204])
    # negative ids count from the end, in the one-index gather as per sample
    cols = fastpath.layout(ds.schema)
    got = fastpath.read_batch(ds, cols, [5, -1, 0])["tok"]
    want = fastpath.read_batch(ds, cols, [5, 202, 0])["tok"]
    assert torch.equal(got, want)
    with pytest.raises(ConfigError, match="token_dtype must be"):
        fastpath.read_batch(ds, fastpath.layout(ds.schema), [1], token_dtype=torch.float32)


def test_pin_memory_without_cuda_falls_back(tokens_path, caplog):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: pinned memory is real here")
    ds = open_dataset(tokens_path)
    with caplog.at_level(logging.WARNING, logger="streamshard.fastpath"):
        batch = fastpath.read_batch(ds, fastpath.layout(ds.schema), [3, 4], pin_memory=True)
    assert not batch["tok"].is_pinned() and batch["tok"].shape == (2, 64)


def test_read_samples_equals_per_sample_reads_in_order(tmp_path):
    # Variable-size samples, zstd, several shards and blocks; ids unsorted, repeated, spanning.
    out = str(tmp_path / "v")
    with ShardWriter(out, columns={"t": "bytes", "n": "int64"}, shard_size="4KB",
                     block_size="1KiB") as w:
        for i in range(300):
            w.write({"t": bytes([i % 251]) * (i % 97), "n": i})
    ds = open_dataset(out)
    assert ds.num_shards >= 2
    ids = np.random.default_rng(2).integers(0, 300, 90).tolist() + [0, 299, 0]
    got = fastpath.read_samples(ds, ids)
    assert [g["n"] for g in got] == ids
    assert all(g["t"] == ds[i]["t"] for g, i in zip(got, ids))
    # Each block of the batch is fetched once (the reader keeps its last block), no LRU needed.
    fresh = open_dataset(out, block_cache=0)
    fastpath.read_samples(fresh, ids)
    blocks = {(s, b) for s, k in zip(*fresh.index.locate(np.asarray(ids)))
              for b in [np.searchsorted(fresh.shard_reader(int(s))._first, k, "right") - 1]}
    assert fresh.stats["blocks_read"] == len(blocks)
    assert fastpath.read_samples(ds, []) == []
    with pytest.raises(IndexError, match="sample index 300 out of range"):
        fastpath.read_samples(ds, [5, 300])


@pytest.mark.parametrize("compression", [None, "zstd"])
def test_read_ahead_at_0_workers_equals_per_key_reads_and_resumes_mid_chunk(tmp_path, compression):
    # One uint16 array column: StreamingDataLoader at 0 workers reads READ_AHEAD keys in one
    # gather (StreamingDataset.read_keys); batches, order and resume points must not change.
    out = str(tmp_path / "ds")
    with ShardWriter(out, columns=TOKENS, shard_size="5KB", block_size="600B",
                     compression=compression) as w:
        for i in range(203):
            w.write(token_sample(i))

    def make():
        ds = StreamingDataset(out, global_batch_size=6, seed=9, world=World())
        return StreamingDataLoader(ds, num_workers=0)

    plain = make().streaming_dataset
    sampler = plain.batch_sampler(columnar=True)
    reference = [plain.__getitems__(key)["tok"] for key in sampler]  # one key at a time
    loader = make()
    got = [b["tok"] for b in loader]
    assert len(got) == len(reference) == 33
    assert all(torch.equal(a, b) and a.dtype == torch.int64 for a, b in zip(got, reference))
    assert len({b.untyped_storage().data_ptr() for b in got}) == len(got)  # no shared buffers
    # resume 11 batches in (inside a chunk of 8), in a fresh loader and in a live iterator
    first = make()
    it = iter(first)
    for _ in range(11):
        next(it)
    state = first.state_dict()
    fresh = make()
    fresh.load_state_dict(state)
    assert all(torch.equal(a["tok"], b) for a, b in zip(fresh, reference[11:]))
    live = make()
    it = iter(live)
    next(it)
    live.load_state_dict(state)
    assert torch.equal(next(it)["tok"], reference[11])
    assert torch.equal(next(it)["tok"], reference[12])


def test_read_batches_equals_read_batch(tokens_path):
    ds = open_dataset(tokens_path)
    cols = fastpath.layout(ds.schema)
    lists = [np.array([5, 202, 0]), np.array([17]), np.array([3, 3, 100, 45, 9])]
    for token_dtype in (torch.int64, None):
        many = fastpath.read_batches(ds, cols, lists, token_dtype=token_dtype)
        for ids, got in zip(lists, many):
            want = fastpath.read_batch(ds, cols, ids, token_dtype=token_dtype)
            assert torch.equal(got["tok"], want["tok"]) and got["tok"].dtype == want["tok"].dtype
    with pytest.raises(IndexError, match="out of range"):
        fastpath.read_batches(ds, cols, [np.array([1]), np.array([203])])
