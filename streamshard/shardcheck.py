"""Checks of a shard against what the index says of it, and of untrusted sizes, made before any
allocation or read that a hostile file could abuse (docs/FORMAT.md "What is checked when")."""

from __future__ import annotations

import os
import stat
from typing import Any

import numpy as np
import zstandard

from streamshard.errors import CorruptionError, FormatError, StorageError


def check_against_index(table: np.ndarray, trailer: Any, info: Any, name: str) -> None:
    """Check a shard's trailer and table against what the index says of it (``info``: a
    ``ShardInfo``): sample count, total raw bytes (a zstd bomb is refused unless the index
    declares its size) and identity (the block table's xxh64, which covers every block's
    offset, sizes and checksum: a shard of another dataset or a swapped shard differs)."""
    if trailer.num_samples != info.samples:
        raise CorruptionError(f"{name}: shard holds {trailer.num_samples} samples, the index "
                              f"says {info.samples}")
    raw = int(table["raw"].sum(dtype=np.uint64)) if trailer.num_blocks else 0
    if raw != info.raw_bytes:
        raise CorruptionError(f"{name}: blocks declare {raw} raw bytes, the index says "
                              f"{info.raw_bytes}")
    ident = getattr(info, "table_xxh64", None)
    if ident is not None and f"{trailer.table_xxh64:016x}" != ident:
        raise CorruptionError(f"{name}: shard identity mismatch: its block table hash is "
                              f"{trailer.table_xxh64:016x}, the index says {ident} (a shard of "
                              f"another dataset, or shards renamed or swapped)")


def check_frame(stored: Any, raw_size: int, where: str) -> None:
    """Refuse a zstd frame whose header does not declare exactly ``raw_size`` bytes before
    decompressing it (zstandard allocates what the frame declares, ignoring max_output_size)."""
    try:
        declared = zstandard.frame_content_size(stored)
    except zstandard.ZstdError as exc:
        raise CorruptionError(f"{where}: not a zstd frame: {exc}") from None
    if declared < 0:
        raise CorruptionError(f"{where}: zstd frame has no content size (streamshard writes it; "
                              f"refusing to decompress an unbounded frame)")
    if declared != raw_size:
        raise CorruptionError(f"{where}: zstd frame declares content size {declared}, the "
                              f"block table says {raw_size}")


def open_regular(path: str, name: str) -> Any:
    """Open ``path`` for reading only if it is a regular file: a FIFO, device or directory named
    by a hostile index is refused without being opened for reading (a FIFO would block, a device
    stream endless bytes). The stat and the open are raced-checked with ``fstat``."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise StorageError(f"{name}: {path} is missing", url=path) from None
    except OSError as exc:
        raise StorageError(f"{name}: cannot stat {path}: {exc.strerror}", url=path) from None
    if not stat.S_ISREG(st.st_mode):
        raise FormatError(f"{name}: {path} is not a regular file (mode {stat.filemode(st.st_mode)})")
    try:  # O_NONBLOCK: a FIFO swapped in after the stat opens without waiting, then is refused
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise StorageError(f"{name}: cannot open {path}: {exc.strerror}", url=path) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise FormatError(f"{name}: {path} is not a regular file")
    os.set_blocking(fd, True)
    return open(fd, "rb", buffering=0)


_FATAL_REPORTED: list[bool] = []


def report_fatal_signals() -> None:
    """Have the process print a traceback if it dies of a fatal signal (``faulthandler``), once
    per process and only if nobody enabled it before. Called when a shard is mmapped: a shard
    truncated after it was opened ends the process with SIGBUS on the next access, which Python
    cannot catch; the traceback then points at streamshard's read path instead of nothing."""
    if _FATAL_REPORTED:
        return
    _FATAL_REPORTED.append(True)
    import faulthandler

    if not faulthandler.is_enabled():
        try:
            faulthandler.enable()
        except Exception:  # noqa: BLE001 - no usable stderr (pythonw, replaced streams): skip
            pass
