"""ShardCache, RetryPolicy and Prefetcher on local files (no server): locks, budget, eviction,
verification, retry classification. The server-backed tests are in test_remote_s3/_http."""

from __future__ import annotations

import errno
import fcntl
import itertools
import json
import os
import random
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import pytest
import xxhash

from streamshard.errors import ConfigError, CorruptionError, StorageError
from streamshard.remote import RetryPolicy, ShardCache
from streamshard.remote.prefetch import Prefetcher
from streamshard.remote.storage import call_with_retry, is_transient

NS = "u0/fp0"


def blob(i: int, size: int = 1000) -> bytes:
    return bytes((i * 31 + k) % 251 for k in range(size))


class Origin:
    """A fetch callable over in-memory objects that counts its downloads."""

    def __init__(self, objects: dict[str, bytes]):
        self.objects = dict(objects)
        self.fetches: list[str] = []

    def fetcher(self, name: str):
        def fetch(tmp: str) -> None:
            self.fetches.append(name)
            with open(tmp, "wb") as f:
                f.write(self.objects[name])
        return fetch


def get(cache: ShardCache, origin: Origin, name: str, expected: bytes | None = None, **kw):
    data = origin.objects[name] if expected is None else expected
    return cache.get(NS, name, size=len(data), xxh64=xxhash.xxh64(data).hexdigest(),
                     url=f"mem://bucket/{name}", fetch=origin.fetcher(name), **kw)


def test_download_once_then_hit_and_layout(tmp_path):
    origin = Origin({"a/shard-0.sss": blob(0)})
    cache = ShardCache(str(tmp_path / "c"), limit=10_000)
    path = get(cache, origin, "a/shard-0.sss")
    assert open(path, "rb").read() == blob(0)
    cache.unpin(NS, "a/shard-0.sss")
    assert get(cache, origin, "a/shard-0.sss") == path
    assert origin.fetches == ["a/shard-0.sss"]
    stats = cache.stats()
    assert (stats["hits"], stats["misses"], stats["bytes_fetched"], stats["pinned"]) == (1, 1, 1000, 1)
    meta = json.loads(open(cache.paths(NS, "a/shard-0.sss").meta).read())
    assert meta["size"] == 1000 and meta["url"] == "mem://bucket/a/shard-0.sss"
    assert os.path.exists(tmp_path / "c" / ".streamshard-cache")
    assert cache.usage() == 1000


def test_corrupted_download_retried_once_then_named(tmp_path):
    origin = Origin({"s": blob(1)})
    cache = ShardCache(str(tmp_path / "c"))
    good_hash = xxhash.xxh64(blob(1)).hexdigest()
    origin.objects["s"] = blob(2)  # the remote object no longer matches the index
    with pytest.raises(CorruptionError) as err:
        get(cache, origin, "s", expected=blob(1))
    msg = str(err.value)
    assert "mem://bucket/s" in msg and good_hash in msg and xxhash.xxh64(blob(2)).hexdigest() in msg
    assert origin.fetches == ["s", "s"]
    # nothing half-made is left: no data, no meta, no temp
    paths = cache.paths(NS, "s")
    assert not os.path.exists(paths.data) and not os.path.exists(paths.meta)
    assert os.listdir(os.path.dirname(paths.data)) == []

    # one bad download followed by a good one is fine
    calls = []

    def fetch(tmp):
        calls.append(tmp)
        with open(tmp, "wb") as f:
            f.write(blob(4) if len(calls) == 1 else blob(3))
    cache.get(NS, "t", size=1000, xxh64=xxhash.xxh64(blob(3)).hexdigest(), url="mem://t", fetch=fetch)
    assert cache.stats()["corrupt_downloads"] == 3 and len(calls) == 2


def test_lru_eviction_skips_pinned_and_foreign_files(tmp_path):
    root = tmp_path / "c"
    origin = Origin({f"s{i}": blob(i) for i in range(5)})
    # each access is stamped one (injected) second after the previous one
    cache = ShardCache(str(root), limit=3000, now=itertools.count(1_000_000).__next__)
    get(cache, origin, "s0")                      # stays pinned, the oldest entry
    for name in ("s1", "s2"):
        get(cache, origin, name, pin=False)
    get(cache, origin, "s1", pin=False)           # touch s1: s2 is now least recently used
    # foreign files: next to the cache, inside its data dir, and one faking a meta file
    foreign = [root / "notes.txt", root / "u0" / "fp0" / "data" / "user-file",
               root / "u0" / "fp0" / "meta" / "fake.json"]
    for f in foreign:
        f.write_bytes(b'{"magic": "something-else", "size": 1}')
    get(cache, origin, "s3", pin=False)           # needs room: evicts s2 (not s0, pinned)
    assert not os.path.exists(cache.paths(NS, "s2").data)
    assert os.path.exists(cache.paths(NS, "s0").data) and os.path.exists(cache.paths(NS, "s1").data)
    get(cache, origin, "s4", pin=False)           # evicts s1, still never s0
    assert os.path.exists(cache.paths(NS, "s0").data)
    assert not os.path.exists(cache.paths(NS, "s1").data)
    assert all(f.exists() for f in foreign)
    assert cache.stats()["evictions"] == 2 and cache.usage() <= 3000


