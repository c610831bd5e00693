"""The one way streamshard replaces a local file: write a unique temp name, optionally fsync,
rename over the target. Readers see the old content or the new, never a mix."""

from __future__ import annotations

import os
import secrets

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
