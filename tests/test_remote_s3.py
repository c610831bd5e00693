"""CachedSource against a real S3 API: moto in server mode on 127.0.0.1, through s3fs."""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest

from streamshard.errors import ConfigError, CorruptionError, StorageError
from streamshard.reader import open_dataset
from streamshard.remote import CachedSource, RetryPolicy
from streamshard.remote.source import url_key
from streamshard.testing import write_id_dataset
from tests.remote_servers import AuthS3Server, CountingProxy, S3Server, s3_options

pytestmark = pytest.mark.slow(reason="moto S3 in server mode, a server restart, DataLoader workers")
FAST_RETRY = RetryPolicy(attempts=3, base_delay=0.01, max_delay=0.05, deadline=5)


@pytest.fixture(scope="module")
def s3():
    server = S3Server().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def local_ds(tmp_path_factory):
    return write_id_dataset(str(tmp_path_factory.mktemp("local") / "ds"), 3000, shard_size="4KB")


_buckets = iter(range(10**6))


def upload(s3, local: str) -> str:
    """A fresh bucket holding ``local`` under ``ds/``; returns the dataset URL."""
    fs = s3.fs()
    bucket = f"b{os.getpid()}-{next(_buckets)}"
    s3.make_bucket(bucket)
    fs.put(local + "/", f"{bucket}/ds/", recursive=True)
    return f"s3://{bucket}/ds"


def same(a: dict, b: dict) -> bool:
    return a["id"] == b["id"] and np.array_equal(a["tokens"], b["tokens"])


def source(s3, url, cache_dir, **kw) -> CachedSource:
    kw.setdefault("retry", FAST_RETRY)
    return CachedSource(url, cache_dir=str(cache_dir), storage_options=s3.options(), **kw)


def test_end_to_end_equal_to_local_and_index_fetched_once(s3, local_ds, tmp_path):
    url = upload(s3, local_ds)
    local = open_dataset(local_ds)
    src = source(s3, url, tmp_path / "cache")
    remote = open_dataset(url, source=src)
    assert remote.fingerprint == local.fingerprint and len(remote) == len(local)
    assert all(same(remote[i], local[i]) for i in range(len(local)))
    stats = src.stats()
    assert stats["misses"] == local.num_shards and stats["index_fetches"] == 1
    assert stats["bytes_fetched"] == sum(s.bytes for s in local.index.shards)
    remote.close()

    # a second process-like open on the same node: index and shards come from the cache
    again_src = source(s3, url, tmp_path / "cache")
    again = open_dataset(url, source=again_src)
    assert all(same(again[i], local[i]) for i in range(0, len(local), 7))
    s2 = again_src.stats()
    assert (s2["index_fetches"], s2["index_hits"], s2["misses"], s2["bytes_fetched"]) == (0, 1, 0, 0)
    assert s2["hits"] == local.num_shards
    again.close()

    # the reader's own path: open_dataset builds the CachedSource from the URL
    plain = open_dataset(url, cache_dir=str(tmp_path / "cache"), storage_options=s3.options())
    assert isinstance(plain.source, CachedSource) and same(plain[-1], local[-1])
    plain.close()


def test_rewritten_remote_dataset_is_detected_never_mixed(s3, local_ds, tmp_path):
    url = upload(s3, local_ds)
    cache = tmp_path / "cache"
    first = open_dataset(url, source=source(s3, url, cache))
    old_fp = first.fingerprint
    assert first[0]["id"] == 0
    first.close()
    # rewrite the remote dataset in place with different content and shard names reused
    other = write_id_dataset(str(tmp_path / "other"), 1200, shard_size="4KB")
    fs = s3.fs()
    fs.rm(url[len("s3://"):], recursive=True)
    fs.put(other + "/", url[len("s3://"):] + "/", recursive=True)
    stale = first.source
    with pytest.raises(CorruptionError, match="changed while in use"):
        stale.read_index()
    second_src = source(s3, url, cache)
    second = open_dataset(url, source=second_src)
    new = open_dataset(other)
    assert second.fingerprint == new.fingerprint != old_fp
    assert len(second) == 1200 and all(same(second[i], new[i]) for i in range(len(new)))
    # the stale source's re-read already refreshed the node's cached index
    assert stale.stats()["index_fetches"] == 2 and second_src.stats()["index_hits"] == 1
    namespaces = sorted(os.listdir(cache / url_key(url, s3.options())))
    assert old_fp in namespaces and new.fingerprint in namespaces
    second.close()