def test_shard_pinned_by_another_process_is_not_evicted(tmp_path):
    origin = Origin({f"s{i}": blob(i) for i in range(3)})
    cache = ShardCache(str(tmp_path / "c"), limit=2000, space_timeout=0.3)
    get(cache, origin, "s0", pin=False)
    get(cache, origin, "s1", pin=False)
    pin = cache.paths(NS, "s0").pin
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        f"fd = os.open({pin!r}, os.O_RDWR)\nfcntl.flock(fd, fcntl.LOCK_SH)\n"
        "print('locked', flush=True)\ntime.sleep(30)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        get(cache, origin, "s2", pin=False)  # must evict s1, the one nobody uses
        assert os.path.exists(cache.paths(NS, "s0").data)
        assert not os.path.exists(cache.paths(NS, "s1").data)
    finally:
        holder.kill()  # SIGKILL: the kernel drops its pin, nothing to clean up
        holder.wait(timeout=10)
    origin.objects["s3"] = blob(3)
    get(cache, origin, "s3", pin=False)  # s0 (oldest) is evictable now that its user died
    assert not os.path.exists(cache.paths(NS, "s0").data)
    assert os.path.exists(cache.paths(NS, "s2").data)


def test_budget_too_small_for_pinned_set_is_a_config_error(tmp_path):
    origin = Origin({f"s{i}": blob(i) for i in range(2)})
    cache = ShardCache(str(tmp_path / "c"), limit=1500)
    get(cache, origin, "s0")  # pinned
    with pytest.raises(ConfigError, match=r"cache_limit 1500 bytes .*1000 bytes.*at least 2000"):
        get(cache, origin, "s1")
    # a prefetch in the same situation is skipped, not an error
    other = ShardCache(str(tmp_path / "c"), limit=1500)
    assert get(other, origin, "s1", prefetch=True, pin=False) is None
    assert other.stats()["prefetch_skipped"] == 1


def test_other_process_pins_everything_waits_bounded_then_config_error(tmp_path):
    origin = Origin({f"s{i}": blob(i) for i in range(2)})
    owner = ShardCache(str(tmp_path / "c"), limit=1500)
    get(owner, origin, "s0")                     # pinned by "another process" (another cache object)
    fake = FakeTime()
    waiter = ShardCache(str(tmp_path / "c"), limit=1500, space_timeout=0.3, poll=0.05,
                        clock=fake.clock, sleep=fake.sleep)
    with pytest.raises(ConfigError, match="in use by processes sharing"):
        get(waiter, origin, "s1")
    # it polled every 0.05 s until the 0.3 s budget was spent, then gave up (no real waiting)
    assert set(fake.sleeps) == {0.05} and 0.3 <= fake.now < 0.3 + 0.05 + 1e-9
    owner.unpin(NS, "s0")
    assert open(get(waiter, origin, "s1"), "rb").read() == blob(1)


def test_stale_temp_files_are_swept_only_when_their_lock_is_free(tmp_path):
    origin = Origin({"s0": blob(0), "s1": blob(1)})
    cache = ShardCache(str(tmp_path / "c"))
    get(cache, origin, "s0", pin=False)
    dead = cache.paths(NS, "s1").data + "#tmp-99999-dead"
    live_paths = cache.paths(NS, "s0")
    live = live_paths.data + "#tmp-12345-live"
    for f in (dead, live):
        open(f, "wb").write(b"partial")
    fd = os.open(live_paths.dl, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)  # a downloader of s0 is alive (a separate open file description)
    try:
        assert cache.sweep() == 1
        assert not os.path.exists(dead) and os.path.exists(live)
    finally:
        os.close(fd)
    assert cache.sweep() == 1 and not os.path.exists(live)


def test_concurrent_threads_download_once(tmp_path):
    origin = Origin({"s": blob(5, 200_000)})
    slow_fetch = origin.fetcher("s")

    def fetch(tmp):
        time.sleep(0.2)
        slow_fetch(tmp)
    cache = ShardCache(str(tmp_path / "c"))
    results = []

    def worker():
        results.append(cache.get(NS, "s", size=200_000, xxh64=xxhash.xxh64(blob(5, 200_000)).hexdigest(),
                                 url="mem://s", fetch=fetch))
    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(results) == 4 and len(set(results)) == 1 and origin.fetches == ["s"]
    stats = cache.stats()
    assert stats["misses"] == 1 and stats["waits"] == 3 and stats["pinned"] == 1


