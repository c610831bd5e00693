"""Parallel ranged download of one large object into a local temp file.

An object store caps each connection's bandwidth and adds a first-byte latency to every request,
so one GET per shard cannot keep up with a reader; a large shard is fetched as ``part_size``
ranged GETs, at most ``parts_in_flight`` at once (so at most ``part_size * parts_in_flight``
bytes are being received for it), each written at its offset into the temp file. Every part is
checked for its exact length (a short or long part is a transient error, retried under the one
:class:`~streamshard.remote.storage.RetryPolicy`); the whole-shard xxh64 of the index is checked
by the cache after assembly, before the temp file is renamed into place.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Callable

from streamshard.errors import ConfigError


class PartLengthError(ConnectionError):
    """A ranged GET returned a different number of bytes than asked for (a cut connection or a
    misbehaving server): transient, like a connection reset."""


@dataclass(frozen=True)
class PartPolicy:
    """How a shard is split into ranged GETs.

    - ``part_size``: bytes per ranged GET.
    - ``min_size``: shards smaller than this are one plain GET.
    - ``parts_in_flight``: ranged GETs of one shard at once (the shard's share of connections).
    """

    part_size: int = 8 << 20
    min_size: int = 16 << 20
    parts_in_flight: int = 8

    def __post_init__(self) -> None:
        for name in ("part_size", "min_size", "parts_in_flight"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"PartPolicy.{name} must be an int >= 1, got {value!r}")

    def ranges(self, size: int) -> list[tuple[int, int]]:
        """``[start, end)`` of each part; one part below ``min_size``."""
        if size < 0:
            raise ConfigError(f"object size must be >= 0, got {size}")
        if size < self.min_size or size <= self.part_size:
            return [(0, size)]
        return [(s, min(size, s + self.part_size)) for s in range(0, size, self.part_size)]


class ConnectionSlots:
    """At most ``limit`` GETs in flight at once (plain and ranged, prefetch and reads of one
    process); counts the most that were ever in flight together (``peak``), so tests and
    benchmarks see the bound hold and how much of it a cold epoch uses. Thread-safe."""

    def __init__(self, limit: int):
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            raise ConfigError(f"max_connections must be an int >= 1, got {limit!r}")
        self.limit = limit
        self._sem = threading.BoundedSemaphore(limit)
        self._lock = threading.Lock()
        self.active = 0
        self.peak = 0

    def acquire(self) -> None:
        self._sem.acquire()
        with self._lock:
            self.active += 1
            self.peak = max(self.peak, self.active)

    def release(self) -> None:
        with self._lock:
            self.active -= 1
        self._sem.release()

    def __enter__(self) -> "ConnectionSlots":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def pwrite_all(fd: int, data, offset: int) -> None:
    """Write all of ``data`` (a bytes-like object) at ``offset`` of ``fd``: pwrite may write
    less than asked."""
    view, pos = memoryview(data), 0
    while pos < len(view):
        pos += os.pwrite(fd, view[pos:], offset + pos)


def download_parts(read_range: Callable[[int, int], bytes], local_path: str, size: int,
                   policy: PartPolicy, *, retrying: Callable[[Callable[[], bytes]], bytes],
                   slots: ConnectionSlots | None = None) -> None:
    """Fetch ``[0, size)`` as ranged parts into the new file ``local_path`` (created with
    ``O_EXCL``; the caller removes it on error and renames it on success).

    ``read_range(start, end)`` returns those bytes; ``retrying(fn)`` runs ``fn`` under the retry
    policy; ``slots`` (optional) bounds connections across all downloads of the process. The
    first failing part cancels the parts not yet started and its error is raised.
    """
    ranges = policy.ranges(size)
    fd = os.open(local_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.ftruncate(fd, size)
        failed = threading.Event()

        def one(start: int, end: int) -> None:
            if failed.is_set():
                return

            def attempt() -> bytes:
                if slots is not None:
                    slots.acquire()
                try:
                    data = read_range(start, end)
                finally:
                    if slots is not None:
                        slots.release()
                if len(data) != end - start:
                    raise PartLengthError(f"bytes {start}-{end - 1}: got {len(data)} bytes, "
                                          f"expected {end - start}")
                return data

            pwrite_all(fd, retrying(attempt), start)

        if len(ranges) == 1:
            one(*ranges[0])
            return
        with ThreadPoolExecutor(max_workers=min(policy.parts_in_flight, len(ranges)),
                                thread_name_prefix="streamshard-part") as pool:
            futures = [pool.submit(one, s, e) for s, e in ranges]
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            errors = [f.exception() for f in done if f.exception() is not None]
            if errors:
                failed.set()
                for f in futures:
                    f.cancel()
                raise errors[0]
    finally:
        os.close(fd)
