"""Background downloads of the shards the sampler will ask for next, bounded in bytes.

The sampler knows the future order, so the loader hands :meth:`Prefetcher.submit` the next shards
in order; a few threads fetch them in that order. The bound counts shards in flight plus shards
fetched but not yet asked for ("ahead"), so prefetch never runs so far ahead that it evicts what
it fetched before it is used. A hint is merged, not replacing: its shards go to the front of the
queue (they are needed soonest) and an earlier, longer hint keeps its tail, so a loader's
per-chunk hints and a whole-epoch hint coexist. A shard that stays "ahead" for ``ahead_ttl``
seconds without being asked for (a wrong hint) stops counting, so a bad hint cannot stall prefetch.
A shard a worker found resident (or could not fit) is not queued again for ``settled_ttl``
seconds: a loader hints each shard in many overlapping chunks, and on a warm cache every repeat
cost a meta-file read and a touch in a worker thread (~0.07-0.1 s of CPU per 55-shard epoch).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Any, Callable, Sequence

from streamshard.errors import ConfigError

_logger = logging.getLogger(__name__)


class Prefetcher:
    """A bounded, ordered prefetch queue served by ``workers`` daemon threads.

    ``fetch(shard) -> bool`` downloads one shard into the cache without pinning it and says
    whether it downloaded it (``False``: already resident, or skipped for lack of unpinned room);
    only downloaded shards count as "ahead".
    Errors in ``fetch`` are counted and dropped: the reader's own request retries and reports.
    Thread-safe. Not picklable (its owner recreates it lazily in each process).
    """

    def __init__(self, fetch: Callable[[Any], bool], *, max_bytes: int, workers: int = 2,
                 max_queue: int = 100_000, ahead_ttl: float = 30.0, settled_ttl: float = 10.0,
                 clock: Callable[[], float] = time.monotonic):
        if max_bytes <= 0:
            raise ConfigError(f"prefetch max_bytes must be positive, got {max_bytes}")
        if workers < 1:
            raise ConfigError(f"prefetch workers must be >= 1, got {workers}")
        self._fetch = fetch
        self.max_bytes = max_bytes
        self.workers = workers
        self.max_queue = max_queue
        self.ahead_ttl = ahead_ttl
        self.settled_ttl = settled_ttl
        self._clock = clock  # injected: tests expire "ahead" shards without waiting
        self._cond = threading.Condition()
        self._queue: deque[Any] = deque()
        self._inflight: dict[str, int] = {}
        self._ahead: dict[str, tuple[int, float]] = {}  # file -> (bytes, when fetched)
        self._early: set[str] = set()  # asked for by the reader while still in flight
        self._settled: dict[str, float] = {}  # file -> when a worker found it resident/skipped
        self._threads: list[threading.Thread] = []
        self._closed = False
        self.counts = {"prefetch_submitted": 0, "prefetch_errors": 0, "prefetch_dropped": 0,
                       "prefetch_expired": 0, "prefetch_peak_bytes": 0, "prefetch_peak_shards": 0}

    def submit(self, shards: Sequence[Any]) -> None:
        """Queue ``shards`` (in the order they will be read) ahead of what earlier hints left.
        Never blocks on I/O. Shards in flight or already fetched ahead are not queued again."""
        with self._cond:
            if self._closed:
                return
            new: dict[str, Any] = {}
            cutoff = self._clock() - self.settled_ttl
            if self._settled and min(self._settled.values()) < cutoff:
                self._settled = {f: t for f, t in self._settled.items() if t >= cutoff}
            for shard in shards:
                if (shard.file not in self._inflight and shard.file not in self._ahead
                        and shard.file not in self._settled):
                    new.setdefault(shard.file, shard)
            queued = {s.file for s in self._queue}
            self.counts["prefetch_submitted"] += sum(1 for f in new if f not in queued)
            merged = list(new.values()) + [s for s in self._queue if s.file not in new]
            if len(merged) > self.max_queue:
                self.counts["prefetch_dropped"] += len(merged) - self.max_queue
                del merged[self.max_queue:]
            self._queue = deque(merged)
            while len(self._threads) < self.workers:
                t = threading.Thread(target=self._run, name=f"streamshard-prefetch-{len(self._threads)}",
                                     daemon=True)
                self._threads.append(t)
                t.start()
            self._cond.notify_all()

    def consumed(self, file: str) -> None:
        """The reader asked for ``file``: it no longer counts as prefetched-ahead."""
        with self._cond:
            if file in self._inflight:
                self._early.add(file)
            elif self._ahead.pop(file, None) is not None:
                self._cond.notify_all()

    def outstanding_bytes(self) -> int:
        with self._cond:
            return self._used()

    def _used(self) -> int:
        """Bytes in flight + fetched ahead (caller holds the condition); expires stale ahead
        and wakes the workers when that frees room."""
        cutoff = self._clock() - self.ahead_ttl
        stale = [f for f, (_, t) in self._ahead.items() if t < cutoff]
        for file in stale:
            del self._ahead[file]
            self.counts["prefetch_expired"] += 1
        if stale:
            self._cond.notify_all()
        return sum(self._inflight.values()) + sum(b for b, _ in self._ahead.values())

    def _next(self) -> Any | None:
        """Wait for a shard that fits the byte bound; ``None`` once closed."""
        with self._cond:
            while not self._closed:
                if self._queue:
                    used = self._used()
                    shard = self._queue[0]
                    # always allow one shard, so a shard larger than the bound still prefetches
                    if used == 0 or used + shard.bytes <= self.max_bytes:
                        self._queue.popleft()
                        self._inflight[shard.file] = shard.bytes
                        # what the bound limits, at its highest (tests check it holds)
                        self.counts["prefetch_peak_bytes"] = max(
                            self.counts["prefetch_peak_bytes"], used + shard.bytes)
                        self.counts["prefetch_peak_shards"] = max(
                            self.counts["prefetch_peak_shards"], len(self._inflight))
                        return shard
                self._cond.wait(timeout=1.0)
            return None

    def _run(self) -> None:
        while (shard := self._next()) is not None:
            ok = failed = False
            try:
                ok = self._fetch(shard)
            except Exception as exc:  # noqa: BLE001 - the reader's own request retries and reports
                _logger.debug("prefetch of %s failed: %s", shard.file, exc)
                failed = True
                with self._cond:
                    self.counts["prefetch_errors"] += 1
            with self._cond:
                self._inflight.pop(shard.file, None)
                early = shard.file in self._early
                self._early.discard(shard.file)
                if ok and not early:
                    self._ahead[shard.file] = (shard.bytes, self._clock())
                elif not ok and not failed:
                    self._settled[shard.file] = self._clock()
                self._cond.notify_all()

    def close(self, timeout: float = 5.0) -> None:
        """Stop the threads after their current download (bounded wait)."""
        with self._cond:
            self._closed = True
            self._queue.clear()
            self._cond.notify_all()
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(timeout)