# ---- retry ------------------------------------------------------------------------------
class FakeResponseError(Exception):
    def __init__(self, status):
        super().__init__(f"status {status}")
        self.status = status


class FakeClientError(Exception):
    """Shaped like botocore's ClientError (``response`` dict)."""

    def __init__(self, code, status):
        super().__init__(code)
        self.response = {"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}


class ClientConnectorError(OSError):
    """Named like aiohttp's; classified by name."""


def wrapped(outer: BaseException, cause: BaseException) -> BaseException:
    outer.__cause__ = cause
    return outer


@pytest.mark.parametrize("exc, transient", [
    (FakeResponseError(503), True),                       # HTTP 5xx
    (FakeResponseError(429), True),                       # throttling
    (FakeResponseError(403), False),                      # denied
    (FakeResponseError(404), False),                      # missing
    (FakeClientError("SlowDown", 503), True),             # S3 throttling by code
    (FakeClientError("AccessDenied", 403), False),
    (FakeClientError("InvalidAccessKeyId", 403), False),  # bad credentials
    (FileNotFoundError("s3://b/k"), False),               # s3fs NoSuchKey
    (PermissionError("denied"), False),
    (ConnectionResetError(errno.ECONNRESET, "reset"), True),
    (ConnectionRefusedError(errno.ECONNREFUSED, "refused"), True),
    (TimeoutError("read timeout"), True),
    (OSError(errno.EBUSY, "SlowDown"), True),             # s3fs's translation of SlowDown/503
    (ClientConnectorError("cannot connect"), True),
    # fsspec HTTP info wraps a 503 into FileNotFoundError: the cause decides
    (wrapped(FileNotFoundError("http://x"), FakeResponseError(503)), True),
    (wrapped(FileNotFoundError("http://x"), FakeResponseError(403)), False),
    (ValueError("a bug"), False),                         # unknown: fail fast
])
def test_is_transient(exc, transient):
    assert is_transient(exc) is transient


@dataclass
class FakeTime:
    now: float = 0.0

    def clock(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.sleeps.append(s)
        self.now += s

    def __post_init__(self):
        self.sleeps: list[float] = []


def test_retry_transient_then_success_with_backoff():
    t = FakeTime()
    policy = RetryPolicy(attempts=5, base_delay=0.1, max_delay=1.0, jitter=1.0, sleep=t.sleep,
                         clock=t.clock, rng=random.Random(7))
    outcomes = [FakeResponseError(503), ConnectionResetError("reset"), "ok"]

    def call():
        item = outcomes.pop(0)
        if isinstance(item, BaseException):
            raise item
        return item
    seen = []
    assert call_with_retry(call, url="s3://b/k", what="read", policy=policy,
                           on_retry=lambda e, d: seen.append(d)) == "ok"
    assert len(t.sleeps) == 2 and seen == t.sleeps
    assert 0 <= t.sleeps[0] <= 0.1 and 0 <= t.sleeps[1] <= 0.2  # full jitter under the cap


def test_retry_bounded_by_attempts_and_deadline_and_permanent_at_once():
    t = FakeTime()
    policy = RetryPolicy(attempts=4, base_delay=1.0, max_delay=2.0, jitter=0.0, deadline=100,
                         sleep=t.sleep, clock=t.clock)
    calls = []

    def always_503():
        calls.append(1)
        raise FakeResponseError(503)
    with pytest.raises(StorageError) as err:
        call_with_retry(always_503, url="s3://b/k", what="read", policy=policy)
    assert err.value.transient and err.value.url == "s3://b/k" and "s3://b/k" in str(err.value)
    assert len(calls) == 4 and t.sleeps == [1.0, 2.0, 2.0]

    t2 = FakeTime()
    short = RetryPolicy(attempts=100, base_delay=1.0, max_delay=1.0, jitter=0.0, deadline=3.5,
                        sleep=t2.sleep, clock=t2.clock)
    with pytest.raises(StorageError, match="after 4 attempts"):
        call_with_retry(always_503, url="u", what="read", policy=short)
    assert t2.now <= 3.5

    calls.clear()

    def missing():
        calls.append(1)
        raise FileNotFoundError("s3://b/missing")
    with pytest.raises(StorageError) as err:
        call_with_retry(missing, url="s3://b/missing", what="read", policy=policy)
    assert not err.value.transient and len(calls) == 1 and "s3://b/missing" in str(err.value)


@pytest.mark.parametrize("kwargs, message", [
    ({"attempts": 0}, "attempts must be an int >= 1, got 0"),
    ({"base_delay": -1}, "base_delay must be a number >= 0, got -1"),
    ({"jitter": 1.5}, r"jitter must be in \[0, 1\], got 1.5"),
])
def test_retry_policy_validated(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        RetryPolicy(**kwargs)


# ---- prefetch ---------------------------------------------------------------------------
@dataclass(frozen=True)
class FakeShard:
    file: str
    bytes: int


class Fetches:
    """A Prefetcher ``fetch`` that records which shards started and finished (from its worker
    threads) and blocks each fetch until ``release`` is set; ``wait`` blocks (bounded, no sleep)
    until a condition on the records holds."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.fetched: list[str] = []
        self.release = threading.Event()
        self._changed = threading.Condition()

    def __call__(self, shard) -> bool:
        self._record(self.started, shard.file)
        self.release.wait(10)
        self._record(self.fetched, shard.file)
        return True

    def _record(self, records: list[str], file: str) -> None:
        with self._changed:
            records.append(file)
            self._changed.notify_all()

    def wait(self, predicate) -> None:
        with self._changed:
            assert self._changed.wait_for(predicate, timeout=10)


def test_prefetcher_order_and_byte_bound():
    fetch = Fetches()
    p = Prefetcher(fetch, max_bytes=250, workers=4, clock=lambda: 0.0)  # nothing ever expires
    p.submit([FakeShard(f"s{i}", 100) for i in range(6)])
    fetch.wait(lambda: len(fetch.started) == 2)
    # two are in flight and a third would exceed 250 bytes: it stays queued
    assert fetch.started == ["s0", "s1"] and p.outstanding_bytes() == 200
    fetch.release.set()
    fetch.wait(lambda: len(fetch.fetched) == 2)
    assert p.outstanding_bytes() == 200  # fetched but not yet asked for: still counts
    p.consumed("s0")
    p.consumed("s1")
    fetch.wait(lambda: len(fetch.started) >= 4)
    assert fetch.started[:4] == ["s0", "s1", "s2", "s3"]
    p.close()


def test_prefetcher_does_not_recheck_a_resident_shard_until_settled_ttl():
    # A warm cache: every fetch finds the shard resident (False). Overlapping hints must not
    # send a worker to check the same shard again until ``settled_ttl`` has passed.
    checks: list[str] = []
    done = threading.Condition()
    now = [0.0]

    def resident(shard) -> bool:
        with done:
            checks.append(shard.file)
            done.notify_all()
        return False

    def wait_for(n: int) -> None:
        with done:
            assert done.wait_for(lambda: len(checks) >= n, timeout=10)
        deadline = time.monotonic() + 10  # then until the worker has recorded the outcome
        while p.outstanding_bytes() and time.monotonic() < deadline:
            time.sleep(0.001)
        assert p.outstanding_bytes() == 0

    p = Prefetcher(resident, max_bytes=1000, workers=1, settled_ttl=10, clock=lambda: now[0])
    p.submit([FakeShard("a", 100), FakeShard("b", 100)])
    wait_for(2)
    p.submit([FakeShard("a", 100), FakeShard("b", 100), FakeShard("c", 100)])  # overlapping
    wait_for(3)
    assert checks == ["a", "b", "c"] and p.counts["prefetch_submitted"] == 3
    now[0] = 11.0  # past the ttl: a hint checks them again
    p.submit([FakeShard("a", 100)])
    wait_for(4)
    assert checks[3] == "a"
    p.close()


def test_prefetcher_merges_hints_newest_first_and_expires_stale_ahead():
    fetch = Fetches()
    # Every clock reading is 100 s after the previous one, so a shard fetched ahead is past its
    # 30 s ttl at the next check: with a wrong hint prefetch keeps going instead of stalling
    # (a prefetcher that never expired would stop after "a" and the wait below would time out).
    p = Prefetcher(fetch, max_bytes=100, workers=1, ahead_ttl=30,
                   clock=itertools.count(0, 100).__next__)
    p.submit([FakeShard("a", 100), FakeShard("b", 100), FakeShard("c", 100)])  # a long hint
    fetch.wait(lambda: fetch.started == ["a"])              # "a" is in flight
    p.submit([FakeShard("c", 100), FakeShard("d", 100)])   # a later, more urgent hint
    fetch.release.set()
    fetch.wait(lambda: len(fetch.fetched) == 4)
    assert fetch.fetched == ["a", "c", "d", "b"]
    assert p.counts["prefetch_expired"] >= 3 and p.counts["prefetch_submitted"] == 4
    p.close()
