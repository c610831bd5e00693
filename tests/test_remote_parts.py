"""Parallel ranged shard downloads and the latency-capped S3 proxy, against moto in server mode."""

from __future__ import annotations

import glob
import os
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamshard.errors import ConfigError, CorruptionError, StorageError
from streamshard.reader import open_dataset
from streamshard.remote import CachedSource, RetryPolicy
from streamshard.remote.cache import file_xxh64
from streamshard.remote.parts import PartLengthError, PartPolicy, download_parts
from streamshard.remote.storage import call_with_retry
from streamshard.testing import write_id_dataset
from tests.latency_proxy import LatencyProxy
from tests.remote_servers import S3Server, s3_options

NO_SLEEP = RetryPolicy(attempts=3, base_delay=0.0, max_delay=0.0, deadline=5, sleep=lambda d: None)
PARTS = PartPolicy(part_size=4 << 10, min_size=8 << 10, parts_in_flight=3)


@pytest.fixture(scope="module")
def s3():
    server = S3Server().start()
    yield server
    server.stop()


@pytest.fixture()
def proxy(s3):
    p = LatencyProxy(s3.port, latency=0.0, bandwidth=0).start()
    yield p
    p.stop()


@pytest.fixture(scope="module")
def uploaded(s3, tmp_path_factory):
    local = write_id_dataset(str(tmp_path_factory.mktemp("local") / "ds"), 3000, shard_size="32KB",
                             compression=None)
    s3.make_bucket("parts")
    s3.fs().put(local + "/", "parts/ds/", recursive=True)
    return local, "s3://parts/ds"


def _source(proxy, url, cache, **kw) -> CachedSource:
    return CachedSource(url, cache_dir=str(cache), storage_options=s3_options(proxy.endpoint),
                        retry=NO_SLEEP, parts=PARTS, **kw)


def _big_shard(local):
    shards = open_dataset(local).index.shards
    shard = max(shards, key=lambda s: s.bytes)
    assert len(PARTS.ranges(shard.bytes)) >= 3, "the test dataset must have multi-part shards"
    return shard


def test_proxy_forwards_and_delays_first_byte(s3, uploaded):
    local, url = uploaded
    slow = LatencyProxy(s3.port, latency=0.05, bandwidth=0).start()
    try:
        fs = s3.fs(client_kwargs={"endpoint_url": slow.endpoint, "region_name": "us-east-1"})
        t0 = time.monotonic()
        data = fs.cat_file("parts/ds/index.json", start=10, end=30)
        elapsed = time.monotonic() - t0
    finally:
        slow.stop()
    with open(os.path.join(local, "index.json"), "rb") as f:
        assert data == f.read()[10:30]
    assert elapsed >= 0.05  # a lower bound the proxy guarantees, not a speed target
    assert slow.ranged_gets("index.json") == [("bytes=10-29", 206)]


def test_ranged_parallel_download_is_exact(proxy, uploaded, tmp_path):
    local, url = uploaded
    shard = _big_shard(local)
    src = _source(proxy, url, tmp_path / "cache")
    path = src.shard_path(shard)
    assert file_xxh64(path) == file_xxh64(os.path.join(local, shard.file))
    parts = PARTS.ranges(shard.bytes)
    got = sorted(proxy.ranged_gets(shard.file))
    assert got == sorted((f"bytes={s}-{e - 1}", 206) for s, e in parts)
    assert src.stats()["bytes_fetched"] == shard.bytes
    src.unpin(shard)
    src.close()


def test_whole_dataset_reads_equal_local_through_parts(proxy, uploaded, tmp_path):
    local, url = uploaded
    ref = open_dataset(local)
    ds = open_dataset(url, source=_source(proxy, url, tmp_path / "cache"))
    for i in range(0, len(ref), 37):
        assert ds[i]["id"] == ref[i]["id"]
    ds.close()


