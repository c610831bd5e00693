"""Live effective training time: productive step seconds / wall seconds since the job began.

Wall time counts from the job's first journal record (the launcher's ``launch`` record, else the
first worker ``start``), so start-up, restarts, hang detection, checkpoint saves and loads are all
in the denominator. A step is productive once it is safe: its update was applied *and* a checkpoint
after it was saved (``commit``); steps since the last checkpoint are pending and are dropped by a
restart or a rollback (``discard``). The productive total travels in the checkpoint, so the figure
survives restarts. The live figure counts pending steps too (what it would be if no fault came).
"""

from __future__ import annotations

import time
from collections.abc import Callable


class EffectiveTime:
    def __init__(self, job_start: float, productive_s: float = 0.0, *, clock: Callable[[], float] = time.time):
        self.job_start = job_start
        self.productive_s = productive_s
        self.pending_s = 0.0
        self._clock = clock

    def step(self, seconds: float, applied: bool = True) -> None:
        if applied:
            self.pending_s += seconds

    def commit(self) -> None:
        """A checkpoint now holds every pending step."""
        self.productive_s += self.pending_s
        self.pending_s = 0.0

    def discard(self) -> None:
        """The pending steps were lost (rollback)."""
        self.pending_s = 0.0

    def wall_s(self) -> float:
        return max(1e-9, self._clock() - self.job_start)

    def fraction(self) -> float:
        """(committed + pending step seconds) / wall seconds."""
        return (self.productive_s + self.pending_s) / self.wall_s()

    def record(self) -> dict:
        return {"productive_s": round(self.productive_s, 4), "pending_s": round(self.pending_s, 4),
                "wall_s": round(self.wall_s(), 4), "effective": round(self.fraction(), 5)}


def job_start(journal, default: float) -> float:
    """Time of the job's first journal record (or ``default`` for a fresh journal)."""
    return min((float(r["time"]) for r in journal.records()), default=default)
