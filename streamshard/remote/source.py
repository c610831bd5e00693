"""``CachedSource``: the :class:`ShardSource` of a dataset at any fsspec URL, through a shared
local :class:`ShardCache`.

The index is fetched once per node: the first process to start takes the index lock, compares
the remote index's version token (ETag / last-modified, one HEAD) with the cached copy's and
downloads it only when it changed. Shard copies live under ``<cache_dir>/<url hash>/<fingerprint>``,
so a rewritten remote dataset gets a fresh namespace and is never mixed with stale copies.
"""

from __future__ import annotations

import fcntl
import glob
import json
import logging
import os
import threading
import time
from typing import Any, Sequence

import xxhash

from streamshard.errors import ConfigError, CorruptionError, redact
from streamshard.atomic import TMP_MARK, atomic_write, atomic_write_json
from streamshard.remote.cache import ShardCache, _flock
from streamshard.remote.parts import ConnectionSlots, PartPolicy, download_parts
from streamshard.remote.prefetch import Prefetcher
from streamshard.remote.storage import Remote, RetryPolicy, call_with_retry, describe, version_token
from streamshard.sizes import parse_size

_logger = logging.getLogger(__name__)
INDEX_FILE = "index.json"  # mirrors streamshard.index.INDEX_FILE (imported lazily below)


