"""ShardWriter -> open_dataset round trips: every column type, both compressions, random access,
iteration order, pickling, rollover, huge samples, determinism, writer safety, fsspec dest."""

from __future__ import annotations

import os
import pickle
import tempfile

import fsspec
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamshard import ShardWriter, open_dataset, verify_dataset
from streamshard.errors import ConfigError, DatasetExistsError, SchemaError
from streamshard.index import DatasetIndex
from streamshard.schema import Schema

from tests.format_helpers import COLUMNS, assert_sample_equal, token_samples, values_of, write

SCHEMA = Schema(COLUMNS)
sample_strategy = st.fixed_dictionaries({n: values_of(ct) for n, ct in SCHEMA.columns.items()})


@pytest.mark.parametrize("compression", ["zstd", None])
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(samples=st.lists(sample_strategy, min_size=0, max_size=40),
       block_size=st.sampled_from([1, 200, 4096]), shard_size=st.sampled_from([300, 5000, 10**6]))
def test_round_trip_random_samples(compression, samples, block_size, shard_size):
    with tempfile.TemporaryDirectory() as d:
        w = write(d, samples, compression=compression, block_size=block_size, shard_size=shard_size)
        ds = open_dataset(d)
        assert len(ds) == len(samples) == w.summary.samples
        assert ds.schema == SCHEMA and ds.num_shards == w.summary.shards
        for got, want in zip(ds, samples):                 # iteration is in write order
            assert_sample_equal(got, want, SCHEMA)
        for i in np.random.default_rng(0).permutation(len(samples)):   # random access
            assert_sample_equal(ds[int(i)], samples[i], SCHEMA)
        if samples:
            assert_sample_equal(ds[-1], samples[-1], SCHEMA)
        ds.close()


@pytest.mark.parametrize("compression", ["zstd", None])
def test_rollover_locate_and_read(tmp_path, compression):
    samples = token_samples(500)
    w = write(tmp_path, samples, columns={"tokens": "uint16[]"}, compression=compression,
              shard_size="20KB", block_size="2KiB")
    ds = open_dataset(tmp_path)
    assert ds.num_shards > 5
    for info in ds.index.shards:  # no shard exceeds the target (each holds many blocks)
        assert info.bytes <= 20_000
        assert os.path.getsize(tmp_path / info.file) == info.bytes
    assert ds.index.offsets[-1] == 500 and ds.index.offsets.dtype == np.int64
    for i in (0, 1, 137, 499, -1, -500):
        s, off = ds.locate(i)
        np.testing.assert_array_equal(ds.read(s, off)["tokens"], samples[i]["tokens"])
    with pytest.raises(IndexError, match="500 out of range .* 500 samples"):
        ds[500]
    with pytest.raises(IndexError, match="-501"):
        ds[-501]
    with pytest.raises(IndexError, match="offset"):
        ds.read(0, 10**6)
    assert w.summary.stored_bytes == sum(s.bytes for s in ds.index.shards)


def test_huge_sample_is_a_shard_of_one(tmp_path):
    big = {"tokens": np.arange(60_000, dtype=np.uint16)}   # 120 KB > 50 KB shard target
    samples = token_samples(30) + [big] + token_samples(30)
    write(tmp_path, samples, columns={"tokens": "uint16[]"}, shard_size="50KB", block_size="1KiB")
    ds = open_dataset(tmp_path)
    sizes = [s.samples for s in ds.index.shards]
    assert 1 in sizes and sum(sizes) == 61
    np.testing.assert_array_equal(ds[30]["tokens"], big["tokens"])
    np.testing.assert_array_equal(ds[31]["tokens"], samples[31]["tokens"])


def test_in_order_reads_decode_each_block_once(tmp_path):
    write(tmp_path, token_samples(400), columns={"tokens": "uint16[]"}, block_size="4KiB")
    ds = open_dataset(tmp_path)
    assert sum(1 for _ in ds) == 400
    st_ = ds.stats
    blocks = st_["blocks_read"]
    assert 0 < blocks < 40 and st_["block_cache_hits"] == 400 - blocks
    assert st_["bytes_read"] > 0 and st_["stored_bytes_read"] > 0


def test_small_lru_reopens_and_results_stay_right(tmp_path):
    samples = token_samples(300)
    write(tmp_path, samples, columns={"tokens": "uint16[]"}, shard_size="5KB", block_size="1KiB")
    ds = open_dataset(tmp_path, max_open_shards=2)
    for i in np.random.default_rng(1).integers(0, 300, 200):
        np.testing.assert_array_equal(ds[int(i)]["tokens"], samples[i]["tokens"])
    assert ds.stats["open_shards"] <= 2 and ds.stats["shards_opened"] > ds.num_shards


