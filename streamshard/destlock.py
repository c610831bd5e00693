"""One writer per destination: an exclusive lock on a local dataset directory, and the cleanup of
temp files left by writers that died.

Local destinations are locked with ``flock`` on the directory itself (no lock file to leave
behind; the kernel drops the lock when the holder dies, also on SIGKILL). The holder describes
itself in ``<dest>/.streamshard-writer.json`` (pid, host, command line, start time) so a second
writer fails at once with a message naming the first (also within one process).

Remote destinations (object stores) have no lock: two writers on one URL can still mix their
shards; docs/FORMAT.md "Writing and atomicity" says so.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import socket
import sys
import time

from streamshard.errors import DestinationLockedError

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


def _write_holder(path: str) -> None:
    info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
            "command": " ".join(sys.argv)[:500]}
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
        return (f"pid {int(info['pid'])} on {info.get('host', '?')}, started "
                f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(float(info['started'])))}: "
                f"{str(info.get('command', ''))[:200]}")
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


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
