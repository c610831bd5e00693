"""The keeper's side of the warm standby (:mod:`zygote`): start it, fork ranks from it, wait for them.

``Standby.start(script_and_args, env)`` starts the zygote and waits until it has imported what the
script imports (bounded); ``spawn()`` returns a started rank with the small part of
:class:`subprocess.Popen`'s interface the keeper uses (``pid``, ``wait``, ``send_signal``, ``kill``).
If the zygote refuses (CUDA initialized by an import, ...), fails to start or dies, ``spawn()``
starts the rank cold with :class:`subprocess.Popen` from then on, so a broken standby costs speed,
never a start.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence

log = logging.getLogger(__name__)
ENV_ZYGOTE = "STREAMSHARD_ZYGOTE"  # "0": start every rank cold
READY_TIMEOUT = 600.0


class _Lines:
    """Line reader over a socket with per-call timeouts (None at end of file or timeout)."""

    def __init__(self, sock: socket.socket):
        self.sock, self.buf = sock, b""

    def readline(self, timeout: float | None) -> str | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([self.sock], [], [], left)
            if not ready:
                return None
            try:
                chunk = self.sock.recv(4096)
            except OSError:
                chunk = b""
            if not chunk:
                return None
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line.decode(errors="replace").strip()


class Forked:
    """A rank forked by the zygote; its exit code comes back over the socket."""

    def __init__(self, lines: _Lines, pid: int):
        self._lines, self.pid = lines, pid
        self.returncode: int | None = None
        self.zygote_lost = False

    def wait(self, timeout: float | None = None) -> int | None:
        if self.returncode is None:
            line = self._lines.readline(timeout)
            if line is None and timeout is not None and _alive(self.pid):
                return None
            if line is None or not line.startswith("exit "):  # the zygote died: the rank died with it
                self.zygote_lost = True
                self.returncode = -signal.SIGKILL
            else:
                self.returncode = int(line.split()[1])
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Standby:
    def __init__(self, argv: Sequence[str], env: Mapping[str, str]):
        self.argv, self.env = list(argv), dict(env)
        self.proc: subprocess.Popen | None = None
        self.sock: socket.socket | None = None
        self.lines: _Lines | None = None
        self.ready_s: float | None = None
        self.why_cold: str | None = None

    @classmethod
    def start(cls, argv: Sequence[str], env: Mapping[str, str], *, timeout: float = READY_TIMEOUT) -> Standby:
        sb = cls(argv, env)
        if env.get(ENV_ZYGOTE, "1") == "0":
            sb.why_cold = f"{ENV_ZYGOTE}=0"
            return sb
        ours, theirs = socket.socketpair()
        try:
            sb.proc = subprocess.Popen([sys.executable, "-u", "-m", "streamshard.recovery.zygote", str(theirs.fileno()),
                                        *sb.argv], env=sb.env, pass_fds=[theirs.fileno()])
        finally:
            theirs.close()
        sb.sock, sb.lines = ours, _Lines(ours)
        line = sb.lines.readline(timeout)
        if line is None or not line.startswith("ready "):
            sb._give_up(f"the zygote said {line!r}" if line else "the zygote did not become ready")
        else:
            sb.ready_s = float(line.split()[1])
        return sb

    @property
    def warm(self) -> bool:
        return self.why_cold is None

    def _give_up(self, why: str) -> None:
        log.warning("warm standby unavailable (%s): starting ranks cold", why)
        self.why_cold = why
        self.close()

    def spawn(self):
        """Start the rank: forked from the zygote, or cold if there is no working zygote."""
        if self.warm:
            try:
                self.sock.sendall(b"fork\n")
                line = self.lines.readline(60.0)
            except OSError as e:
                line = f"error {e}"
            if line is not None and line.startswith("pid "):
                return Forked(self.lines, int(line.split()[1]))
            self._give_up(f"fork answered {line!r}")
        return subprocess.Popen([sys.executable, "-u", *self.argv], env=self.env)

    def lost(self, child) -> None:
        """After ``child`` ended: if its zygote died with it, start cold from now on."""
        if isinstance(child, Forked) and child.zygote_lost and self.warm:
            self._give_up("the zygote died")

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if self.proc is not None:
            try:
                self.proc.wait(timeout=5.0)  # end of file on its socket: it exits
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None