@pytest.mark.parametrize("compression", ["zstd", None])
def test_pickled_dataset_reopens_lazily(tmp_path, compression):
    samples = token_samples(50)
    write(tmp_path, samples, columns={"tokens": "uint16[]"}, compression=compression)
    ds = open_dataset(tmp_path)
    ds[3]  # open a shard (an mmap for uncompressed) before pickling
    copy = pickle.loads(pickle.dumps(ds))
    assert copy.stats["open_shards"] == 0 and copy.fingerprint == ds.fingerprint
    np.testing.assert_array_equal(copy[49]["tokens"], samples[49]["tokens"])
    out = copy[7]["tokens"]
    out[0] = 1  # decoded arrays are writable copies, never views of the map
    np.testing.assert_array_equal(copy[7]["tokens"], samples[7]["tokens"])


def test_output_is_deterministic(tmp_path):
    samples = token_samples(200) * 2
    for d in ("a", "b"):
        write(tmp_path / d, samples, columns={"tokens": "uint16[]"}, shard_size="10KB",
              metadata={"source": "unit"})
    names = sorted(os.listdir(tmp_path / "a"))
    assert names == sorted(os.listdir(tmp_path / "b")) and "index.json" in names
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_index_layout_and_metadata(tmp_path):
    write(tmp_path, token_samples(3), columns={"tokens": "uint16[]"}, metadata={"k": (1, 2)})
    raw = (tmp_path / "index.json").read_bytes()
    assert raw.startswith(b'{\n  "magic": "streamshard-index",\n  "version": 1,')
    idx = DatasetIndex.from_bytes(raw, "index.json")
    assert idx.metadata == {"k": [1, 2]} and idx.block_size == 64 * 1024
    assert idx.shards[0].file == "shard-000000.sss" and len(idx.shards[0].xxh64) == 16
    assert DatasetIndex.from_bytes(idx.to_bytes(), "x").fingerprint == idx.fingerprint


def test_empty_dataset(tmp_path):
    write(tmp_path, [], columns={"tokens": "uint16[]"})
    ds = open_dataset(tmp_path)
    assert len(ds) == 0 and list(ds) == [] and ds.num_shards == 0


def test_overwrite_refused_then_allowed(tmp_path):
    write(tmp_path, token_samples(5), columns={"tokens": "uint16[]"})
    with pytest.raises(DatasetExistsError, match=str(tmp_path)):
        ShardWriter(str(tmp_path), columns={"tokens": "uint16[]"})
    write(tmp_path, token_samples(2), columns={"tokens": "uint16[]"}, overwrite=True)
    assert len(open_dataset(tmp_path)) == 2


def test_exception_inside_with_leaves_no_dataset(tmp_path):
    dest = tmp_path / "ds"
    with pytest.raises(RuntimeError, match="boom"):
        with ShardWriter(str(dest), columns={"tokens": "uint16[]"}, shard_size="2KB",
                         block_size="512") as w:
            for s in token_samples(100):
                w.write(s)
            assert w._written  # some shards were already finished and renamed into place
            raise RuntimeError("boom")
    assert os.listdir(dest) == []


def test_schema_error_names_sample_number(tmp_path):
    with pytest.raises(SchemaError, match="column 'tokens' of sample 2"):
        write(tmp_path, token_samples(2) + [{"tokens": np.zeros(3, np.float64)}],
              columns={"tokens": "uint16[]"})
    assert not (tmp_path / "index.json").exists()


