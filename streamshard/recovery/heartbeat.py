"""Hang detection from outside the training process: heartbeats in a file, a monitor in the launcher.

The training process (the *worker*) only writes: on every phase change (``with hb.phase("step")``)
it overwrites one small record in ``<dir>/local<LOCAL_RANK>.hb`` (one ``pwrite``, no lock, no
thread): the current phase and when it began, plus, per phase, how many times it completed and the
longest of its recent durations. The monitor (a thread in ``streamshard launch``'s agent process,
or any other process) polls those files; since it does not share the worker's interpreter, a stuck
C call that holds the GIL, a SIGSTOP, or a deadlocked collective cannot keep it from firing.

Timeout of the current phase, calibrated from the worker's own measurements:

- phase seen completing at least ``min_samples`` (3) times after its first 2 (warm-up, not measured):
  ``max(floor, factor * longest recent duration)``, ``floor = 3 s``, ``factor = 5``: a 50 ms step
  is declared hung after 3 s; a 4 s step after 20 s. The longest recent duration already contains
  the slow tail of a healthy run (GC, a checkpoint elsewhere), and 5x that is beyond any of it.
- a phase not yet calibrated (the first checkpoint save, the first steps after a restart) once
  another phase is: ``max(uncalibrated_floor = 30 s, 20 x the longest duration of any phase)``.
- ``collective`` (a rank waiting for its peers): ``collective_grace`` (2) x the above, so a peer
  stuck in its own step is caught and killed first and the waiting ranks see it die instead.
- time between phases (``other``): like the longest calibrated phase, ``max(floor, factor * it)``.
- before the first record of a worker (imports, rendezvous, first checkpoint load):
  ``startup = 300 s``; after the training loop (``exit``, written at interpreter exit): uncalibrated. Calibration is kept per local rank across restarts of the worker.

On a hang the monitor sends ``SIGUSR1``, on which the worker's ``faulthandler`` (registered by
:meth:`Heartbeat.from_env`) writes every thread's Python stack from a C signal handler, GIL or not;
it waits up to ``dump_grace`` (1 s) for the dump, adds the kernel's view (``/proc/<pid>/status``
state and wait channel: a SIGSTOPped process cannot dump), then SIGKILLs the worker. NCCL's flight
recorder is enabled by the launcher through torch's environment variables
(``TORCH_NCCL_TRACE_BUFFER_SIZE``, ``TORCH_NCCL_DUMP_ON_TIMEOUT``, ``TORCH_FR_DUMP_TEMP_FILE``).
"""

from __future__ import annotations

import atexit
import faulthandler
import json
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from streamshard.errors import ConfigError

ENV_DIR = "STREAMSHARD_HEARTBEAT_DIR"
RECORD_SIZE = 1024  # fixed: one pwrite replaces the whole record
DUMP_SIGNAL = signal.SIGUSR1
_RECENT = 50
_WARMUP = 2


