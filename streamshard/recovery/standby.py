"""The keeper's side of the warm standby (:mod:`zygote`): ask it for a rank, wait for that rank.

``Standby.start(script_and_args, env)`` uses the node's zygote named by ``STREAMSHARD_ZYGOTE_SOCKET``
(started by ``streamshard launch --in-process``) or starts one of its own; ``spawn()`` returns a
started rank with the small part of :class:`subprocess.Popen`'s interface the keeper uses (``pid``,
``wait``, ``send_signal``, ``kill``, ``returncode``). If the zygote refuses (CUDA initialized by an
import, ...), cannot be reached or dies, ``spawn()`` starts the rank cold with
:class:`subprocess.Popen` from then on: a broken standby costs speed, never a start.
``STREAMSHARD_ZYGOTE=0`` starts every rank cold.
"""

from __future__ import annotations

import json
import logging
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence

from streamshard.lifeline import alive
from streamshard.recovery.zygote import ENV_SOCKET, WARM

log = logging.getLogger(__name__)
ENV_ZYGOTE = "STREAMSHARD_ZYGOTE"
READY_TIMEOUT = 600.0  # the first start waits for the zygote's imports


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
    """A rank forked by the zygote; its exit code comes back over its connection."""

    def __init__(self, conn: socket.socket, lines: _Lines, pid: int):
        self._conn, self._lines, self.pid = conn, lines, pid
        self.returncode: int | None = None
        self.zygote_lost = False

    def wait(self, timeout: float | None = None) -> int | None:
        if self.returncode is None:
            line = self._lines.readline(timeout)
            if line is None and timeout is not None and alive(self.pid):
                return None
            if line is None or not line.startswith("exit "):  # the zygote died: the rank died with it
                self.zygote_lost = True
                self.returncode = -signal.SIGKILL
            else:
                self.returncode = int(line.split()[1])
            self._conn.close()
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def start_zygote(path: str, script: str | None, env: Mapping[str, str],
                 warm: Sequence[str] = WARM) -> subprocess.Popen:
    """Start a zygote listening on ``path`` (it binds before importing anything heavy) that imports
    ``warm`` at once and the script's imports at the first request."""
    argv = [sys.executable, "-u", "-m", "streamshard.recovery.zygote", path, *([script] if script else []),
            "--warm=" + ",".join(warm)]
    return subprocess.Popen(argv, env=dict(env), stdin=subprocess.DEVNULL)


class Standby:
    def __init__(self, argv: Sequence[str], env: Mapping[str, str]):
        self.argv, self.env = list(argv), dict(env)
        self.path: str | None = env.get(ENV_SOCKET) or None
        self.proc: subprocess.Popen | None = None  # a zygote of our own
        self._tmp: str | None = None
        self.why_cold: str | None = None
        self.shared = self.path is not None

    @classmethod
    def start(cls, argv: Sequence[str], env: Mapping[str, str], *, warm: Sequence[str] = WARM) -> Standby:
        sb = cls(argv, env)
        if env.get(ENV_ZYGOTE, "1") == "0":
            sb.why_cold = f"{ENV_ZYGOTE}=0"
        elif sb.path is None:
            sb._tmp = tempfile.mkdtemp(prefix="streamshard-zygote-")
            sb.path = os.path.join(sb._tmp, "sock")
            sb.proc = start_zygote(sb.path, sb.argv[0], env, warm)
        return sb

    @property
    def warm(self) -> bool:
        return self.why_cold is None

    def _give_up(self, why: str) -> None:
        log.warning("warm standby unavailable (%s): starting ranks cold", why)
        self.why_cold = why
        self.close()

    def _request(self) -> Forked | str:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            deadline = time.monotonic() + 30.0
            for _ in range(3000):  # bounded: our own zygote binds its socket within moments of starting
                try:
                    conn.connect(self.path)
                    break
                except (FileNotFoundError, ConnectionRefusedError):
                    if self.proc is None or self.proc.poll() is not None or time.monotonic() > deadline:
                        raise
                    time.sleep(0.01)
            data = (json.dumps({"argv": self.argv, "env": self.env, "cwd": os.getcwd()}) + "\n").encode()
            sent = socket.send_fds(conn, [data], [0, 1, 2])
            conn.sendall(data[sent:])
            lines = _Lines(conn)
            line = lines.readline(READY_TIMEOUT)
        except OSError as e:
            conn.close()
            return f"cannot reach the zygote at {self.path}: {e}"
        if line is not None and line.startswith("pid "):
            return Forked(conn, lines, int(line.split()[1]))
        conn.close()
        return f"the zygote answered {line!r}"

    def spawn(self):
        """Start the rank: forked from the zygote, or cold if there is no working zygote."""
        if self.warm:
            got = self._request()
            if isinstance(got, Forked):
                return got
            self._give_up(got)
        return subprocess.Popen([sys.executable, "-u", *self.argv], env=self.env)

    def lost(self, child) -> None:
        """After ``child`` ended: if its zygote died with it, start cold from now on."""
        if isinstance(child, Forked) and child.zygote_lost and self.warm:
            self._give_up("the zygote died")

    def close(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5.0)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None
