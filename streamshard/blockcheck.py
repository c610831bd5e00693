"""Which blocks of which uncompressed shard files this process has already checked.

Uncompressed shards are read through an mmap with no per-read checksum; instead each block's
XXH64 is checked the first time the process touches it (docs/FORMAT.md "What is checked when").
The record is per process and keyed by the file's identity (device, inode, size, mtime), so a
shard reader evicted from a dataset's LRU and reopened, or a second ``Dataset`` on the same files,
does not hash the same block twice; a rewritten file gets a fresh record. Forked DataLoader
workers inherit the parent's record (the bytes they map are the same pages). Thread-safe: a block
checked twice by two racing threads costs one extra hash, never a wrong answer.
"""

from __future__ import annotations

import os
import threading

_lock = threading.Lock()
_checked: dict[tuple[int, int, int, int], bytearray] = {}
_counts = {"blocks_checked": 0, "bytes_checked": 0}
# One bytearray per shard file ever opened; a 100,000-shard dataset of 1,000 blocks each costs
# 100 MB only if every block of every shard is touched in one process. Beyond this many files the
# oldest records are dropped (their blocks get checked again on the next touch: still correct).
MAX_FILES = 65536


def record_for(st: os.stat_result, num_blocks: int) -> bytearray:
    """The per-block ``checked`` flags (0/1) of the file with stat ``st`` (shared, mutable)."""
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    with _lock:
        rec = _checked.get(key)
        if rec is None or len(rec) != num_blocks:
            if len(_checked) >= MAX_FILES:
                _checked.pop(next(iter(_checked)))
            rec = _checked[key] = bytearray(num_blocks)
        return rec


def count(nbytes: int) -> None:
    with _lock:
        _counts["blocks_checked"] += 1
        _counts["bytes_checked"] += nbytes


def stats() -> dict[str, int]:
    """``blocks_checked`` and ``bytes_checked`` by first-touch checks in this process."""
    with _lock:
        return dict(_counts)
