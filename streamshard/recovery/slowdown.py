"""Slowdown and straggler detection from step times (pure; the caller gathers the numbers).

- :class:`SlowdownDetector`: the job is slower than its own recent past. The median of the last
  ``recent`` (20) step times is compared with the median of the ``baseline`` (200) before them;
  ``ratio=1.5`` flags a sustained 50% slowdown (thermal throttling, a degraded NVLink, a noisy
  neighbour) while a single GC pause or checkpoint moves neither median.
- :class:`StragglerDetector`: one rank is slower than the others. Feed it, every few steps, the
  per-rank *busy* times (data + forward + backward, measured before the gradient all-reduce: after
  it every rank waits for the slowest and all step times are equal). Gathered by the caller with
  ``torch.distributed.all_gather_object`` on one float per rank. A rank whose median over the last
  ``window`` (10) reports exceeds ``ratio`` (1.3) x the median of all ranks' medians and by at least
  ``min_delta`` (10 ms) is a straggler. Calibration: no verdict before a full window (the baseline);
  ``min_delta`` then grows to ``noise_factor`` (3) x the median absolute spread of the ranks
  around the typical rank measured over that window, so a job whose ranks are naturally noisy is
  not flagged for noise. A rank named in ``persist`` (5) consecutive reports is *persistent*:
  ``streamshard launch --exclude-stragglers`` then drops its node at the next restart.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from streamshard.errors import ConfigError


def median(values: Sequence[float]) -> float:
    vals = sorted(values)
    n = len(vals)
    return vals[n // 2] if n % 2 else 0.5 * (vals[n // 2 - 1] + vals[n // 2])


@dataclass(frozen=True)
class SlowdownConfig:
    recent: int = 20
    baseline: int = 200
    ratio: float = 1.5

    def __post_init__(self) -> None:
        if self.recent < 1 or self.baseline < self.recent:
            raise ConfigError(f"need 1 <= recent <= baseline, got recent={self.recent} baseline={self.baseline}")
        if self.ratio <= 1:
            raise ConfigError(f"ratio must be > 1, got {self.ratio}")


@dataclass(frozen=True)
class Slowdown:
    slow: bool
    recent: float
    baseline: float

    @property
    def ratio(self) -> float:
        return self.recent / self.baseline if self.baseline > 0 else float("inf")


class SlowdownDetector:
    def __init__(self, cfg: SlowdownConfig = SlowdownConfig()):
        self.cfg = cfg
        self._times: deque[float] = deque(maxlen=cfg.recent + cfg.baseline)

    def observe(self, step_time: float) -> Slowdown:
        self._times.append(float(step_time))
        if len(self._times) < self.cfg.recent + self.cfg.recent:  # need some baseline first
            return Slowdown(False, float("nan"), float("nan"))
        times = list(self._times)
        recent, base = times[-self.cfg.recent:], times[:-self.cfg.recent]
        r, b = median(recent), median(base)
        return Slowdown(r > self.cfg.ratio * b, r, b)


@dataclass(frozen=True)
class StragglerConfig:
    window: int = 10
    ratio: float = 1.3
    min_delta: float = 0.010
    noise_factor: float = 3.0
    persist: int = 5

    def __post_init__(self) -> None:
        if self.window < 1 or self.persist < 1:
            raise ConfigError(f"window and persist must be >= 1, got {self.window} and {self.persist}")
        if self.ratio <= 1 or self.min_delta < 0:
            raise ConfigError(f"need ratio > 1 and min_delta >= 0, got {self.ratio} and {self.min_delta}")


@dataclass(frozen=True)
class Stragglers:
    ranks: tuple[int, ...]
    per_rank: tuple[float, ...]  # median busy time per rank over the window
    typical: float  # median over ranks
    persistent: tuple[int, ...] = ()  # named in ``persist`` consecutive reports


class StragglerDetector:
    def __init__(self, world_size: int, cfg: StragglerConfig = StragglerConfig()):
        if world_size < 1:
            raise ConfigError(f"world_size must be >= 1, got {world_size}")
        self.cfg = cfg
        self.world_size = world_size
        self._rows: deque[tuple[float, ...]] = deque(maxlen=cfg.window)
        self._streak = [0] * world_size

    def observe(self, times: Sequence[float]) -> Stragglers:
        if len(times) != self.world_size:
            raise ConfigError(f"expected {self.world_size} per-rank times, got {len(times)}: {list(times)}")
        self._rows.append(tuple(float(t) for t in times))
        per_rank = tuple(median([row[r] for row in self._rows]) for r in range(self.world_size))
        typical = median(per_rank)
        if len(self._rows) < self.cfg.window or self.world_size < 2:
            return Stragglers((), per_rank, typical)
        # noise: how far a typical rank's single report strays from its own median (robust)
        noise = median([abs(row[r] - per_rank[r]) for row in self._rows for r in range(self.world_size)])
        delta = max(self.cfg.min_delta, self.cfg.noise_factor * noise)
        slow = tuple(r for r, t in enumerate(per_rank) if t > self.cfg.ratio * typical and t - typical >= delta)
        self._streak = [s + 1 if r in slow else 0 for r, s in enumerate(self._streak)]
        persistent = tuple(r for r, s in enumerate(self._streak) if s >= self.cfg.persist)
        return Stragglers(slow, per_rank, typical, persistent)
