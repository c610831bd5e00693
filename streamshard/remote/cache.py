"""A byte-budgeted local shard cache shared by every process on a node.

Layout under ``root`` (one namespace ``ns`` = ``<url hash>/<fingerprint>`` per dataset version)::

    .streamshard-cache            marker: this directory is a streamshard cache
    .budget.lock                  flock held while accounting space and evicting
    <ns>/data/<q>                 a complete, verified shard copy (q = file name, %-quoted flat)
    <ns>/data/<q>#tmp-<pid>-<hex> a download in flight (or left by a killed process)
    <ns>/meta/<q>.json            the entry's marker + reservation: size, xxh64, url; mtime = LRU
    <ns>/locks/<q>.dl             exclusive flock while downloading
    <ns>/locks/<q>.pin            shared flock by every process using the shard

Invariants: a data file exists only while its meta file exists (meta is written before the
rename into place and removed after the data), and only files with a meta file are ever deleted,
so nothing the cache did not create can be evicted. Locks are ``fcntl.flock``: the kernel drops
them when a process dies, so SIGKILL leaves nothing stuck. Lock files are never deleted (deleting
a lock file races with a process opening it); they are empty.
"""

from __future__ import annotations

import fcntl
import glob
import json
import logging
import os
import re
import secrets
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator
from urllib.parse import quote

import xxhash

from streamshard.atomic import atomic_write_json
from streamshard.errors import ConfigError, CorruptionError

_logger = logging.getLogger(__name__)
MARKER = ".streamshard-cache"
_META_MAGIC = "streamshard-cache-entry"
_META_VERSION = 1
_TMP = "#tmp-"
# What the cache's own temp names look like: "<entry>#tmp-<pid>-<8 hex>". Cleaners match the
# whole name so a foreign file that merely contains "#tmp-" is never deleted.
_TMP_NAME = re.compile(r".+#tmp-\d+-[0-9A-Za-z]{1,16}")
_CHUNK = 4 << 20  # hashing reads 4 MiB at a time: ~1 ms each at xxh64 speed


def file_xxh64(path: str) -> str:
    """xxh64 (seed 0) hex digest of a local file."""
    h = xxhash.xxh64()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def normalize_hash(value: str) -> str:
    text = str(value).strip().lower()
    return text.split(":", 1)[1] if text.startswith("xxh64:") else text


@dataclass(frozen=True)
class _Paths:
    data: str
    meta: str
    dl: str
    pin: str


