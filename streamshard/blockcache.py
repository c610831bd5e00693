"""A byte-bounded LRU of decompressed blocks, shared by all shard readers of one ``Dataset``.

A shuffled read of a compressed shard costs one block decompression per sample unless the block
is still around: with 64 KiB blocks and 4 KiB samples that is 16x the bytes served. Shuffle
windows are random only inside a window, so when the decompressed blocks of the windows a
process is reading fit in this cache, every block is decompressed once per epoch instead of once
per sample (``docs/LOADER.md`` sizes the window for it). Each DataLoader worker has its own
cache (a Dataset copy per process).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Hashable


class BlockCache:
    """LRU of ``key -> (raw block bytes, payload start)`` holding at most ``max_bytes`` of blocks
    (always at least the newest one). Thread-safe. Counts hits, misses and evictions."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[Hashable, tuple[bytes, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = self.evictions = 0

    def get(self, key: Hashable) -> tuple[bytes, int] | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry

    def put(self, key: Hashable, raw: bytes, head: int) -> None:
        if self.max_bytes <= 0:
            return
        with self._lock:
            if key in self._entries:
                return
            self._entries[key] = (raw, head)
            self._bytes += len(raw)
            while self._bytes > self.max_bytes and len(self._entries) > 1:
                _, (old, _) = self._entries.popitem(last=False)
                self._bytes -= len(old)
                self.evictions += 1

    @property
    def nbytes(self) -> int:
        return self._bytes

    def stats(self) -> dict[str, int]:
        return {"block_lru_hits": self.hits, "block_lru_misses": self.misses,
                "block_lru_evictions": self.evictions, "block_lru_bytes": self._bytes}
