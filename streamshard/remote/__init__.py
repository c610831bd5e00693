"""Streaming from any fsspec URL through a local cache shared by every process on a node.

``CachedSource`` (the reader's ``ShardSource`` for non-local URLs), ``ShardCache`` (the on-disk
cache: locks, budget, eviction), ``RetryPolicy`` (bounded backoff) and ``Prefetcher``. See
``docs/REMOTE.md``.
"""

from __future__ import annotations

from streamshard.remote.cache import ShardCache, file_xxh64
from streamshard.remote.parts import PartPolicy
from streamshard.remote.prefetch import Prefetcher
from streamshard.remote.source import CachedSource, default_cache_dir, url_key
from streamshard.remote.storage import Remote, RetryPolicy, call_with_retry, is_transient

__all__ = [
    "CachedSource", "PartPolicy", "Prefetcher", "Remote", "RetryPolicy", "ShardCache", "call_with_retry",
    "default_cache_dir", "file_xxh64", "is_transient", "url_key",
]