@dataclass(frozen=True)
class HeartbeatConfig:
    factor: float = 5.0
    floor: float = 3.0
    min_samples: int = 3
    uncalibrated_factor: float = 20.0
    uncalibrated_floor: float = 30.0
    startup: float = 300.0
    poll: float = 0.1
    dump_grace: float = 1.0
    collective_grace: float = 2.0

    def __post_init__(self) -> None:
        for name in ("factor", "uncalibrated_factor"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("floor", "uncalibrated_floor", "startup", "poll"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.min_samples < 1 or self.dump_grace < 0:
            raise ConfigError(f"need min_samples >= 1 and dump_grace >= 0, got {self.min_samples}, {self.dump_grace}")


# ---- worker side ------------------------------------------------------------------------------


class Heartbeat:
    """Writer of one worker's heartbeat file. ``with hb.phase("step"): ...``; ``hb.step = n`` to
    label records. Not thread-safe (call from the training thread). ``Heartbeat(None)`` is a no-op."""

    def __init__(self, path: str | None, *, clock: Callable[[], float] = time.monotonic):
        self.path = path
        self.step = 0
        self._clock = clock
        self._seq = 0
        self._n: dict[str, int] = {}
        self._recent: dict[str, deque] = {}
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644) if path else None
        self._phase, self._since = "start", clock()
        self._write()

    @classmethod
    def from_env(cls, env=os.environ) -> Heartbeat:
        """The heartbeat ``streamshard launch`` asked for (``$STREAMSHARD_HEARTBEAT_DIR``), with a
        faulthandler stack dump on SIGUSR1 into ``<dir>/stacks-local<r>-pid<p>.txt``; a no-op
        heartbeat when not launched that way."""
        d = env.get(ENV_DIR)
        if not d:
            return cls(None)
        local = int(env.get("LOCAL_RANK", "0"))
        install_stack_dump(os.path.join(d, f"stacks-local{local}-pid{os.getpid()}.txt"))
        hb = cls(os.path.join(d, f"local{local}.hb"))
        atexit.register(hb.enter, "exit")  # interpreter shutdown (GC, thread joins) is not a step
        return hb

    def _write(self) -> None:
        if self._fd is None:
            return
        self._seq += 1
        rec = {"seq": self._seq, "pid": os.getpid(), "step": self.step, "phase": self._phase, "since": self._since,
               "n": self._n, "max": {p: max(d) for p, d in self._recent.items()}}
        data = json.dumps(rec, separators=(",", ":")).encode()
        if len(data) > RECORD_SIZE:
            raise ConfigError(f"heartbeat record over {RECORD_SIZE} bytes (too many phase names): {data[:80]!r}")
        os.pwrite(self._fd, data.ljust(RECORD_SIZE, b" "), 0)

    def enter(self, name: str) -> None:
        now = self._clock()
        prev, took = self._phase, now - self._since
        if prev != "start":
            self._n[prev] = self._n.get(prev, 0) + 1
            if self._n[prev] > _WARMUP:  # the first runs of a phase compile, fill caches, wait for peers
                self._recent.setdefault(prev, deque(maxlen=_RECENT)).append(took)
        self._phase, self._since = name, now
        self._write()

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time a phase; nested phases return to the enclosing one on exit."""
        outer = self._phase if self._phase not in ("start", "other") else "other"
        self.enter(name)
        try:
            yield
        finally:
            self.enter(outer)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


_dump_files: list = []  # faulthandler writes to the descriptor; keep the file objects alive


def install_stack_dump(path: str, signum: int = DUMP_SIGNAL) -> None:
    """On ``signum``, write every thread's stack to ``path`` from a C signal handler (works while a
    C call holds the GIL)."""
    f = open(path, "w")
    _dump_files.append(f)
    faulthandler.register(signum, file=f, all_threads=True, chain=False)


# ---- monitor side -----------------------------------------------------------------------------


def read_record(path: str) -> dict | None:
    """The last complete record, or None (no file yet, or a read that raced a write)."""
    try:
        with open(path, "rb") as f:
            raw = f.read(RECORD_SIZE)
        rec = json.loads(raw)
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) and {"seq", "phase", "since", "n", "max"} <= rec.keys() else None


def timeout_for(cfg: HeartbeatConfig, rec: dict | None, history: dict[str, float]) -> float:
    """Timeout of the phase ``rec`` is in, from ``history`` (phase -> longest recent duration of
    calibrated phases, kept by the monitor across restarts)."""
    if rec is None or (rec["phase"] == "start" and not history):
        return cfg.startup
    phase = rec["phase"]
    if phase == "other" and history:  # code between phases: bounded like the longest phase
        return max(cfg.floor, cfg.factor * max(history.values()))
    if phase in history:
        t = max(cfg.floor, cfg.factor * history[phase])
        # a rank waiting in a collective for a stuck peer is a symptom: give the stuck one time to be
        # caught first, so only the root cause is killed (and, in-process, the others survive)
        return t * cfg.collective_grace if phase == "collective" else t
    if history:
        return max(cfg.uncalibrated_floor, cfg.uncalibrated_factor * max(history.values()))
    return cfg.startup


@dataclass(frozen=True)
class Hang:
    key: str
    pid: int
    phase: str
    step: int
    elapsed: float
    timeout: float
    dump: str


class _Watched:
    def __init__(self, pid: int, path: str, dump: str):
        self.pid, self.path, self.dump = pid, path, dump
        self.started = None  # monitor clock when first polled (start-up timing)
        self.last: dict | None = None


class HeartbeatMonitor:
    """Polls heartbeat files of watched worker processes; kills a hung one after dumping its stacks.
    ``clock`` must be the workers' monotonic clock (``time.monotonic``: system-wide on Linux).
    ``on_hang(hang)`` runs in the monitor thread after the kill."""

    def __init__(self, cfg: HeartbeatConfig = HeartbeatConfig(), *, clock: Callable[[], float] = time.monotonic,
                 kill: Callable[[int, int], None] = os.kill, sleep: Callable[[float], None] = time.sleep,
                 on_hang: Callable[[Hang], None] | None = None):
        self.cfg = cfg
        self._clock, self._kill, self._sleep, self._on_hang = clock, kill, sleep, on_hang
        self._lock = threading.Lock()
        self._watched: dict[str, _Watched] = {}
        self.history: dict[str, dict[str, float]] = {}  # key -> phase -> longest recent duration
        self.hangs: list[Hang] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def watch(self, key: str, pid: int, path: str, dump: str) -> None:
        with self._lock:
            self._watched[key] = _Watched(pid, path, dump)

    def unwatch_all(self) -> None:
        with self._lock:
            self._watched.clear()

    def timeout(self, key: str) -> float:
        w = self._watched.get(key)
        return timeout_for(self.cfg, w.last if w else None, self.history.get(key, {}))

    def check(self) -> list[Hang]:
        """One poll over all watched workers; returns the hangs it acted on."""
        with self._lock:
            items = list(self._watched.items())
        fired = []
        now = self._clock()
        for key, w in items:
            rec = read_record(w.path)
            if rec is not None and rec.get("pid") == w.pid:
                w.last = rec
                hist = self.history.setdefault(key, {})
                for phase, n in rec["n"].items():
                    if n >= self.cfg.min_samples + _WARMUP and phase in rec["max"]:
                        hist[phase] = float(rec["max"][phase])
            if w.started is None:
                w.started = now
            since = w.last["since"] if w.last is not None else w.started
            timeout = self.timeout(key)
            if now - since > timeout:
                with self._lock:
                    if self._watched.get(key) is not w:
                        continue
                    del self._watched[key]
                fired.append(self._fire(key, w, now - since, timeout))
        return fired

    def _fire(self, key: str, w: _Watched, elapsed: float, timeout: float) -> Hang:
        rec = w.last or {"phase": "start", "step": -1}
        hang = Hang(key, w.pid, rec["phase"], int(rec.get("step", -1)), elapsed, timeout, w.dump)
        size0 = _size(w.dump)
        try:
            self._kill(w.pid, DUMP_SIGNAL)
            for _ in range(int(self.cfg.dump_grace / 0.02)):  # bounded: dump_grace at most
                if _size(w.dump) != size0:
                    break
                self._sleep(0.02)
            self._sleep(0.05)  # let the handler finish the other threads
        except ProcessLookupError:
            pass
        with open(w.dump, "a") as f:
            f.write(f"\n--- streamshard heartbeat monitor ---\nphase {hang.phase!r} step {hang.step}: no "
                    f"heartbeat for {elapsed:.2f} s, timeout {timeout:.2f} s; pid {w.pid}\n{_proc_view(w.pid)}")
        try:
            self._kill(w.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.hangs.append(hang)
        if self._on_hang is not None:
            self._on_hang(hang)
        return hang

    def _run(self) -> None:
        while not self._stop.wait(self.cfg.poll):
            self.check()

    def start(self) -> HeartbeatMonitor:
        self._thread = threading.Thread(target=self._run, name="streamshard-heartbeat", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return -1


def _proc_view(pid: int) -> str:
    """State and wait channel from /proc (a stopped process cannot dump its own stacks)."""
    out = []
    for name in ("status", "wchan", "stack"):
        try:
            with open(f"/proc/{pid}/{name}") as f:
                text = f.read()
        except OSError:
            continue
        if name == "status":
            text = "".join(line + "\n" for line in text.splitlines() if line.startswith(("State:", "Threads:")))
        out.append(f"/proc/{pid}/{name}: {text.strip()}\n")
    return "".join(out)
