"""Streaming from any fsspec URL through a local cache shared by every process on a node.

``CachedSource`` (the reader's ``ShardSource`` for non-local URLs), ``RetryPolicy`` (bounded
backoff, the only retry), ``ShardCache`` (the on-disk cache: locks, budget, eviction) and
``default_cache_dir``. The machinery behind them (``Prefetcher``, ``Remote``, ``call_with_retry``,
error classification) stays in its modules. See ``docs/REMOTE.md``.
"""

from __future__ import annotations

from streamshard.remote.cache import ShardCache
from streamshard.remote.parts import PartPolicy
from streamshard.remote.source import CachedSource, default_cache_dir
from streamshard.remote.storage import RetryPolicy

__all__ = ["CachedSource", "PartPolicy", "RetryPolicy", "ShardCache", "default_cache_dir"]
assert sorted(__all__) == __all__