def test_server_down_mid_epoch_then_restarted_completes_exactly(local_ds, tmp_path):
    server = S3Server().start()
    try:
        url = upload(server, local_ds)
        local = open_dataset(local_ds)
        policy = RetryPolicy(attempts=40, base_delay=0.05, max_delay=0.3, jitter=0.5, deadline=30)
        src = source(server, url, tmp_path / "cache", retry=policy)
        remote = open_dataset(url, source=src, max_open_shards=2)
        ids: list[int] = []
        half = len(local) // 2
        for i in range(len(local)):
            if i == half:
                server.stop()
                restarter = threading.Timer(1.0, server.start)
                restarter.start()
                t_stop = time.monotonic()
            sample = remote[i]
            assert same(sample, local[i])
            ids.append(int(sample["id"]))
        restarter.join(10)
        assert ids == list(range(len(local)))  # nothing lost, nothing repeated
        stats = src.stats()
        assert stats["retries"] >= 1, stats
        assert time.monotonic() - t_stop >= 1.0
        remote.close()
    finally:
        server.stop()


def test_missing_objects_fail_at_once_naming_the_url(s3, local_ds, tmp_path):
    url = upload(s3, local_ds)
    missing = source(s3, url + "-missing", tmp_path / "c1")
    with pytest.raises(StorageError) as err:
        open_dataset(url + "-missing", source=missing)
    assert not err.value.transient and err.value.url == url + "-missing/index.json"
    assert url + "-missing/index.json" in str(err.value)
    # a shard deleted behind the index's back
    src = source(s3, url, tmp_path / "c2")
    ds = open_dataset(url, source=src)
    victim = ds.index.shards[1]
    s3.fs().rm(f"{url[len('s3://'):]}/{victim.file}")
    with pytest.raises(StorageError) as err:
        ds.read(1, 0)
    assert not err.value.transient and f"{url}/{victim.file}" in str(err.value)
    # "at once": no retry (counted, not timed: a loaded machine makes any time bound flaky)
    assert src.stats()["retries"] == 0 and missing.stats()["retries"] == 0
    ds.close()


def test_bad_credentials_are_a_permanent_403(tmp_path):
    server = AuthS3Server().start()
    try:
        src = CachedSource("s3://bucket/ds", cache_dir=str(tmp_path / "c"), retry=FAST_RETRY,
                           storage_options=AuthS3Server_options(server))
        t0 = time.monotonic()
        with pytest.raises(StorageError) as err:
            src.read_index()
        assert not err.value.transient and "s3://bucket/ds/index.json" in str(err.value)
        assert src.stats()["retries"] == 0 and time.monotonic() - t0 < 10
        assert "PermissionError" in str(err.value) or "403" in str(err.value)
    finally:
        server.stop()


def AuthS3Server_options(server) -> dict:  # noqa: N802 - reads as "the options of that server"
    from tests.remote_servers import s3_options

    return s3_options(server.endpoint, key="AKIAWRONGWRONGWRONG1", secret="not-the-secret")


