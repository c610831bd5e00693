"""Hang watchdog: a daemon thread that times named phases and kills a stuck process.

Phases: ``data`` (waiting for a batch), ``step`` (forward/backward/optimizer, collectives
included), ``checkpoint_save``, ``checkpoint_load``. The timeout of a phase calibrates itself:

    timeout = max(floor, factor * p99(last ``history`` durations of that phase))

and is ``initial`` until ``min_samples`` durations are seen (first steps compile, warm caches,
wait for all ranks). Defaults and why:

- ``factor=10``: p99 already covers the slow tail of a healthy run (GC pauses, a checkpoint on
  another rank); 10x that is slow beyond anything but a hang or a dying node.
- ``floor=60 s`` per phase (``checkpoint_*`` 300 s): short phases (a 50 ms step) would otherwise
  get sub-second timeouts that a page fault storm or NFS hiccup can exceed.
- ``initial=600 s``: torch's default collective timeout for NCCL is 10 min
  (``torch.distributed.constants.default_pg_nccl_timeout``); the watchdog must not be the first to
  give up on a slow start, yet must fire before gloo's 30 min default.

On expiry it writes all thread stacks (``faulthandler.dump_traceback``, plus the phase and the
timeout) to ``dump_path``, calls ``on_hang`` (e.g. journal), and exits with
``exitcodes.HANG`` through the injected ``exit`` (``os._exit``: a hung main thread cannot be asked
to unwind, and ``sys.exit`` from a thread only ends that thread).
"""

from __future__ import annotations

import faulthandler
import os
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import MappingProxyType

from streamshard.errors import ConfigError
from streamshard.recovery import exitcodes

PHASES = ("data", "step", "checkpoint_save", "checkpoint_load")


@dataclass(frozen=True)
class WatchdogConfig:
    factor: float = 10.0
    floor: dict = field(default_factory=lambda: {"data": 60.0, "step": 60.0,
                                                  "checkpoint_save": 300.0, "checkpoint_load": 300.0})
    initial: float = 600.0
    min_samples: int = 5
    history: int = 200
    poll: float = 0.25

    def __post_init__(self) -> None:
        if self.factor < 1:
            raise ConfigError(f"factor must be >= 1, got {self.factor}")
        if set(self.floor) != set(PHASES) or any(v <= 0 for v in self.floor.values()):
            raise ConfigError(f"floor must give a positive value for each of {PHASES}, got {self.floor}")
        object.__setattr__(self, "floor", MappingProxyType(dict(self.floor)))  # frozen means frozen
        if self.initial <= 0 or self.poll <= 0:
            raise ConfigError(f"initial and poll must be positive, got {self.initial} and {self.poll}")
        if self.min_samples < 1 or self.history < self.min_samples:
            raise ConfigError(
                f"need 1 <= min_samples <= history, got min_samples={self.min_samples} history={self.history}"
            )

    @classmethod
    def uniform(cls, floor: float, **kw) -> WatchdogConfig:
        return cls(floor={p: floor for p in PHASES}, **kw)


def p99(values) -> float:
    vals = sorted(values)
    return vals[min(len(vals) - 1, int(0.99 * len(vals)))]


class PhaseTimer:
    """The calibration, without threads (pure; the clock is the caller's)."""

    def __init__(self, cfg: WatchdogConfig):
        self.cfg = cfg
        self._durations = {p: deque(maxlen=cfg.history) for p in PHASES}

    def record(self, phase: str, seconds: float) -> None:
        self._durations[phase].append(seconds)

    def timeout(self, phase: str) -> float:
        d = self._durations[phase]
        if len(d) < self.cfg.min_samples:
            return self.cfg.initial
        return max(self.cfg.floor[phase], self.cfg.factor * p99(d))


def dump_stacks(path: str, header: str) -> None:
    """Write every thread's stack to ``path`` (faulthandler first: it works even with the GIL held
    by a stuck C call; then Python's view with thread names)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(header + "\n\n--- faulthandler ---\n")
        f.flush()
        faulthandler.dump_traceback(file=f, all_threads=True)
        f.write("\n--- sys._current_frames ---\n")
        names = {t.ident: t.name for t in threading.enumerate()}
        for ident, frame in sys._current_frames().items():
            f.write(f"\nThread {names.get(ident, '?')} ({ident}):\n")
            f.write("".join(traceback.format_stack(frame)))
        f.flush()
        os.fsync(f.fileno())


class Watchdog:
    """``with wd.phase("step"): ...`` in the training loop; ``start()`` once, ``stop()`` at the end.

    ``clock`` (monotonic seconds), ``exit`` and ``on_hang(phase, elapsed, timeout)`` are injected.
    """

    def __init__(self, cfg: WatchdogConfig, dump_path: str, *,
                 clock: Callable[[], float] = time.monotonic,
                 exit: Callable[[int], None] = os._exit,
                 on_hang: Callable[[str, float, float], None] | None = None):
        self.cfg = cfg
        self.dump_path = dump_path
        self.timer = PhaseTimer(cfg)
        self._clock, self._exit, self._on_hang = clock, exit, on_hang
        self._lock = threading.Lock()
        self._current: tuple[str, float, float] | None = None  # phase, started, timeout
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.fired: tuple[str, float, float] | None = None

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if name not in PHASES:
            raise ConfigError(f"phase must be one of {PHASES}, got {name!r}")
        start = self._clock()
        with self._lock:
            self._current = (name, start, self.timer.timeout(name))
        try:
            yield
        finally:
            with self._lock:
                self._current = None
            self.timer.record(name, self._clock() - start)

    def check(self) -> bool:
        """One poll: fire if the current phase ran past its timeout. Returns True if it fired."""
        with self._lock:
            current = self._current
        if current is None or self.fired is not None:
            return False
        name, start, timeout = current
        elapsed = self._clock() - start
        if elapsed <= timeout:
            return False
        self.fired = (name, elapsed, timeout)
        dump_stacks(self.dump_path, f"streamshard watchdog: phase {name!r} ran {elapsed:.3f} s, "
                                    f"timeout {timeout:.3f} s, pid {os.getpid()}")
        if self._on_hang is not None:
            self._on_hang(name, elapsed, timeout)
        self._exit(exitcodes.HANG)
        return True

    def _run(self) -> None:
        while not self._stop.wait(self.cfg.poll):
            if self.check():
                return

    def start(self) -> Watchdog:
        self._thread = threading.Thread(target=self._run, name="streamshard-watchdog", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5 * self.cfg.poll)