def test_corrupted_part_is_redownloaded_once(proxy, uploaded, tmp_path):
    local, url = uploaded
    shard = _big_shard(local)
    proxy.knobs.corrupt[shard.file] = 1
    src = _source(proxy, url, tmp_path / "cache")
    path = src.shard_path(shard)
    assert file_xxh64(path) == file_xxh64(os.path.join(local, shard.file))
    assert src.stats()["corrupt_downloads"] == 1
    assert len(proxy.ranged_gets(shard.file)) == 2 * len(PARTS.ranges(shard.bytes))
    src.close()


def test_corrupted_parts_every_time_name_the_shard_and_leave_nothing(proxy, uploaded, tmp_path):
    local, url = uploaded
    shard = _big_shard(local)
    proxy.knobs.corrupt[shard.file] = 10**6
    cache = tmp_path / "cache"
    src = _source(proxy, url, cache)
    with pytest.raises(CorruptionError, match=shard.file):
        src.shard_path(shard)
    # bounded: two whole downloads, each its parts once
    assert len(proxy.ranged_gets(shard.file)) == 2 * len(PARTS.ranges(shard.bytes))
    data_files = [p for p in glob.glob(str(cache / "**" / "*"), recursive=True)
                  if os.path.isfile(p) and shard.file.split("/")[-1] in os.path.basename(p)
                  and not p.endswith(".json") and os.sep + "locks" + os.sep not in p]
    assert data_files == []
    assert not [p for p in glob.glob(str(cache / "**" / "*.tmp*"), recursive=True)]
    src.close()


def _local_reader(data: bytes, short: dict):
    def read(start: int, end: int) -> bytes:
        if short.get("left", 0) > 0:
            short["left"] -= 1
            return data[start:end - 1]
        return data[start:end]
    return read


def _retrying(fn):
    return call_with_retry(fn, url="mem://x/shard-0", what="ranged download", policy=NO_SLEEP)


def test_short_part_is_retried_then_reported(tmp_path):
    data = os.urandom(100_000)
    policy = PartPolicy(part_size=10_000, min_size=20_000, parts_in_flight=4)
    out = tmp_path / "a"
    download_parts(_local_reader(data, {"left": 2}), str(out), len(data), policy, retrying=_retrying)
    assert out.read_bytes() == data
    with pytest.raises(StorageError, match="shard-0") as info:
        download_parts(_local_reader(data, {"left": 10**6}), str(tmp_path / "b"), len(data), policy,
                       retrying=_retrying)
    assert info.value.transient and isinstance(info.value.__cause__, PartLengthError)
    with pytest.raises(FileExistsError):  # O_EXCL: never writes over an existing file
        download_parts(_local_reader(data, {}), str(out), len(data), policy, retrying=_retrying)


@given(size=st.integers(0, 10**6), part=st.integers(1, 10**5), minimum=st.integers(1, 10**5))
@settings(max_examples=200, deadline=None)
def test_part_ranges_cover_the_object_exactly(size, part, minimum):
    ranges = PartPolicy(part_size=part, min_size=minimum).ranges(size)
    assert ranges[0][0] == 0 and ranges[-1][1] == size
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    if len(ranges) > 1:
        assert all(0 < e - s <= part for s, e in ranges)


def test_part_policy_and_connections_are_validated():
    with pytest.raises(ConfigError, match="part_size"):
        PartPolicy(part_size=0)
    with pytest.raises(ConfigError, match="max_connections"):
        CachedSource("s3://b/ds", max_connections=0)
    with pytest.raises(ConfigError, match="PartPolicy"):
        CachedSource("s3://b/ds", parts={"part_size": 1})


def test_obstore_backend_reads_the_same_and_classifies_errors(proxy, uploaded, tmp_path):
    pytest.importorskip("obstore")
    local, url = uploaded
    shard = _big_shard(local)
    opts = {**s3_options(proxy.endpoint), "backend": "obstore"}
    src = CachedSource(url, cache_dir=str(tmp_path / "cache"), storage_options=opts,
                       retry=NO_SLEEP, parts=PARTS)
    ds = open_dataset(url, source=src)
    assert file_xxh64(src.shard_path(shard)) == file_xxh64(os.path.join(local, shard.file))
    assert len(proxy.ranged_gets(shard.file)) == len(PARTS.ranges(shard.bytes))
    assert ds[5]["id"] == open_dataset(local)[5]["id"]
    ds.close()
    missing = CachedSource(url + "-missing", cache_dir=str(tmp_path / "c2"), storage_options=opts,
                           retry=NO_SLEEP)
    with pytest.raises(StorageError, match="index.json") as info:
        missing.read_index()
    assert not info.value.transient
    with pytest.raises(ConfigError, match="backend"):
        CachedSource(url, storage_options={"backend": "boto"}, cache_dir=str(tmp_path / "c3"))


