"""The one way streamshard replaces a local file: write a unique temp name, optionally fsync,
rename over the target. Readers see the old content or the new, never a mix."""

from __future__ import annotations

import os
import secrets

TMP_MARK = ".tmp-"  # temp names are "<target>.tmp-<pid>-<random>"; cleaners may match on it


# O_EXCL: never reuse an existing file; O_NOFOLLOW: never write through a planted symlink.
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


def create_exclusive(path: str, mode: int = 0o644) -> int:
    """Create ``path`` for writing; fails if anything (a file, a symlink) is already there."""
    return os.open(path, _CREATE, mode)


def temp_name(path: str) -> str:
    """A fresh temp name next to ``path``: ``<path>.tmp-<pid>-<8 hex>``."""
    return f"{path}{TMP_MARK}{os.getpid()}-{secrets.token_hex(4)}"


def atomic_write(path: str | os.PathLike, data: bytes, *, fsync: bool = True,
                 mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` atomically. ``fsync`` makes the content durable before the
    rename (index and checkpoint files); caches whose content is re-verifiable skip it. The temp
    file is created with O_EXCL|O_NOFOLLOW and ``mode`` (0o600 for files naming credentials)."""
    path = os.fspath(path)
    tmp = temp_name(path)
    try:
        with os.fdopen(create_exclusive(tmp, mode), "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
