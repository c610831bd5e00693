"""One writer per destination: an exclusive lock on a local dataset directory, and the cleanup of
temp files left by writers that died.

Local destinations are locked with ``flock`` on the directory itself (no lock file to leave
behind; the kernel drops the lock when the holder dies, also on SIGKILL). The holder describes
itself in ``<dest>/.streamshard-writer.json`` (pid, host, command line, start time) so a second
writer fails at once with a message naming the first (also within one process).

Remote destinations are locked by creating the holder file with a conditional create
(``pipe_file(mode="create")``: S3's ``If-None-Match: *``, exclusive on fsspec's memory and local
file systems). A holder left by a dead writer of this host (its pid is gone) is taken over; one
of another host is obeyed until someone deletes it (the error names the file). Stores without
conditional create have no lock; docs/FORMAT.md "Writing and atomicity" says so.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import socket
import sys
import time

from streamshard.errors import DestinationLockedError
from streamshard.lifeline import alive as _alive

log = logging.getLogger(__name__)
HOLDER_FILE = ".streamshard-writer.json"
# "<name>.tmp-<pid>" (shard temp files of older writers) or "<name>.tmp-<pid>-<hex>" (atomic.py)
_TEMP = re.compile(r".+\.tmp-(\d+)(?:-[0-9a-f]{8})?")


class DestLock:
    """Exclusive lock on local directory ``path`` (created if missing); ``release()`` frees it.
    Not re-entrant: a second lock on the same directory fails, also in the same process."""

    def __init__(self, path: str):
        os.makedirs(path, exist_ok=True)
        self.path = os.path.realpath(path)
        fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0))
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise DestinationLockedError(
                f"{path} is being written by another writer ({_describe_holder(self.path)}); "
                f"two writers on one destination would mix their shards. Wait for it to "
                f"finish or write elsewhere") from None
        self._fd: int | None = fd
        _write_holder(self.path)

    def release(self) -> None:
        """Free the lock (idempotent). The holder file goes first, then the lock."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.remove(os.path.join(self.path, HOLDER_FILE))
        except OSError:
            pass  # gone already, or the directory was removed: the lock goes with the fd
        os.close(fd)


class RemoteDestLock:
    """The lock of a remote destination ``root`` on filesystem ``fs``: the holder file, created
    only if absent. ``release()`` deletes it. ``url`` is used in messages."""

    def __init__(self, fs, root: str, url: str):
        self.fs, self.path, self._held = fs, f"{root}/{HOLDER_FILE}", False
        data = json.dumps(_holder_info()).encode()
        for attempt in range(2):
            try:
                fs.pipe_file(self.path, data, mode="create")
            except FileExistsError:
                holder = _remote_holder(fs, self.path)
                if attempt == 0 and _dead_here(holder):
                    log.info("taking over %s from dead writer pid %s", self.path, holder["pid"])
                    fs.rm_file(self.path)
                    continue
                raise DestinationLockedError(
                    f"{url} is being written by another writer ({_describe(holder)}); two "
                    f"writers on one destination would mix their shards. If that writer is "
                    f"dead, delete {url.rstrip('/')}/{HOLDER_FILE}") from None
            except (NotImplementedError, TypeError, ValueError) as exc:
                log.warning("%s: this store has no conditional create (%s); writing without a "
                            "lock", url, exc)
                return
            self._held = True
            return

    def release(self) -> None:
        if self._held:
            self._held = False
            try:
                self.fs.rm_file(self.path)
            except (OSError, ValueError):
                pass  # best effort: a stale holder of a dead process on this host is taken over


def _holder_info() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
            "command": " ".join(sys.argv)[:500]}


def _remote_holder(fs, path: str) -> dict | None:
    try:
        info = json.loads(fs.cat_file(path)[:4096])
        return info if isinstance(info, dict) else None
    except (OSError, ValueError):
        return None


def _dead_here(holder: dict | None) -> bool:
    if not holder or holder.get("host") != socket.gethostname():
        return False
    pid = holder.get("pid")
    return type(pid) is int and pid > 0 and not _alive(pid)


def _describe(info: dict | None) -> str:
    try:
        return (f"pid {int(info['pid'])} on {info.get('host', '?')}, started "  # type: ignore[index]
                f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(float(info['started'])))}: "  # type: ignore[index]
                f"{str(info.get('command', ''))[:200]}")  # type: ignore[union-attr]
    except (ValueError, KeyError, TypeError, AttributeError, OverflowError):
        return "holder unknown"


def _write_holder(path: str) -> None:
    info = _holder_info()
    tmp = os.path.join(path, f"{HOLDER_FILE}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            json.dump(info, f)
        os.replace(tmp, os.path.join(path, HOLDER_FILE))
    except OSError:
        pass  # only used to name us in another writer's error


def _describe_holder(path: str) -> str:
    try:
        with open(os.path.join(path, HOLDER_FILE)) as f:
            info = json.loads(f.read(4096))
    except (OSError, ValueError):
        return "holder unknown"
    return _describe(info if isinstance(info, dict) else None)


def clean_stale_temps(*dirs: str) -> list[str]:
    """Delete ``*.tmp-<pid>[-<hex>]`` files in ``dirs`` whose writer process is dead (a live
    pid's files are kept: maybe another dataset's writer). Returns the removed paths. Only
    regular files and symlinks are removed, never followed."""
    removed = []
    for d in dirs:
        try:
            names = os.listdir(d)
        except OSError:
            continue
        for name in names:
            m = _TEMP.fullmatch(name)
            if m is None or _alive(int(m.group(1))):
                continue
            path = os.path.join(d, name)
            try:
                if os.path.isdir(path) and not os.path.islink(path):
                    continue
                os.remove(path)
                removed.append(path)
            except OSError:
                continue
    return removed