def _remove_file(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def default_cache_dir() -> str:
    """``$XDG_CACHE_HOME/streamshard`` or ``~/.cache/streamshard``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "streamshard")


def url_key(url: str, storage_options: dict | None = None) -> str:
    """The cache directory name of a dataset URL (fingerprint-free: stable across rewrites).
    A custom endpoint is part of it: ``s3://b/ds`` on two S3-compatible servers are two datasets.
    User info is not (redacted first): no hash of a password lands in a directory name."""
    opts = storage_options or {}
    endpoint = opts.get("endpoint_url") or (opts.get("client_kwargs") or {}).get("endpoint_url")
    name = redact(url.rstrip("/")) + (f"|{redact(str(endpoint))}" if endpoint else "")
    return xxhash.xxh64(name.encode()).hexdigest()


class CachedSource:
    """Shards of the dataset at ``url`` served from a local cache shared by every process on the
    node (local ranks, DataLoader workers, other jobs using the same ``cache_dir``).

    - ``cache_limit``: byte budget (int or ``"10GB"``); ``None`` = unbounded. Fewer than
      ``min_resident_shards`` x the largest shard is a ``ConfigError`` at :meth:`read_index`.
    - ``retry``: :class:`RetryPolicy` for transient errors; permanent ones raise ``StorageError``
      naming the URL at once.
    - ``prefetch_bytes``: bound of :meth:`prefetch` (default a quarter of ``cache_limit``, or
      the larger of 8 largest shards and 256 MiB without a limit); ``prefetch_workers`` threads.
    - ``parts``: :class:`PartPolicy`: shards of ``parts.min_size`` bytes or more download as
      parallel ranged GETs of ``parts.part_size`` bytes, ``parts.parts_in_flight`` at once.
    - ``max_connections``: GETs in flight at once in this process (plain and ranged, prefetch
      and reads together).
    - ``space_timeout``: how long a reader waits for another process to unpin shards when the
      budget is full, before a ``ConfigError``.

    Thread-safe; picklable (the copy keeps the fingerprint, recreates threads, pins and the
    filesystem lazily, also after ``fork``); ``repr`` is stable.
    """

    def __init__(self, url: str, *, cache_dir: str | None = None,
                 cache_limit: int | str | None = None, storage_options: dict | None = None,
                 retry: RetryPolicy = RetryPolicy(), min_resident_shards: int = 1,
                 prefetch_bytes: int | str | None = None, prefetch_workers: int = 8,
                 space_timeout: float = 60.0, parts: PartPolicy = PartPolicy(),
                 max_connections: int = 16):
        if not isinstance(url, str) or "://" not in url:
            raise ConfigError(f"CachedSource needs a URL like 's3://bucket/ds', got "
                              f"{redact(str(url))!r}")
        if not isinstance(min_resident_shards, int) or min_resident_shards < 1:
            raise ConfigError(f"min_resident_shards must be an int >= 1, got {min_resident_shards!r}")
        if not isinstance(retry, RetryPolicy):
            raise ConfigError(f"retry must be a RetryPolicy, got {type(retry).__name__}")
        if not isinstance(parts, PartPolicy):
            raise ConfigError(f"parts must be a PartPolicy, got {type(parts).__name__}")
        if not isinstance(max_connections, int) or max_connections < 1:
            raise ConfigError(f"max_connections must be an int >= 1, got {max_connections!r}")
        self.url = url.rstrip("/")
        self.cache_dir = os.path.abspath(cache_dir or default_cache_dir())
        self.cache_limit = None if cache_limit is None else parse_size(cache_limit, name="cache_limit")
        self.prefetch_bytes = (None if prefetch_bytes is None
                               else parse_size(prefetch_bytes, name="prefetch_bytes"))
        self.storage_options = dict(storage_options or {})
        self.retry = retry
        self.min_resident_shards = min_resident_shards
        self.prefetch_workers = prefetch_workers
        self.space_timeout = space_timeout
        self.parts = parts
        self.max_connections = max_connections
        self.fingerprint: str | None = None
        self._largest = 0
        self._remote = Remote(self.url, self.storage_options, self.max_connections)
        self._init_runtime()

    def _init_runtime(self) -> None:
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._cache: ShardCache | None = None
        self._prefetcher: Prefetcher | None = None
        self._slots = ConnectionSlots(self.max_connections)
        self._counts = {"retries": 0, "index_fetches": 0, "index_hits": 0}
        self._read_wait = 0.0  # seconds shard_path spent before returning (downloads, waits)

    # ---- pickling and fork ----------------------------------------------------------------
    _CONFIG = ("url", "cache_dir", "cache_limit", "prefetch_bytes", "storage_options", "retry",
               "min_resident_shards", "prefetch_workers", "space_timeout", "parts", "max_connections",
               "fingerprint", "_largest")

    def __getstate__(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self._CONFIG}

    def __setstate__(self, state: dict[str, Any]) -> None:
        for k in self._CONFIG:
            setattr(self, k, state[k])
        self._remote = Remote(self.url, self.storage_options, self.max_connections)
        self._init_runtime()

    def __repr__(self) -> str:
        return f"CachedSource({redact(self.url)!r}, cache_dir={self.cache_dir!r}, cache_limit={self.cache_limit!r})"

    def _check_fork(self) -> None:
        if self._pid != os.getpid():  # forked DataLoader worker: parent's threads/pins are not ours
            if self._cache is not None:
                self._cache.forget_after_fork()
            self._init_runtime()

    @property
    def cache(self) -> ShardCache:
        self._check_fork()
        with self._lock:
            if self._cache is None:
                self._cache = ShardCache(self.cache_dir, limit=self.cache_limit,
                                         space_timeout=self.space_timeout)
            return self._cache

    def _retrying(self, fn, rel: str, what: str):
        url = self._remote.url_of(rel)

        def on_retry(exc: BaseException, delay: float) -> None:
            with self._lock:
                self._counts["retries"] += 1
            _logger.warning("%s %s failed (%s); retrying in %.2f s", what, url, describe(exc), delay)
        return call_with_retry(fn, url=url, what=what, policy=self.retry, on_retry=on_retry)

    # ---- ShardSource ----------------------------------------------------------------------
    def read_index(self) -> bytes:
        """The remote index bytes, from the node's cache when the remote copy is unchanged."""
        return self._fetch_index()[0]

    def load_index(self) -> Any:
        """The parsed :class:`~streamshard.index.DatasetIndex` (what ``Dataset`` opens with):
        parsed once here, where it is checked, instead of once more by the caller."""
        return self._fetch_index()[1]

    def _fetch_index(self) -> tuple[bytes, Any]:
        from streamshard.index import DatasetIndex

        base = os.path.join(self.cache_dir, url_key(self.url, self.storage_options))
        os.makedirs(base, exist_ok=True)
        cached, meta_path = os.path.join(base, INDEX_FILE), os.path.join(base, "index.meta.json")
        with _flock(os.path.join(base, "index.lock"), fcntl.LOCK_EX):
            for name in (INDEX_FILE, "index.meta.json"):  # atomic_write's temp names
                for stale in glob.glob(os.path.join(glob.escape(base), f"{name}{TMP_MARK}*")):
                    _remove_file(stale)  # left by a writer killed mid-write; writers hold this lock
            info = self._retrying(lambda: self._remote.info(INDEX_FILE), INDEX_FILE, "stat")
            token = version_token(info)
            data = self._cached_index(cached, meta_path, token)
            if data is None:
                data = self._retrying(lambda: self._remote.cat(INDEX_FILE), INDEX_FILE, "read")
                atomic_write(cached, data, fsync=False)
                atomic_write_json(meta_path, {"url": redact(self.url), "token": token,
                                              "xxh64": xxhash.xxh64(data).hexdigest()},
                                  mode=0o600)
                self._count("index_fetches")
            else:
                self._count("index_hits")
        index = DatasetIndex.from_bytes(data, self._remote.url_of(INDEX_FILE))
        self._largest = int(index.shards.bytes.max(initial=0))
        if self.fingerprint is not None and self.fingerprint != index.fingerprint:
            raise CorruptionError(
                f"remote dataset {redact(self.url)} changed while in use: fingerprint {self.fingerprint} "
                f"became {index.fingerprint}; reopen the dataset to read the new version")
        self.fingerprint = index.fingerprint
        self.check_budget()
        return data, index

    @staticmethod
    def _cached_index(cached: str, meta_path: str, token: str | None) -> bytes | None:
        if token is None:  # the store gives no version information: always re-read
            return None
        try:
            with open(meta_path, "rb") as f:
                meta = json.loads(f.read())
            with open(cached, "rb") as f:
                data = f.read()
        except (FileNotFoundError, ValueError):
            return None
        if meta.get("token") != token or meta.get("xxh64") != xxhash.xxh64(data).hexdigest():
            return None
        return data

    def check_budget(self, min_resident_shards: int | None = None) -> None:
        """``ConfigError`` when ``cache_limit`` cannot hold ``min_resident_shards`` largest
        shards at once (the loader passes its sampler's working set)."""
        k = self.min_resident_shards if min_resident_shards is None else min_resident_shards
        need = k * self._largest
        if self.cache_limit is not None and self.cache_limit < need:
            raise ConfigError(
                f"cache_limit {self.cache_limit} bytes is too small for {redact(self.url)}: {k} shard(s) "
                f"must be resident at once and the largest shard is {self._largest} bytes, so "
                f"cache_limit must be at least {need} bytes")

    def _namespace(self) -> str:
        if self.fingerprint is None:
            self.read_index()
        return f"{url_key(self.url, self.storage_options)}/{self.fingerprint}"

    def _fetch(self, shard: Any, *, pin: bool, prefetch: bool) -> str | None:
        def whole(tmp: str) -> None:
            with self._slots:
                self._remote.get(shard.file, tmp)

        def download(tmp: str) -> None:
            if len(self.parts.ranges(shard.bytes)) == 1:
                self._retrying(lambda: whole(tmp), shard.file, "download")
                return
            download_parts(lambda start, end: self._remote.cat_range(shard.file, start, end),
                           tmp, shard.bytes, self.parts, slots=self._slots,
                           retrying=lambda fn: self._retrying(fn, shard.file, "ranged download"))

        return self.cache.get(self._namespace(), shard.file, size=shard.bytes, xxh64=shard.xxh64,
                              url=self._remote.url_of(shard.file), fetch=download, pin=pin,
                              prefetch=prefetch)

    def shard_path(self, shard: Any) -> str:
        """Local path of the complete, verified copy of ``shard``; pinned until :meth:`unpin`."""
        prefetcher = self._prefetcher
        if prefetcher is not None:
            prefetcher.consumed(shard.file)
        t0 = time.perf_counter()  # measured for stats() only: nothing decides on it
        path = self._fetch(shard, pin=True, prefetch=False)
        waited = time.perf_counter() - t0
        with self._lock:
            self._read_wait += waited
        assert path is not None  # only prefetch may skip
        return path

    def unpin(self, shard: Any) -> None:
        self.cache.unpin(self._namespace(), shard.file)

    def prefetch(self, shards: Sequence[Any]) -> None:
        """Hint: download ``shards`` in this order in the background, before what earlier hints
        left queued. Never blocks on I/O and never evicts pinned shards (a shard that does not
        fit is skipped)."""
        ns = self._namespace()
        cache = self.cache  # also resets state after fork
        # shards this process has open are resident and pinned: nothing to fetch (a loader
        # hints every chunk, mostly with shards it is already reading)
        shards = [s for s in shards if not cache.is_pinned(ns, s.file)]
        with self._lock:
            if self._prefetcher is None:
                bound = self.prefetch_bytes or (
                    max(self._largest, self.cache_limit // 4) if self.cache_limit
                    else max(8 * self._largest, 256 << 20))
                self._prefetcher = Prefetcher(
                    lambda s: self._fetch(s, pin=False, prefetch=True) is not None,
                    max_bytes=bound, workers=self.prefetch_workers)
            prefetcher = self._prefetcher
        prefetcher.submit(shards)

    def stats(self) -> dict[str, float]:
        """This process's counters: hits, misses, waits, prefetched, prefetch_skipped,
        bytes_fetched, evictions, bytes_evicted, corrupt_downloads, temp_cleaned,
        download_seconds, pinned, retries, index_fetches, index_hits, prefetch_* (including
        prefetch_peak_bytes and prefetch_peak_shards), read_wait_seconds (time the reader spent
        in :meth:`shard_path`: its own downloads and waits for prefetches) and peak_connections
        (most GETs in flight at once, <= ``max_connections``)."""
        out = self.cache.stats()
        with self._lock:
            out.update(self._counts)
            out["read_wait_seconds"] = round(self._read_wait, 6)
            out["peak_connections"] = self._slots.peak
            if self._prefetcher is not None:
                out.update(dict(self._prefetcher.counts))
        return out

    def _count(self, name: str) -> None:
        with self._lock:
            self._counts[name] += 1

    def close(self) -> None:
        """Stop prefetching and release this process's pins."""
        self._check_fork()
        with self._lock:
            prefetcher, self._prefetcher = self._prefetcher, None
            cache = self._cache
        if prefetcher is not None:
            prefetcher.close()
        if cache is not None:
            cache.close()
