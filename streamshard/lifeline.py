"""Child processes that die with the process that started them (the one implementation of the
parent-death watch: the recovery zygote and its ranks, :mod:`streamshard.recovery.zygote`, arm
the same :func:`die_with_parent`; the keeper's standby and the destination lock check pids with
:func:`alive`).

``convert --workers N`` runs its chunks in a process pool under a forkserver. When the parent is
killed with SIGKILL nothing runs in it, so the children must notice themselves, or they keep
writing into the destination for ever (and a rerun races with them):

- Linux: ``prctl(PR_SET_PDEATHSIG, SIGKILL)`` makes the kernel kill the child when its parent
  exits; it is armed in the forkserver (whose parent is the converting process) and in each
  worker (whose parent is the forkserver, or the converter itself under plain fork).
- Everywhere: a daemon thread checks every ``interval`` seconds that the converting process is
  still alive and ends the child with ``os._exit`` when it is not (also covers the moment between
  fork and arming, when the parent may already be gone).
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading
import time

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1  # linux/prctl.h
# Set by the converting process before its forkserver starts: the forkserver arms itself on
# import of this module only when this names its parent (an exact, not a guessed, condition).
FORKSERVER_PARENT_ENV = "_STREAMSHARD_FORKSERVER_PARENT"
EXIT_ORPHANED = 70


def die_with_parent(sig: int = signal.SIGKILL) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent exits (Linux only).
    Returns whether it was armed."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        # dlopen(NULL): the process's own symbols, libc's prctl among them; no find_library
        # (it runs ``ldconfig -p``, ~15 ms, in every zygote-forked rank)
        return ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def alive(pid: int) -> bool:
    """Whether process ``pid`` exists (one owned by another user counts; a pid too large for
    the OS, e.g. read from a stale lock file, does not)."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def watch(pid: int, interval: float = 1.0) -> threading.Thread:
    """Start a daemon thread that ends this process (exit code 70) once ``pid`` is gone."""
    def run() -> None:
        while alive(pid):
            time.sleep(interval)
        log.error("streamshard: parent process %d is gone; this worker exits", pid)
        os._exit(EXIT_ORPHANED)

    t = threading.Thread(target=run, name="streamshard-lifeline", daemon=True)
    t.start()
    return t


def arm(owner: int, interval: float = 1.0) -> None:
    """Make this child process die with ``owner`` (the process that started the work): the
    kernel signal where available, and the polling thread in any case."""
    die_with_parent()
    if not alive(owner):  # gone before we armed: the kernel will not signal us any more
        os._exit(EXIT_ORPHANED)
    watch(owner, interval)


def _arm_forkserver() -> None:
    # Runs when the forkserver preloads this module (see convert._run): the forkserver is
    # single-threaded, so PDEATHSIG fires exactly when the converting process exits.
    # No polling thread here: the forkserver forks the workers, and they arm themselves.
    parent = os.environ.get(FORKSERVER_PARENT_ENV)
    if parent and parent == str(os.getppid()):
        die_with_parent()
        if not alive(int(parent)):
            os._exit(EXIT_ORPHANED)


_arm_forkserver()