def test_corrupted_remote_object_is_named(s3, local_ds, tmp_path):
    url = upload(s3, local_ds)
    src = source(s3, url, tmp_path / "cache")
    ds = open_dataset(url, source=src)
    victim = ds.index.shards[2]
    key = f"{url[len('s3://'):]}/{victim.file}"
    fs = s3.fs()
    data = bytearray(fs.cat_file(key))
    data[len(data) // 2] ^= 0xFF  # one flipped byte, same size
    fs.pipe_file(key, bytes(data))
    with pytest.raises(CorruptionError) as err:
        ds.read(2, 0)
    msg = str(err.value)
    assert f"{url}/{victim.file}" in msg and victim.xxh64 in msg
    assert src.stats()["corrupt_downloads"] == 2  # downloaded once more before giving up
    assert same(ds.read(0, 0), open_dataset(local_ds).read(0, 0))  # other shards still fine
    ds.close()


def test_too_small_cache_limit_is_a_config_error_at_start(s3, local_ds, tmp_path):
    url = upload(s3, local_ds)
    largest = max(s.bytes for s in open_dataset(local_ds).index.shards)
    with pytest.raises(ConfigError) as err:
        open_dataset(url, source=source(s3, url, tmp_path / "c", cache_limit=largest * 2,
                                        min_resident_shards=3))
    assert str(largest * 2) in str(err.value) and str(largest) in str(err.value)
    assert str(largest * 3) in str(err.value)
    # the same budget with a working set that fits reads the whole dataset, evicting as it goes
    src = source(s3, url, tmp_path / "c", cache_limit=largest * 2, min_resident_shards=2)
    ds = open_dataset(url, source=src, max_open_shards=1)
    local = open_dataset(local_ds)
    assert all(same(ds[i], local[i]) for i in range(0, len(local), 3))
    assert src.stats()["evictions"] >= local.num_shards - 2
    assert src.cache.usage() <= largest * 2
    ds.close()


def test_prefetch_fetches_ahead_and_streaming_dataset_reads_s3(s3, local_ds, tmp_path):
    url = upload(s3, local_ds)
    src = source(s3, url, tmp_path / "cache")
    ds = open_dataset(url, source=src, max_open_shards=2)
    src.prefetch(list(ds.index.shards))
    deadline = time.monotonic() + 20
    while src.stats()["prefetched"] < ds.num_shards and time.monotonic() < deadline:
        time.sleep(0.02)
    assert src.stats()["prefetched"] == ds.num_shards
    local = open_dataset(local_ds)
    assert all(same(ds[i], local[i]) for i in range(len(local)))
    stats = src.stats()
    assert stats["misses"] == 0 and stats["hits"] == ds.num_shards
    src.close()
    ds.close()

    from streamshard.dataset import StreamingDataset

    remote = StreamingDataset(url, batch_size=50, seed=3, cache_dir=str(tmp_path / "cache2"),
                              storage_options=s3.options())
    here = StreamingDataset(local_ds, batch_size=50, seed=3)
    got = [int(s["id"]) for batch in remote for s in batch]
    want = [int(s["id"]) for batch in here for s in batch]
    assert got == want and len(got) == 3000


def ids_of(samples: list) -> list[int]:
    return [int(s["id"]) for s in samples]


def test_dataloader_workers_share_the_cache(s3, local_ds, tmp_path):
    from streamshard.dataset import StreamingDataset
    from streamshard.loader import StreamingDataLoader

    url = upload(s3, local_ds)
    cache = tmp_path / "cache"
    remote = StreamingDataset(url, batch_size=100, seed=5, cache_dir=str(cache),
                              storage_options=s3.options())
    loader = StreamingDataLoader(remote, num_workers=2, collate_fn=ids_of)
    got = [i for batch in loader for i in batch]
    here = StreamingDataset(local_ds, batch_size=100, seed=5)
    assert got == [int(s["id"]) for batch in here for s in batch]
    assert sorted(got) == list(range(3000))
    data = [p for p in cache.rglob("*") if p.parent.name == "data"]
    assert len(data) == open_dataset(local_ds).num_shards  # one copy per shard, no temp left


def test_retry_policy_is_the_only_retry_counted_at_the_server(s3, local_ds, tmp_path, caplog):
    """RetryPolicy(attempts=3) against an object that always answers 503: exactly 3 requests
    reach the server (botocore's and s3fs's own retries are off), with our 2 sleeps between."""
    url = upload(s3, local_ds)
    proxy = CountingProxy(s3).start()
    try:
        sleeps: list[float] = []
        policy = RetryPolicy(attempts=3, base_delay=0.01, max_delay=0.01, deadline=60,
                             sleep=sleeps.append)
        # storage options as a user writes them: no retry settings of their own
        src = CachedSource(url, cache_dir=str(tmp_path / "c"), retry=policy,
                           storage_options=s3_options(proxy.endpoint, fast_fail=False))
        ds = open_dataset(url, source=src)
        victim = ds.index.shards[1]
        suffix = f"/ds/{victim.file}"
        proxy.unavailable.add(suffix)
        with pytest.raises(StorageError) as err:
            src.shard_path(victim)
        assert err.value.transient and "after 3 attempts" in str(err.value)
        assert len(proxy.requests_for(suffix)) == 3, proxy.requests_for(suffix)
        assert len(sleeps) == 2 and src.stats()["retries"] == 2
        retried = [r for r in caplog.records if r.name == "streamshard.remote.source"]
        assert len(retried) == 2 and suffix in retried[0].getMessage()  # logged, not printed
        proxy.unavailable.clear()  # the next read succeeds at once
        assert open_dataset(url, source=src)[int(ds.index.offsets[1])]["id"] == ds.index.offsets[1]
        src.close()
    finally:
        proxy.stop()



@pytest.mark.slow(reason="forkserver DataLoader workers import torch afresh (~5-10 s)")
def test_obstore_workers_start_from_a_forkserver(s3, local_ds, tmp_path):
    """obstore's runtime blocks in forked children (even with a new store), so a loader over
    an obstore stream starts its workers from a forkserver unless told otherwise, and refuses
    "fork" by name; the batches equal the local dataset's."""
    pytest.importorskip("obstore")
    from streamshard.dataset import StreamingDataset
    from streamshard.errors import ConfigError
    from streamshard.loader import StreamingDataLoader

    url = upload(s3, local_ds)
    remote = StreamingDataset(url, batch_size=100, seed=5, cache_dir=str(tmp_path / "cache"),
                              storage_options={**s3.options(), "backend": "obstore"})
    assert remote[0]  # the parent has used obstore (index and a shard) before any worker starts
    with pytest.raises(ConfigError, match="does not survive fork"):
        StreamingDataLoader(remote, num_workers=2, collate_fn=ids_of,
                            multiprocessing_context="fork")
    loader = StreamingDataLoader(remote, num_workers=2, collate_fn=ids_of, timeout=120)
    assert loader.multiprocessing_context.get_start_method() == "forkserver"
    got = [i for batch in loader for i in batch]
    here = StreamingDataset(local_ds, batch_size=100, seed=5)
    assert got == [int(s["id"]) for batch in here for s in batch]
    plain = StreamingDataset(local_ds, batch_size=100, seed=5)
    assert StreamingDataLoader(plain, num_workers=2).multiprocessing_context is None
