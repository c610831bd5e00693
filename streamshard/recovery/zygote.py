"""A warm standby for a rank's replacement: ``python -m streamshard.recovery.zygote FD SCRIPT [ARGS]``.

Under ``streamshard launch --in-process`` a killed or hung rank is replaced by a new process. Started
cold, that process spends most of its time importing (``import torch`` alone is 1.5-3 s on a
2-core machine). The keeper (:mod:`keeper`) therefore starts the rank through a *zygote*: a process
that imports what the training script imports, then waits. Every start of the rank, the first one
included, is an ``os.fork()`` of the zygote, which then runs the script as ``__main__``
(``runpy.run_path``) in the child with its imports already done. A replacement costs a fork plus
what the script does itself (rendezvous, checkpoint load), not an interpreter start.

Rules that keep the fork safe, checked before the zygote declares itself ready:

- **Imports only.** The zygote executes only the script's top-level ``import``/``from ... import``
  statements (read with :mod:`ast`), never its other top-level code, so nothing the script does at
  module level (a model built, a file opened) happens in the zygote.
- **No CUDA before fork.** A CUDA context does not survive ``fork``. If an import initialized CUDA
  (``torch.cuda.is_initialized()``), the zygote refuses and the keeper starts ranks cold.
- **No process group.** The zygote never joins one; if an import did
  (``torch.distributed.is_initialized()``), it refuses too. Each forked rank forms its own group.
- **Single-threaded.** A library thread alive at fork time (OpenBLAS's pool when
  ``OMP_NUM_THREADS``/``OPENBLAS_NUM_THREADS`` are unset) is logged; OpenBLAS handles fork itself.
- The zygote dies with its keeper (``PR_SET_PDEATHSIG``), and each forked rank with the zygote.

Exit: a forked rank ends like ``python script.py`` up to its last ``atexit`` handler (non-daemon
threads joined, ``atexit`` handlers run, logging flushed), then leaves with ``os._exit``, skipping
the interpreter's teardown of every loaded module: with torch loaded that teardown costs 1-4 s of
CPU on a 2-core machine, paid at every end of a rank, for nothing. The zygote exits the same way.

Protocol on the inherited socket ``FD`` (one line each way): the zygote sends ``ready <seconds>``
(or ``refuse <reason>``); on ``fork`` it forks and sends ``pid <pid>``, waits for that child and
sends ``exit <code>`` (negative: killed by that signal, as :class:`subprocess.Popen` reports it);
end of file stops it. One child at a time.
"""

from __future__ import annotations

import ast
import atexit
import ctypes
import logging
import os
import signal
import socket
import sys
import time

log = logging.getLogger(__name__)
PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Linux: receive ``sig`` when the parent exits (a no-op where prctl is not available)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    except (OSError, AttributeError):
        pass


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


def threads() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return 1


_exit_code = [0]


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
    print(exc.code, file=sys.stderr)
    return 1


def run_as_main(script: str, args: list[str]) -> int:
    """Run ``script`` as ``__main__`` with ``args``, as the interpreter would; its exit code."""
    import runpy
    import traceback

    sys.argv = [script, *args]
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


def _send(sock: socket.socket, line: str) -> None:
    sock.sendall((line + "\n").encode())


def serve(sock: socket.socket, script: str) -> int | None:
    """The zygote's loop. Returns None in a forked child (which then runs the script), else the
    zygote's own exit code."""
    t0 = time.monotonic()
    failed = preload(script)
    if failed:
        log.warning("zygote: %d import(s) of %s failed in the standby: %s", len(failed), script, failed)
    why = unsafe_to_fork()
    if why is not None:
        _send(sock, f"refuse {why}")
        return 0
    if threads() > 1:
        log.info("zygote: %d threads alive at fork (library thread pools); forking anyway", threads())
    _send(sock, f"ready {time.monotonic() - t0:.3f}")
    reader = sock.makefile("r")
    for _ in range(1_000_000):  # bounded: one iteration per start of the rank
        line = reader.readline().strip()
        if line != "fork":
            return 0  # end of file (the keeper is done) or an unknown command
        pid = os.fork()
        if pid == 0:
            reader.close()
            sock.close()
            return None
        _send(sock, f"pid {pid}")
        _, status = os.waitpid(pid, 0)
        _send(sock, f"exit {os.waitstatus_to_exitcode(status)}")
    return 0


def main(argv: list[str]) -> int:
    fd, script, args = int(argv[0]), argv[1], argv[2:]
    atexit.register(_fast_exit)  # before any import registers its own: runs after all of them
    die_with_parent()
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))  # as `python script.py` would
    sock = socket.socket(fileno=fd)
    code = serve(sock, script)
    if code is not None:
        return code
    # the forked rank: run the script as `python script.py args` would, imports already done
    die_with_parent()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL)
    return run_as_main(script, args)


if __name__ == "__main__":
    _exit_code[0] = main(sys.argv[1:])
    sys.exit(_exit_code[0])