@pytest.mark.parametrize("kwargs, message", [
    ({"shard_size": -3}, "shard_size must be positive, got -3"),
    ({"block_size": "12 parsecs"}, "block_size must be a size"),
    ({"compression": "lz4"}, "compression must be 'zstd' or None"),
    ({"compression_level": 99}, r"compression_level must be an int in \[-100, 22\], got 99"),
    ({"shard_prefix": "../x"}, "shard_prefix must be a relative posix prefix"),
    ({"metadata": {"x": object()}}, "metadata must be JSON-serializable"),
    ({"metadata": {"x": float("inf")}}, "metadata must be JSON-serializable"),  # not valid JSON
])
def test_writer_config_validation(tmp_path, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        ShardWriter(str(tmp_path), columns={"t": "str"}, **kwargs)


def test_shard_prefix_and_file_url(tmp_path):
    write(f"file://{tmp_path}", token_samples(20), columns={"tokens": "uint16[]"},
          shard_prefix="p7-", shard_size="1KB", block_size="256")
    ds = open_dataset(f"file://{tmp_path}")
    assert ds.index.shards[0].file == "p7-shard-000000.sss" and len(ds) == 20


def test_memory_fsspec_dest_round_trip(tmp_path):
    """Remote dest: shards go through a local temp dir and fs.put; index last. Read back by
    copying the bytes through fsspec into a local dir (reading URLs needs the remote cache)."""
    url = "memory://streamshard-test/ds"
    samples = token_samples(80)
    try:
        write(url, samples, columns={"tokens": "uint16[]"}, shard_size="4KB", block_size="1KiB")
        with pytest.raises(DatasetExistsError, match="memory://streamshard-test/ds"):
            ShardWriter(url, columns={"tokens": "uint16[]"})
        fs = fsspec.filesystem("memory")
        names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls("/streamshard-test/ds", detail=False))
        assert names[0] == "index.json" and len(names) > 3
        assert not any(".tmp" in n for n in names)
        for name in names:
            (tmp_path / name).write_bytes(fs.cat_file(f"/streamshard-test/ds/{name}"))
        assert verify_dataset(url).ok and verify_dataset(url).shards_checked == len(names) - 1
        ds = open_dataset(tmp_path)
        for i in range(80):
            np.testing.assert_array_equal(ds[i]["tokens"], samples[i]["tokens"])
        # an exception while writing remotely removes what was uploaded and writes no index
        with pytest.raises(ValueError):
            with ShardWriter("memory://streamshard-test/failed", columns={"t": "str"},
                             shard_size="1KB", block_size="256") as w:
                for i in range(200):
                    w.write({"t": "x" * 50})
                raise ValueError("stop")
        assert not fs.exists("/streamshard-test/failed/index.json")
        assert not [p for p in fs.find("/streamshard-test/failed")]
    finally:
        fsspec.filesystem("memory").rm("/streamshard-test", recursive=True)


@pytest.mark.parametrize("compression", ["zstd", None])
def test_concurrent_reads_with_evictions(tmp_path, compression):
    """4 threads hammer a dataset whose LRU holds 2 of ~15 shards: every read stays correct."""
    from concurrent.futures import ThreadPoolExecutor

    samples = token_samples(300)
    write(tmp_path, samples, columns={"tokens": "uint16[]"}, compression=compression,
          shard_size="5KB", block_size="1KiB")
    ds = open_dataset(tmp_path, max_open_shards=2)

    def check(seed):
        for i in np.random.default_rng(seed).integers(0, 300, 300).tolist():
            if not np.array_equal(ds[i]["tokens"], samples[i]["tokens"]):
                return i
        return None

    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(check, range(8))) == [None] * 8


def test_torch_dataloader_workers_read_a_pickled_dataset(tmp_path):
    """Real worker processes: the Dataset travels by pickle and reopens its shards lazily."""
    torch = pytest.importorskip("torch")
    samples = token_samples(64)
    write(tmp_path, samples, columns={"tokens": "uint16[]"}, shard_size="3KB")
    ds = open_dataset(tmp_path)
    ds[0]  # an open shard in the parent must not leak into (or break) the workers

    class MapStyle(torch.utils.data.Dataset):
        def __len__(self):
            return len(ds)

        def __getitem__(self, i):
            return torch.from_numpy(ds[i]["tokens"].astype(np.int64))

    loader = torch.utils.data.DataLoader(MapStyle(), batch_size=8, num_workers=2)
    got = torch.cat(list(loader)).numpy()
    np.testing.assert_array_equal(got, np.stack([s["tokens"] for s in samples]).astype(np.int64))


def test_shared_block_cache_decompresses_each_block_once(tmp_path):
    """Random reads inside a window that fits the block cache decompress every block once."""
    import random

    from streamshard import ShardWriter, open_dataset

    path = str(tmp_path / "bc")
    with ShardWriter(path, columns={"x": "uint16[512]"}, shard_size="64KB", block_size="8KiB") as w:
        for i in range(400):
            w.write({"x": np.full(512, i, np.uint16)})
    order = list(range(400))
    random.Random(0).shuffle(order)
    in_order = open_dataset(path, block_cache=0)
    assert sum(1 for _ in in_order) == 400
    total_blocks = in_order.stats["blocks_read"]  # in-order reading decodes each block once
    cached = open_dataset(path, block_cache="4MiB")
    assert [int(cached[i]["x"][0]) for i in order] == order
    assert cached.stats["blocks_read"] == total_blocks
    uncached = open_dataset(path, block_cache=0)
    assert [int(uncached[i]["x"][0]) for i in order] == order
    assert uncached.stats["blocks_read"] > 300  # one block decompression for nearly every sample
