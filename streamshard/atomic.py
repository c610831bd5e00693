"""The one way streamshard replaces a file: locally write a unique temp name, optionally fsync,
rename over the target; on an object store one put. Readers see the old content or the new,
never a mix. JSON files go through :func:`atomic_write_json`."""

from __future__ import annotations

import json
import os
import secrets
from typing import Any

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


def put_atomic(path: str | os.PathLike, data: bytes, *, fs: Any = None, fsync: bool = True,
               mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` so no reader sees half of it, on any filesystem: locally
    (``fs`` None or a LocalFileSystem) :func:`atomic_write` after creating the parent folder;
    on an object store one ``pipe_file`` (a single PUT, or a multipart upload that only
    becomes visible when complete)."""
    if fs is not None and not _is_local(fs):
        fs.pipe_file(os.fspath(path), data)
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write(path, data, fsync=fsync, mode=mode)


def atomic_write_json(path: str | os.PathLike, obj: Any, *, fs: Any = None,
                      fsync: bool = True, mode: int = 0o644) -> None:
    """The one way streamshard writes a JSON file (markers, stats, cache and checkpoint
    metadata): strict JSON (``ValueError`` on NaN/Infinity), sorted keys, written by
    :func:`put_atomic`."""
    data = json.dumps(obj, indent=1, sort_keys=True, allow_nan=False).encode("utf-8")
    put_atomic(path, data, fs=fs, fsync=fsync, mode=mode)


def _is_local(fs: Any) -> bool:
    from fsspec.implementations.local import LocalFileSystem

    return isinstance(fs, LocalFileSystem)