@contextmanager
def _flock(path: str, mode: int) -> Iterator[bool]:
    """Open ``path`` and flock it; yields whether the lock was obtained (always, unless LOCK_NB)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, mode)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)  # closing the only descriptor releases the lock


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


class ShardCache:
    """Local copies of remote shards under ``root``, at most ``limit`` bytes (``None``: no limit).

    :meth:`get` returns the path of a complete, checksum-verified copy, downloading it through the
    caller's ``fetch(tmp_path)`` if needed, and pins it: no process evicts a pinned entry. One
    process downloads a missing entry while the others wait on its lock. Thread-safe; counts its
    own hits, misses, bytes and evictions (per process). Not picklable: :class:`CachedSource`
    rebuilds it in each process.
    """

    def __init__(self, root: str, *, limit: int | None = None, space_timeout: float = 60.0,
                 poll: float = 0.05, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep,
                 now: Callable[[], float] = time.time):
        if limit is not None and (not isinstance(limit, int) or limit <= 0):
            raise ConfigError(f"cache limit must be a positive int or None, got {limit!r}")
        if space_timeout < 0:
            raise ConfigError(f"space_timeout must be >= 0, got {space_timeout!r}")
        self.root = os.path.abspath(root)
        self.limit = limit
        self.space_timeout = space_timeout
        self.poll = poll
        # Injected so tests need no sleeps: ``clock``/``sleep`` time the wait for space,
        # ``now`` stamps an entry's last access (its meta file's mtime, shared by processes).
        self._clock, self._sleep, self._now = clock, sleep, now
        os.makedirs(self.root, exist_ok=True)
        marker = os.path.join(self.root, MARKER)
        if not os.path.exists(marker):
            atomic_write_json(marker, {"format": "streamshard-cache", "version": 1}, fsync=False)
        self._lock = threading.Lock()
        self._pins: dict[tuple[str, str], list[int]] = {}  # key -> [fd, count, size]
        self._counts = dict.fromkeys(
            ("hits", "misses", "waits", "prefetched", "prefetch_skipped", "bytes_fetched",
             "evictions", "bytes_evicted", "corrupt_downloads", "temp_cleaned", "bad_meta"), 0)
        self._reported: set[str] = set()  # malformed meta files already logged by this process
        self._seconds = 0.0

    # ---- paths and pins -------------------------------------------------------------------
    def paths(self, ns: str, file: str) -> _Paths:
        parts = ns.split("/")
        if len(parts) != 2 or any(p in ("", ".", "..") or "\\" in p for p in parts):
            raise ConfigError(f"cache namespace must be '<a>/<b>' without '..', got {ns!r}")
        q = quote(file, safe="")
        base = os.path.join(self.root, *parts)
        return _Paths(data=os.path.join(base, "data", q), meta=os.path.join(base, "meta", q + ".json"),
                      dl=os.path.join(base, "locks", q + ".dl"),
                      pin=os.path.join(base, "locks", q + ".pin"))

    def _pin(self, key: tuple[str, str], paths: _Paths, size: int) -> None:
        with self._lock:
            entry = self._pins.get(key)
            if entry is not None:
                entry[1] += 1
                return
        os.makedirs(os.path.dirname(paths.pin), exist_ok=True)
        fd = os.open(paths.pin, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_SH)  # waits only while an evictor deletes this entry
        with self._lock:
            entry = self._pins.get(key)
            if entry is None:
                self._pins[key] = [fd, 1, size]
                return
            entry[1] += 1
        os.close(fd)  # another thread pinned it meanwhile; its lock covers us

    def unpin(self, ns: str, file: str) -> None:
        """Release one pin taken by :meth:`get` (the shard becomes evictable at the last one)."""
        with self._lock:
            entry = self._pins.get((ns, file))
            if entry is None:
                return
            entry[1] -= 1
            if entry[1] > 0:
                return
            del self._pins[(ns, file)]
        os.close(entry[0])

    def is_pinned(self, ns: str, file: str) -> bool:
        """Whether this process holds a pin on the entry (it is then resident and protected)."""
        with self._lock:
            return (ns, file) in self._pins

    def pinned_bytes(self) -> int:
        """Bytes of the entries this process has pinned."""
        with self._lock:
            return sum(e[2] for e in self._pins.values())

    def close(self) -> None:
        """Release every pin of this process."""
        with self._lock:
            fds = [e[0] for e in self._pins.values()]
            self._pins.clear()
        for fd in fds:
            os.close(fd)

    def forget_after_fork(self) -> None:
        """In a forked child: drop the parent's pins without unlocking them (the descriptors share
        the parent's lock; closing our copies leaves the parent's lock in place). Takes no lock:
        a parent thread may have held it at fork time."""
        fds = [e[0] for e in self._pins.values()]
        self._pins = {}
        self._lock = threading.Lock()
        for fd in fds:
            os.close(fd)

    # ---- the main operation ---------------------------------------------------------------
    def get(self, ns: str, file: str, *, size: int, xxh64: str, url: str,
            fetch: Callable[[str], None], pin: bool = True, prefetch: bool = False) -> str | None:
        """Path of the verified local copy of ``file``; downloads it with ``fetch`` if missing.

        ``pin=True`` keeps it pinned until :meth:`unpin`. ``prefetch=True`` never waits for space
        and returns the path only when this call downloaded the shard: ``None`` when it was
        already resident or does not fit without evicting pinned shards. Raises
        :class:`CorruptionError` when two downloads in a row do not match ``size``/``xxh64``,
        ``ConfigError`` when the budget cannot hold the shard next to the pinned ones.
        """
        key, paths, expected = (ns, file), self.paths(ns, file), normalize_hash(xxh64)
        self._pin(key, paths, size)
        try:
            if self._complete(paths, size, expected):
                self._touch(paths.meta)
                if prefetch:  # a prefetch of a resident shard is neither hit nor miss
                    return self._done(key, None, pin)
                self._count("hits")
                return self._done(key, paths.data, pin)
            with _flock(self._ensure(paths.dl), fcntl.LOCK_EX):
                if self._complete(paths, size, expected):  # another process fetched it meanwhile
                    self._touch(paths.meta)
                    if prefetch:
                        return self._done(key, None, pin)
                    self._count("hits", "waits")
                    return self._done(key, paths.data, pin)
                # A temp file exists only beside its entry's meta file (the reservation is written
                # before the temp and removed after it), so a shard never reserved skips the
                # directory listing: it cost O(entries) per download, O(shards^2) per cold epoch.
                if os.path.lexists(paths.meta):
                    self._clean_temps(paths.data)
                _remove(paths.data)  # a copy that failed the check above is never served
                if not self._reserve(paths, key, size, expected, url, wait=not prefetch):
                    self._count("prefetch_skipped")
                    self.unpin(ns, file)
                    return None
                try:
                    self._download(paths, size, expected, url, fetch)
                except BaseException:
                    _remove(paths.meta)  # free the reservation; data was never renamed in
                    raise
                self._count("prefetched" if prefetch else "misses")
                return self._done(key, paths.data, pin)
        except BaseException:
            self.unpin(ns, file)
            raise

    def _done(self, key: tuple[str, str], data: str | None, pin: bool) -> str | None:
        if not pin:
            self.unpin(*key)
        return data

    def _complete(self, paths: _Paths, size: int, expected: str) -> bool:
        meta = self._read_meta(paths.meta)
        if meta is None or meta.get("size") != size or meta.get("xxh64") != expected:
            return False
        try:
            return os.path.getsize(paths.data) == size
        except FileNotFoundError:
            return False

    def _download(self, paths: _Paths, size: int, expected: str, url: str,
                  fetch: Callable[[str], None]) -> None:
        actual = actual_size = None
        for _ in range(2):  # a corrupted copy is downloaded once more, then reported
            tmp = f"{paths.data}{_TMP}{os.getpid()}-{secrets.token_hex(4)}"
            t0 = time.perf_counter()
            try:
                fetch(tmp)
                actual_size = os.path.getsize(tmp)
                actual = file_xxh64(tmp)
            except BaseException:
                _remove(tmp)
                raise
            with self._lock:
                self._counts["bytes_fetched"] += actual_size
                self._seconds += time.perf_counter() - t0
            if actual_size == size and actual == expected:
                os.replace(tmp, paths.data)
                return
            _remove(tmp)
            self._count("corrupt_downloads")
            _logger.warning("download of %s gave %s bytes with xxh64 %s, expected %s bytes with "
                            "xxh64 %s; downloading it again", url, actual_size, actual, size, expected)
        raise CorruptionError(
            f"remote object {url} is corrupted: the index expects {size} bytes with xxh64 "
            f"{expected}, two downloads gave {actual_size} bytes with xxh64 {actual}")

    # ---- space accounting and eviction ----------------------------------------------------
    def _reserve(self, paths: _Paths, key: tuple[str, str], size: int, expected: str, url: str,
                 *, wait: bool) -> bool:
        """Make room for ``size`` bytes and write the entry's meta file (the reservation)."""
        deadline = self._clock() + self.space_timeout
        meta = {"magic": _META_MAGIC, "version": _META_VERSION, "ns": key[0], "file": key[1],
                "url": url, "size": size, "xxh64": expected, "created": self._now()}
        while True:
            with _flock(os.path.join(self.root, ".budget.lock"), fcntl.LOCK_EX):
                if self.limit is None or self._make_room(size, exclude=paths.meta):
                    os.makedirs(os.path.dirname(paths.meta), exist_ok=True)
                    os.makedirs(os.path.dirname(paths.data), exist_ok=True)
                    atomic_write_json(paths.meta, meta, fsync=False, mode=0o600)
                    self._touch(paths.meta)
                    return True
            pinned_here = self.pinned_bytes()  # includes this entry
            if pinned_here > self.limit:
                raise ConfigError(
                    f"cache_limit {self.limit} bytes cannot hold {url} ({size} bytes) next to the "
                    f"{pinned_here - size} bytes this process already has in use; raise "
                    f"cache_limit to at least {pinned_here}")
            if not wait:
                return False
            if self._clock() >= deadline:
                raise ConfigError(
                    f"cache_limit {self.limit} bytes: no room for {url} ({size} bytes) after "
                    f"{self.space_timeout:.0f}s, every cached shard is in use by processes sharing "
                    f"{self.root}; raise cache_limit or give each job its own cache_dir")
            self._sleep(self.poll)

    def entries(self) -> list[tuple[float, str, dict]]:
        """(last access, meta path, meta) of every entry this cache created, oldest first."""
        found = []
        for meta_path in glob.glob(os.path.join(glob.escape(self.root), "*", "*", "meta", "*.json")):
            meta = self._read_meta(meta_path)
            if meta is None:
                continue
            problem = self._meta_problem(meta_path, meta)
            if problem is not None:
                self._report_bad(meta_path, problem)
                continue
            try:
                found.append((os.stat(meta_path).st_mtime, meta_path, meta))
            except FileNotFoundError:
                continue
        found.sort(key=lambda t: t[0])
        return found

    def usage(self) -> int:
        """Bytes reserved by all entries (complete or in flight) of every process."""
        return sum(int(meta["size"]) for _, _, meta in self.entries())

    def _make_room(self, size: int, *, exclude: str) -> bool:
        entries = [e for e in self.entries() if e[1] != exclude]
        used = sum(int(m["size"]) for _, _, m in entries)
        for _, meta_path, meta in entries:
            if used + size <= self.limit:
                break
            if self._evict(meta_path, meta):
                used -= int(meta["size"])
        return used + size <= self.limit

    def _evict(self, meta_path: str, meta: dict) -> bool:
        """Delete one unpinned, idle entry; False when some process is using or fetching it.
        ``meta`` passed ``_meta_problem`` (it describes its own location)."""
        paths = self.paths(meta["ns"], meta["file"])
        with _flock(self._ensure(paths.pin), fcntl.LOCK_EX | fcntl.LOCK_NB) as pinned_free:
            if not pinned_free:
                return False
            with _flock(self._ensure(paths.dl), fcntl.LOCK_EX | fcntl.LOCK_NB) as idle:
                if not idle:
                    return False
                complete = os.path.exists(paths.data)
                _remove(paths.data)
                self._clean_temps(paths.data)
                _remove(paths.meta)
        if complete:
            with self._lock:
                self._counts["evictions"] += 1
                self._counts["bytes_evicted"] += int(meta["size"])
        return True

    def sweep(self) -> int:
        """Delete temp files left by dead downloaders (their lock is free); returns how many."""
        removed = 0
        pattern = os.path.join(glob.escape(self.root), "*", "*", "data", f"*{_TMP}*")
        for tmp in glob.glob(pattern):
            if not _TMP_NAME.fullmatch(os.path.basename(tmp)):
                continue  # not a name this cache gives its temp files
            base = tmp.rsplit(_TMP, 1)[0]
            dl = os.path.join(os.path.dirname(os.path.dirname(base)), "locks",
                              os.path.basename(base) + ".dl")
            with _flock(self._ensure(dl), fcntl.LOCK_EX | fcntl.LOCK_NB) as idle:
                if idle and os.path.exists(tmp):
                    _remove(tmp)
                    removed += 1
        self._count_n("temp_cleaned", removed)
        return removed

    def _clean_temps(self, data: str) -> None:
        """Caller holds the entry's download lock, so every temp file of it is stale."""
        stale = [p for p in glob.glob(glob.escape(data) + _TMP + "*")
                 if _TMP_NAME.fullmatch(os.path.basename(p))]
        for tmp in stale:
            _remove(tmp)
        self._count_n("temp_cleaned", len(stale))

    # ---- small helpers --------------------------------------------------------------------
    @staticmethod
    def _ensure(path: str) -> str:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return path

    def _read_meta(self, path: str) -> dict | None:
        """The meta file's content, or None when it vanished (evicted meanwhile) or is not
        ours (reported once per process, never deleted)."""
        try:
            with open(path, "rb") as f:
                meta = json.loads(f.read(1 << 16))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, RecursionError) as exc:
            self._report_bad(path, f"unreadable ({type(exc).__name__}: {exc})")
            return None
        if not isinstance(meta, dict) or meta.get("magic") != _META_MAGIC:
            self._report_bad(path, "not a streamshard cache entry")
            return None
        return meta

    def _meta_problem(self, path: str, meta: dict) -> str | None:
        """Why a meta file cannot be trusted for accounting or eviction, or None."""
        if meta.get("version") != _META_VERSION:
            return f"version {meta.get('version')!r}"
        size = meta.get("size")
        if type(size) is not int or not 0 <= size < 2**63:
            return f"size {size!r} is not a byte count"
        ns, file = meta.get("ns"), meta.get("file")
        if not isinstance(ns, str) or not isinstance(file, str):
            return "ns/file missing"
        try:
            if self.paths(ns, file).meta != path:
                return "it does not describe its own location"
        except ConfigError as exc:
            return str(exc)
        return None

    def _report_bad(self, path: str, problem: str) -> None:
        with self._lock:
            self._counts["bad_meta"] += 1
            if path in self._reported:
                return
            self._reported.add(path)
        _logger.warning("streamshard cache: skipping %s: %s (not written by this cache; left in "
                    "place and never counted or evicted)", path, problem)

    def _touch(self, path: str) -> None:
        """Stamp ``path``'s mtime with ``now()``: the entry's last access, what eviction orders by."""
        t = self._now()
        try:
            os.utime(path, (t, t))
        except OSError:  # gone (evicted by the time we touch) or a read-only cache: LRU only
            pass

    def _count(self, *names: str) -> None:
        with self._lock:
            for name in names:
                self._counts[name] += 1

    def _count_n(self, name: str, n: int) -> None:
        if n:
            with self._lock:
                self._counts[name] += n

    def stats(self) -> dict[str, float]:
        """Counters of this process: hits, misses, waits (hits after waiting for another
        process's download), prefetched, prefetch_skipped, bytes_fetched, evictions,
        bytes_evicted, corrupt_downloads, temp_cleaned, download_seconds, pinned."""
        with self._lock:
            out: dict[str, float] = dict(self._counts)
            out["download_seconds"] = round(self._seconds, 6)
            out["pinned"] = len(self._pins)
        return out
