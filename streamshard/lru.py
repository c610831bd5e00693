"""The one in-process LRU design: a thread-safe map bounded by the total size of its values.

Used for a ``Dataset``'s open shard readers (size 1 each: a count bound, evicting unpins the
shard in its source) and its decompressed blocks (size = bytes: a byte bound). The node-wide
disk cache (``remote/cache.py``) is the same policy across processes, where the recency is each
entry's meta-file mtime, because no in-process structure is shared between processes.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Callable, Generic, Hashable, Iterator, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class LRU(Generic[K, V]):
    """Least-recently-used map holding values whose ``size(value)`` (default 1) sum to at most
    ``capacity``; the newest entry is always kept, even when alone it exceeds the capacity.

    ``on_evict(key, value)`` runs for every entry pushed out by :meth:`put` or :meth:`make_room`
    (not for :meth:`pop` or :meth:`drain`), after the internal lock is released. Thread-safe.
    Counts ``hits``, ``misses`` and ``evictions``. Picklable as an empty map of the same
    capacity (a copy in another process starts cold).
    """

    def __init__(self, capacity: int, *, size: Callable[[V], int] | None = None,
                 on_evict: Callable[[K, V], None] | None = None):
        self.capacity = capacity
        self._size = size
        self._on_evict = on_evict
        self._entries: OrderedDict[K, V] = OrderedDict()
        self._total = 0
        self._lock = threading.Lock()
        self.hits = self.misses = self.evictions = 0

    def __getstate__(self) -> dict:
        return {"capacity": self.capacity, "size": self._size, "on_evict": self._on_evict}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["capacity"], size=state["size"], on_evict=state["on_evict"])

    def get(self, key: K) -> V | None:
        """The value of ``key`` (now the most recently used), or ``None``."""
        with self._lock:
            value = self._entries.get(key)
            if value is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return value

    def touch(self, keys) -> None:
        """Make each of ``keys`` that is held the most recent (in order), under one lock; no
        hit or miss is counted (a bulk use, e.g. the shards one gathered batch read)."""
        with self._lock:
            entries = self._entries
            for key in keys:
                if key in entries:
                    entries.move_to_end(key)

    def put(self, key: K, value: V) -> None:
        """Insert (or replace) ``key`` as the most recent entry, evicting the least recent ones
        until the total fits the capacity. A capacity <= 0 stores nothing."""
        if self.capacity <= 0:
            return
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._total -= self._sizeof(old)
            self._entries[key] = value
            self._total += self._sizeof(value)
            evicted = self._shrink(self.capacity, keep=1)
        self._evicted(evicted)

    def make_room(self, size: int = 1) -> None:
        """Evict least recent entries until ``size`` more fits (before creating a value whose
        resources the evictions free, e.g. a shard pin)."""
        with self._lock:
            evicted = self._shrink(self.capacity - size, keep=0)
        self._evicted(evicted)

    def pop(self, key: K) -> V | None:
        with self._lock:
            value = self._entries.pop(key, None)
            if value is not None:
                self._total -= self._sizeof(value)
            return value

    def drain(self) -> list[tuple[K, V]]:
        """Remove and return every entry, least recent first (``on_evict`` is not called)."""
        with self._lock:
            items = list(self._entries.items())
            self._entries.clear()
            self._total = 0
            return items

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def peek(self, key: K) -> V | None:
        """The value of ``key`` or ``None``, without counting a use or a hit (one dict read:
        atomic under the GIL, so no lock)."""
        return self._entries.get(key)

    def __iter__(self) -> Iterator[K]:
        with self._lock:
            return iter(list(self._entries))

    @property
    def total(self) -> int:
        """Sum of the sizes of the entries held."""
        return self._total

    def stats(self, prefix: str = "") -> dict[str, int]:
        return {f"{prefix}hits": self.hits, f"{prefix}misses": self.misses,
                f"{prefix}evictions": self.evictions, f"{prefix}bytes": self._total}

    def _sizeof(self, value: V) -> int:
        return 1 if self._size is None else self._size(value)

    def _shrink(self, limit: int, *, keep: int) -> list[tuple[K, V]]:
        """Pop least recent entries while the total exceeds ``limit`` and more than ``keep``
        remain (caller holds the lock)."""
        out = []
        while self._total > limit and len(self._entries) > keep:
            key, value = self._entries.popitem(last=False)
            self._total -= self._sizeof(value)
            self.evictions += 1
            out.append((key, value))
        return out

    def _evicted(self, items: list[tuple[K, V]]) -> None:
        if self._on_evict is not None:
            for key, value in items:
                self._on_evict(key, value)
