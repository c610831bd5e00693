"""A warm standby for ranks: ``python -m streamshard.recovery.zygote SOCKET [SCRIPT]``.

Under ``streamshard launch --in-process`` a killed or hung rank is replaced by a new process. Started
cold, that process spends most of its time importing (``import torch`` alone is 1.5-4 s on a busy
2-core machine). So ranks are not started cold: a *zygote* process imports torch (and, on the first
request, what the training script imports), then waits on a Unix socket. Every start of a rank, the
first one included, is an ``os.fork()`` of the zygote that runs the script as ``__main__``
(``runpy.run_path``) with the imports already done. A replacement costs a fork plus what the script
does itself (rendezvous, checkpoint load), not an interpreter start.

``streamshard launch --in-process`` starts one zygote per node before it imports torch itself (the
two imports overlap) and passes its socket to the per-rank keepers in ``STREAMSHARD_ZYGOTE_SOCKET``;
a keeper started some other way starts a zygote of its own (:mod:`standby`).

Rules that keep the fork safe, checked before every fork:

- **Imports only.** The zygote executes only the script's top-level ``import``/``from ... import``
  statements (read with :mod:`ast`), never its other top-level code: nothing the script does at
  module level (a model built, a file opened) happens in the zygote.
- **No CUDA before fork.** A CUDA context does not survive ``fork``. If an import initialized CUDA
  (``torch.cuda.is_initialized()``), the zygote refuses and the keeper starts its rank cold.
- **No process group.** The zygote never joins one; if an import did
  (``torch.distributed.is_initialized()``) it refuses too. Each forked rank forms its own.
- **Single-threaded server.** The zygote serves requests from one thread (``select``); a library
  thread pool alive at fork time (OpenBLAS's when ``OMP_NUM_THREADS`` is unset) handles fork itself.
- **The rank is the keeper's.** The request carries the keeper's environment, working directory and
  standard streams (``SCM_RIGHTS``); the child takes them before running the script, and
  ``torch.set_num_threads`` follows the keeper's ``OMP_NUM_THREADS``. The zygote kills a rank whose
  keeper's connection closes, and dies with its parent (``PR_SET_PDEATHSIG``), as its ranks die with it.

Protocol, one connection per start: the keeper sends one JSON line ``{"argv", "env", "cwd"}`` with
its fds 0, 1, 2 attached; the zygote answers ``pid <pid>`` (or ``refuse <reason>``), and when that
child ends ``exit <code>`` (negative: killed by that signal, as :class:`subprocess.Popen` reports it).

Exit: a forked rank ends like ``python script.py`` up to its last ``atexit`` handler (non-daemon
threads joined, ``atexit`` handlers run, logging flushed), then leaves with ``os._exit``, skipping
the interpreter's teardown of every loaded module (with torch loaded, 1-4 s of CPU on a 2-core
machine, paid at every end of a rank, for nothing).
"""

from __future__ import annotations

import ast
import atexit
import json
import logging
import os
import select
import signal
import socket
import sys

from streamshard.lifeline import die_with_parent

log = logging.getLogger(__name__)
ENV_SOCKET = "STREAMSHARD_ZYGOTE_SOCKET"
# imported before any request. torch._dynamo: torch.optim imports it lazily when the first optimizer
# is built (3-6 s on a busy 2-core machine), so without it every rank would still pay that at start
WARM = ("torch", "torch.distributed", "torch._dynamo")
POLL_S = 0.05  # reaping latency for an ended rank
_exit_code = [0]


def import_statements(script: str) -> list[ast.stmt]:
    """The script's top-level absolute import statements (``from __future__`` left out)."""
    with open(script, "rb") as f:
        tree = ast.parse(f.read(), filename=script)
    return [n for n in tree.body if isinstance(n, ast.Import)
            or (isinstance(n, ast.ImportFrom) and n.level == 0 and n.module != "__future__")]


def preload(script: str) -> list[str]:
    """Run the script's top-level imports in a throwaway namespace; returns the ones that failed (the
    child will fail on them the ordinary way, with its own traceback)."""
    failed = []
    for node in import_statements(script):
        code = compile(ast.Module(body=[node], type_ignores=[]), script, "exec")
        try:
            exec(code, {"__name__": "__streamshard_zygote__"})
        except Exception as e:  # noqa: BLE001 - reported by the child when it runs the script
            failed.append(f"line {node.lineno}: {type(e).__name__}: {e}")
    return failed


def unsafe_to_fork() -> str | None:
    """Why forking this process would be unsafe (CUDA initialized, a process group joined), or None."""
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    if torch.cuda.is_initialized():
        return "an import initialized CUDA (a CUDA context does not survive fork)"
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return "an import joined a process group"
    return None