def test_connections_and_prefetch_bytes_stay_within_their_bounds_at_the_server(s3, uploaded, tmp_path):
    # 8 prefetch threads and 3 parts per large shard want more than 2 connections at once; the
    # proxy's 30 ms first byte keeps every GET open long enough for them to overlap if allowed
    local, url = uploaded
    shards = list(open_dataset(local).index.shards)
    bound = 2 * max(s.bytes for s in shards)
    slow = LatencyProxy(s3.port, latency=0.03, bandwidth=0).start()
    try:
        src = _source(slow, url, tmp_path / "cache", max_connections=2, prefetch_bytes=bound)
        src.prefetch(shards)
        for shard in shards:  # the reader's own requests share the same 2 connections
            src.shard_path(shard)
        stats = src.stats()
        src.close()
    finally:
        slow.stop()
    assert 1 <= slow.knobs.peak_gets <= 2
    assert 1 <= stats["peak_connections"] <= 2
    assert 0 < stats["prefetch_peak_bytes"] <= bound
    assert stats["prefetched"] + stats["misses"] == len(shards)
    assert stats["bytes_fetched"] == sum(s.bytes for s in shards)
    assert len(slow.ranged_gets(_big_shard(local).file)) == len(PARTS.ranges(_big_shard(local).bytes))


def test_s3fs_connection_pool_matches_max_connections(proxy, uploaded, tmp_path):
    pytest.importorskip("s3fs")
    _, url = uploaded
    src = _source(proxy, url, tmp_path / "cache", max_connections=24)
    assert src._remote.fs.config_kwargs["max_pool_connections"] == 24  # botocore's default: 10
    mine = {**s3_options(proxy.endpoint), "config_kwargs": {"max_pool_connections": 5}}
    kept = CachedSource(url, cache_dir=str(tmp_path / "c2"), storage_options=mine, max_connections=24)
    assert kept._remote.fs.config_kwargs["max_pool_connections"] == 5  # the caller's choice wins
    assert kept._remote.fs.config_kwargs["retries"] == {"total_max_attempts": 1, "mode": "standard"}


@pytest.mark.parametrize("backend", ["s3fs", "obstore"])
def test_cold_epoch_reads_exactly_the_warm_and_local_samples(backend, proxy, uploaded, tmp_path):
    if backend == "obstore":
        pytest.importorskip("obstore")
    from streamshard import World
    from streamshard.dataset import StreamingDataset

    local, url = uploaded
    opts = {**s3_options(proxy.endpoint), "backend": backend}

    def epoch(src: str, cache, options) -> tuple[list, dict]:
        ds = StreamingDataset(src, batch_size=16, seed=3, lanes=4, world=World(), cache_dir=cache,
                              storage_options=options)
        ids = [[int(s["id"]) for s in b] for b in ds]
        source = ds.datasets[0].source
        stats = source.stats() if isinstance(source, CachedSource) else {}
        if isinstance(source, CachedSource):
            source.close()
        ds.datasets[0].close()
        return ids, stats

    cache = str(tmp_path / "cache")
    cold, cold_stats = epoch(url, cache, opts)
    warm, warm_stats = epoch(url, cache, opts)
    here, _ = epoch(local, None, None)
    assert cold == warm == here
    assert sorted(i for b in cold for i in b) == sorted(set(i for b in cold for i in b))
    total = sum(s.bytes for s in open_dataset(local).index.shards)
    assert cold_stats["bytes_fetched"] == total and warm_stats["bytes_fetched"] == 0
    assert cold_stats["prefetched"] > 0  # the loader's hints reached the cache
