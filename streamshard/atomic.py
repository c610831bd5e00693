"""The one way streamshard replaces a file: locally write a unique temp name, optionally fsync,
rename over the target; on an object store one put. Readers see the old content or the new,
never a mix. JSON files go through :func:`atomic_write_json`."""

from __future__ import annotations

import json
import os
import secrets
from typing import Any

TMP_MARK = ".tmp-"  # temp names are "<target>.tmp-<pid>-<random>"; cleaners may match on it


def atomic_write(path: str | os.PathLike, data: bytes, *, fsync: bool = True) -> None:
    """Replace ``path`` with ``data`` atomically. ``fsync`` makes the content durable before the
    rename (index and checkpoint files); caches whose content is re-verifiable skip it."""
    path = os.fspath(path)
    tmp = f"{path}{TMP_MARK}{os.getpid()}-{secrets.token_hex(4)}"
    try:
        with open(tmp, "wb") as f:
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


def put_atomic(path: str | os.PathLike, data: bytes, *, fs: Any = None, fsync: bool = True) -> None:
    """Replace ``path`` with ``data`` so no reader sees half of it, on any filesystem: locally
    (``fs`` None or a LocalFileSystem) :func:`atomic_write` after creating the parent folder;
    on an object store one ``pipe_file`` (a single PUT, or a multipart upload that only
    becomes visible when complete)."""
    if fs is not None and not _is_local(fs):
        fs.pipe_file(os.fspath(path), data)
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write(path, data, fsync=fsync)


def atomic_write_json(path: str | os.PathLike, obj: Any, *, fs: Any = None,
                      fsync: bool = True) -> None:
    """The one way streamshard writes a JSON file (markers, stats, cache and checkpoint
    metadata): strict JSON (``ValueError`` on NaN/Infinity), sorted keys, written by
    :func:`put_atomic`."""
    data = json.dumps(obj, indent=1, sort_keys=True, allow_nan=False).encode("utf-8")
    put_atomic(path, data, fs=fs, fsync=fsync)


def _is_local(fs: Any) -> bool:
    from fsspec.implementations.local import LocalFileSystem

    return isinstance(fs, LocalFileSystem)
