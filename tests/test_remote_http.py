"""CachedSource against a real HTTP server (https-style reads) on 127.0.0.1: transient and
permanent errors, processes racing for a shard, a downloader killed with SIGKILL, fork/pickle."""

from __future__ import annotations

import glob
import multiprocessing as mp
import os
import pickle
import signal
import time
from collections import deque

import numpy as np
import pytest

from streamshard.errors import StorageError
from streamshard.reader import open_dataset
from streamshard.remote import CachedSource, RetryPolicy
from streamshard.remote.cache import file_xxh64
from streamshard.testing import write_id_dataset
from tests.remote_servers import HTTPServer, download_forever, race_for_shard

pytestmark = pytest.mark.slow(reason="real HTTP server, racing and SIGKILLed download processes")
FAST_RETRY = RetryPolicy(attempts=5, base_delay=0.01, max_delay=0.05, deadline=10)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A dataset directory ``<root>/ds`` and a server over ``<root>``."""
    root = tmp_path_factory.mktemp("www")
    write_id_dataset(str(root / "ds"), 3000, shard_size="4KB")
    server = HTTPServer(str(root)).start()
    yield server, str(root / "ds")
    server.stop()


@pytest.fixture()
def http(served):
    server, local = served
    control = server.control
    with control.lock:
        control.log.clear()
        control.fail.clear()
        control.forbidden.clear()
        control.throttle.clear()
    return server, local


def test_opening_a_remote_dataset_parses_its_index_once(http, tmp_path, monkeypatch):
    """CachedSource parses the index to check it (fingerprint, budget); the Dataset takes that
    parse (``load_index``) instead of parsing the bytes again, cold and warm (the warm open
    reads the node's cached copy). Before, every remote open parsed the index twice."""
    from streamshard.index import DatasetIndex

    server, local_path = http
    calls = []
    parse = DatasetIndex.from_bytes.__func__
    monkeypatch.setattr(DatasetIndex, "from_bytes", classmethod(
        lambda cls, *a, **kw: calls.append(a[1:]) or parse(cls, *a, **kw)))
    for cache, counter in (("cold", "index_fetches"), ("warm", "index_hits")):
        calls.clear()
        ds = open_dataset(f"{server.url}/ds", cache_dir=str(tmp_path / "cache"))
        assert len(calls) == 1 and len(ds) == 3000, cache
        assert ds.source.stats()[counter] == 1
        ds.close()


def same(a, b) -> bool:
    return a["id"] == b["id"] and np.array_equal(a["tokens"], b["tokens"])


def test_http_end_to_end_and_index_cached_by_etag(http, tmp_path):
    server, local_path = http
    url = f"{server.url}/ds"
    local = open_dataset(local_path)
    src = CachedSource(url, cache_dir=str(tmp_path / "c"), retry=FAST_RETRY)
    ds = open_dataset(url, source=src)
    assert all(same(ds[i], local[i]) for i in range(len(local)))
    again = CachedSource(url, cache_dir=str(tmp_path / "c"), retry=FAST_RETRY)
    again.read_index()
    assert (src.stats()["index_fetches"], again.stats()["index_hits"]) == (1, 1)
    assert server.control.count("GET", "ds/index.json") == 1  # HEADs only after the first
    for shard in local.index.shards:  # exactly one GET per shard: whole-shard downloads
        assert server.control.count("GET", f"ds/{shard.file}") == 1
    ds.close()


def test_transient_5xx_and_429_are_retried_then_succeed(http, tmp_path):
    server, local_path = http
    shard = open_dataset(local_path).index.shards[1]
    server.control.fail[f"ds/{shard.file}"] = deque([503, 500, 429])
    src = CachedSource(f"{server.url}/ds", cache_dir=str(tmp_path / "c"), retry=FAST_RETRY)
    src.read_index()
    path = src.shard_path(shard)
    assert file_xxh64(path) == shard.xxh64
    assert src.stats()["retries"] == 3
    assert [s for m, p, s in server.control.log if p == f"ds/{shard.file}"] == [503, 500, 429, 200]


def test_transient_errors_exhaust_a_bounded_policy(http, tmp_path):
    server, local_path = http
    shard = open_dataset(local_path).index.shards[0]
    server.control.fail[f"ds/{shard.file}"] = deque([503] * 50)
    src = CachedSource(f"{server.url}/ds", cache_dir=str(tmp_path / "c"),
                       retry=RetryPolicy(attempts=4, base_delay=0.01, max_delay=0.02))
    src.read_index()
    with pytest.raises(StorageError) as err:
        src.shard_path(shard)
    assert err.value.transient and f"{server.url}/ds/{shard.file}" in str(err.value)
    assert server.control.count("GET", f"ds/{shard.file}") == 4


@pytest.mark.parametrize("status", [403, 404])
def test_403_and_404_fail_at_once_naming_the_url(http, tmp_path, status):
    server, local_path = http
    shard = open_dataset(local_path).index.shards[2]
    path = f"ds/{shard.file}"
    if status == 403:
        server.control.forbidden.add(path)
    else:
        server.control.fail[path] = deque([404])
    src = CachedSource(f"{server.url}/ds", cache_dir=str(tmp_path / "c"), retry=FAST_RETRY)
    src.read_index()
    with pytest.raises(StorageError) as err:
        src.shard_path(shard)
    assert not err.value.transient and err.value.url == f"{server.url}/{path}"
    assert f"{server.url}/{path}" in str(err.value)
    assert server.control.count("GET", path) == 1 and src.stats()["retries"] == 0
    # a denied index is permanent too (fsspec's HEAD->FileNotFoundError wraps the 403)
    server.control.forbidden.add("ds/index.json")
    with pytest.raises(StorageError) as err:
        CachedSource(f"{server.url}/ds", cache_dir=str(tmp_path / "c2"), retry=FAST_RETRY).read_index()
    assert not err.value.transient and "index.json" in str(err.value)


def test_two_processes_race_for_one_shard_download_once(http, tmp_path):
    server, local_path = http
    shard = open_dataset(local_path).index.shards[3]
    server.control.throttle[f"ds/{shard.file}"] = (512, 0.1)  # ~0.8 s download: they overlap
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=race_for_shard,
                         args=(f"{server.url}/ds", str(tmp_path / "c"), shard, barrier, results))
             for _ in range(2)]
    for p in procs:
        p.start()
    got = [results.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    assert [h for _, h, _ in got] == [shard.xxh64, shard.xxh64]
    assert server.control.count("GET", f"ds/{shard.file}") == 1
    assert sorted((s["misses"], s["waits"]) for _, _, s in got) == [(0, 1), (1, 0)]


def test_sigkilled_downloader_leaves_a_usable_cache(http, tmp_path):
    server, local_path = http
    shard = open_dataset(local_path).index.shards[4]
    server.control.throttle[f"ds/{shard.file}"] = (256, 0.2)  # minutes: it is killed long before
    cache = str(tmp_path / "c")
    ctx = mp.get_context("spawn")
    child = ctx.Process(target=download_forever, args=(f"{server.url}/ds", cache, shard))
    child.start()
    deadline = time.monotonic() + 30
    temps: list[str] = []
    while not temps and time.monotonic() < deadline:  # temp file made and body started
        if server.control.count("GET", f"ds/{shard.file}"):
            temps = glob.glob(os.path.join(cache, "*", "*", "data", "*#tmp-*"))
        time.sleep(0.02)
    assert temps, "the child never started downloading"
    time.sleep(0.3)  # a few throttled chunks into the ~3 s body
    os.kill(child.pid, signal.SIGKILL)
    child.join(10)
    assert child.exitcode == -signal.SIGKILL
    server.control.throttle.clear()
    src = CachedSource(f"{server.url}/ds", cache_dir=cache, retry=FAST_RETRY)
    src.read_index()
    t0 = time.monotonic()
    path = src.shard_path(shard)  # the dead process's lock is gone: no wait
    assert time.monotonic() - t0 < 5
    assert file_xxh64(path) == shard.xxh64
    assert not any(os.path.exists(t) for t in temps)
    stats = src.stats()
    assert stats["temp_cleaned"] == 1 and stats["misses"] == 1
    assert src.cache.usage() == shard.bytes  # the dead reservation was replaced, not added


def test_pickled_and_forked_copies_work_and_keep_parent_pins(http, tmp_path):
    server, local_path = http
    shards = open_dataset(local_path).index.shards
    src = CachedSource(f"{server.url}/ds", cache_dir=str(tmp_path / "c"), retry=FAST_RETRY,
                       cache_limit=shards[0].bytes + shards[1].bytes + 16)
    src.read_index()
    src.shard_path(shards[0])  # pinned by the parent
    copy = pickle.loads(pickle.dumps(src))
    assert copy.fingerprint == src.fingerprint and repr(copy) == repr(src)
    assert file_xxh64(copy.shard_path(shards[1])) == shards[1].xxh64
    copy.unpin(shards[1])
    pid = os.fork()
    if pid == 0:  # child: inherited source, fetches shard 2, which must evict 1 and never 0
        code = 1
        try:
            src.shard_path(shards[2])
            src.close()
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    entries = {meta["file"] for _, _, meta in src.cache.entries()}
    assert entries == {shards[0].file, shards[2].file}
    assert file_xxh64(src.shard_path(shards[0])) == shards[0].xxh64  # parent's pin survived