def _fast_exit() -> None:
    """Registered first, so it runs last of the ``atexit`` handlers: flush and leave."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):
            pass
    os._exit(_exit_code[0])


def exit_code_of(exc: SystemExit) -> int:
    """The process exit code ``raise SystemExit(x)`` gives (printing ``x`` when it is not an int)."""
    if exc.code is None:
        return 0
    if isinstance(exc.code, int):
        return exc.code & 0xFF
    sys.stderr.write(f"{exc.code}\n")  # what the interpreter itself prints for SystemExit(obj)
    return 1


def run_as_main(script: str, args: list[str]) -> int:
    """Run ``script`` as ``__main__`` with ``args``, as the interpreter would; its exit code."""
    import runpy
    import traceback

    sys.argv = [script, *args]
    sys.path[0] = os.path.dirname(os.path.abspath(script))  # as `python script.py` would
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as e:
        return exit_code_of(e)
    except KeyboardInterrupt:
        traceback.print_exc()
        return 128 + signal.SIGINT
    except BaseException:  # noqa: BLE001 - printed as the interpreter prints an uncaught exception
        traceback.print_exc()
        return 1
    return 0


class Request:
    def __init__(self, argv: list[str], env: dict[str, str], cwd: str, fds: list[int]):
        self.argv, self.env, self.cwd, self.fds = argv, env, cwd, fds


def read_request(conn: socket.socket) -> Request | None:
    """One request (None at end of file or on a malformed one: the keeper then starts cold)."""
    conn.settimeout(30.0)
    try:
        data, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
        for _ in range(64):  # bounded: an environment is far below 64 MiB
            if not data or data.endswith(b"\n"):
                break
            more = conn.recv(1 << 20)
            if not more:
                break
            data += more
        req = json.loads(data)
        argv, env, cwd = req["argv"], req["env"], req["cwd"]
        if not (isinstance(argv, list) and argv and all(isinstance(a, str) for a in argv) and isinstance(env, dict)
                and all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()) and isinstance(cwd, str)
                and len(fds) == 3):
            raise ValueError(f"malformed request (argv {argv!r:.80}, {len(fds)} fds)")
    except (OSError, ValueError, KeyError, TypeError) as e:
        if "fds" in locals():
            for fd in fds:
                os.close(fd)
        log.warning("zygote: bad request: %s", e)
        return None
    finally:
        conn.settimeout(None)
    return Request(argv, env, cwd, fds)


def _send(conn: socket.socket, line: str) -> None:
    try:
        conn.sendall((line + "\n").encode())
    except OSError:
        pass  # the keeper is gone; its rank is killed when its connection is seen closed


class Zygote:
    """The server: accepts keepers' connections, forks a rank per request, reports exit codes."""

    def __init__(self, listener: socket.socket, warm: tuple[str, ...] = WARM):
        self.listener, self.modules = listener, warm
        self.pending: set[socket.socket] = set()  # connected, request not read yet
        self.running: dict[socket.socket, int] = {}  # connection -> its rank's pid
        self.owner: dict[int, socket.socket | None] = {}  # pid -> connection (None: keeper gone)
        self.preloaded: set[str] = set()

    def warm(self, script: str | None = None) -> None:
        for name in self.modules:
            try:
                __import__(name)
            except Exception as e:  # noqa: BLE001 - a missing or broken module: the rank imports it itself
                log.info("zygote: could not preload %s: %s", name, e)
        if script and script not in self.preloaded and os.path.isfile(script):
            self.preloaded.add(script)
            here = os.path.dirname(os.path.abspath(script))
            if here not in sys.path:
                sys.path.insert(0, here)  # the script's own modules, as `python script.py` finds them
            failed = preload(script)
            if failed:
                log.warning("zygote: %d import(s) of %s failed in the standby: %s", len(failed), script, failed)

    def serve(self, rounds: int = 10**9) -> Request | None:
        """Serve until killed. Returns the request in a forked child (which then runs it)."""
        for _ in range(rounds):  # bounded
            ready, _, _ = select.select([self.listener, *self.pending, *self.running], [], [], POLL_S)
            for s in ready:
                if s is self.listener:
                    conn, _ = self.listener.accept()
                    self.pending.add(conn)
                elif s in self.pending:
                    self.pending.discard(s)
                    req = read_request(s)
                    if req is None:
                        s.close()
                        continue
                    child = self._fork(s, req)
                    if child is not None:
                        return child
                else:  # a running rank's keeper: any byte or end of file means it is gone
                    pid = self.running.pop(s)
                    self.owner[pid] = None
                    s.close()
                    _kill(pid)
            self._reap()
        return None

    def _fork(self, conn: socket.socket, req: Request) -> Request | None:
        self.warm(req.argv[0])
        why = unsafe_to_fork()
        if why is not None:
            _send(conn, f"refuse {why}")
            for fd in req.fds:
                os.close(fd)
            conn.close()
            return None
        pid = os.fork()
        if pid == 0:
            self.listener.close()
            for s in (*self.pending, *self.running, conn):
                s.close()
            return req
        for fd in req.fds:
            os.close(fd)
        self.running[conn] = pid
        self.owner[pid] = conn
        _send(conn, f"pid {pid}")
        return None

    def _reap(self) -> None:
        for _ in range(len(self.owner) + 1):  # bounded
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            conn = self.owner.pop(pid, None)
            if conn is not None:
                self.running.pop(conn, None)
                _send(conn, f"exit {os.waitstatus_to_exitcode(status)}")
                conn.close()


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def become(req: Request) -> int:
    """In the forked child: take the keeper's streams, directory and environment; run the script."""
    die_with_parent()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
        signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL)
    for target, fd in enumerate(req.fds):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(req.cwd)
    os.environ.clear()
    os.environ.update(req.env)
    threads = req.env.get("OMP_NUM_THREADS", "")
    if threads.isdigit() and int(threads) > 0 and "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(int(threads))  # torch read the zygote's at import
    return run_as_main(req.argv[0], req.argv[1:])


def main(argv: list[str]) -> int:
    """``SOCKET [SCRIPT] [--warm=MOD,MOD]`` (default: :data:`WARM`)."""
    warm = WARM
    if argv and argv[-1].startswith("--warm="):
        warm = tuple(m for m in argv.pop()[len("--warm="):].split(",") if m)
    path, script = argv[0], (argv[1] if len(argv) > 1 else None)
    atexit.register(_fast_exit)  # before any import registers its own: runs after all of them
    die_with_parent()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)  # bound before the imports: keepers may connect (and queue) at once
    listener.listen(64)
    z = Zygote(listener, warm)
    z.warm(script)
    req = z.serve()
    if req is None:
        return 0
    return become(req)


if __name__ == "__main__":
    _exit_code[0] = main(sys.argv[1:])
    sys.exit(_exit_code[0])
