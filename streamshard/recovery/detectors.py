"""Pure anomaly detectors fed one metric value at a time.

Spike rule (robust z-score, Iglewicz & Hoaglin 1993, "How to Detect and Handle Outliers"), on the
log of the metric (``log_scale``), with a tail condition:

    y = log(x), w = log(window)
    z = (y - median(w)) / max(1.4826 * MAD(w), log1p(rel_floor), abs_floor)
    spike  iff  z > threshold  and
                y - median(w) > min(tail_factor * (max(w) - median(w)), log(tail_cap))

``1.4826 * MAD`` estimates the standard deviation of a normal stream while ignoring the outliers
themselves (a mean/std detector is dragged up by the very spike it should catch). Only upward
deviations count: a falling loss is good news.

Why the log and the tail condition (issue 11, measured): a loss and a gradient norm are positive
and their noise is multiplicative, with a heavy right tail. The example's tiny GPT (2 ranks,
global batch 8) trains down to a loss of ~0.05 whose minibatch values routinely rise x2..x7 above
the median for one to dozens of steps and come back by themselves. On the linear scale its MAD is
~10% of the level, so those healthy excursions sit 8..35 robust sigmas out: replaying the losses
of three 2-rank benchmark runs (3,500-7,800 steps) through the old rule flagged 210-539 healthy
steps at the defaults (window 128, threshold 6; the frozen window then locks onto a stale level
during a slow bump) and 11-15 with the example's old window 32 / threshold 8, i.e. 5 rollbacks
and ~15 skipped updates of innocent data in an 18.5-minute run. A normal-tail threshold cannot
fix that: the excursions are not rare events of a normal stream, the stream is heavy-tailed.

- The log makes the test scale-free (x1.5 is the same rise at a loss of 3 or of 0.05) and turns
  multiplicative noise into additive noise, which is what the MAD assumes.
- The tail condition calibrates the test on the stream's own recent tail: a spike must rise more
  than ``tail_factor`` times the largest rise above the median that the window holds (in log, so
  with ``tail_factor=2.5`` more than the 2.5th power of the largest recent ratio). A stream whose
  healthy steps reach x3 needs x15.6 to be flagged; a 2%-noise LLM loss (largest of 128 normal
  draws ~2.6 sigma, ratio ~x1.05) still flags x1.14 and above (which is also ~7 robust sigmas), so
  the x1.5..x10 divergence spikes of PaLM/OPT logs all qualify, and NaN/Inf are flagged
  unconditionally. Flagged values never enter the window, so a spike never raises the bar for the
  next one. On the same three replays the new defaults flag exactly the injected x50 spikes and no
  healthy step; ``tail_factor=2`` still let through three isolated healthy steps at x1.7..x2.3.
- ``log_scale`` applies only while the value and the whole window are positive; a metric that
  can be zero or negative is judged on the linear scale (with ``rel_floor * |median|``).

Defaults and why:

- ``window=128`` steps: the median/MAD of 128 samples have a relative standard error of about
  ``1.25/sqrt(128) ~ 11%`` (MAD ~ 1.65/sqrt(n) for normal data), so the threshold is stable, yet the
  window is short enough to follow the downward trend of a training loss (a few hundred steps in
  LLM runs move the loss by a few percent).
- ``threshold=6.0`` robust sigmas: Iglewicz & Hoaglin flag for *inspection* at 3.5; acting on a
  value (dropping an update) should be rarer. Minibatch losses are heavy-tailed, so a normal
  tail probability (1e-9 at 6 sigma) overstates the margin, but real divergence spikes (loss
  x1.5..x10 in PaLM/OPT logs) sit tens of robust sigmas out, so 6 loses none of them.
- ``tail_factor=2.5``: see above; 0 disables the tail condition (the plain robust z).
- ``tail_cap=30.0``: the tail bar never exceeds a rise of x30 over the median (log scale only).
  Without a cap a large healthy excursion in the window blinds the detector: in a 9,812-step
  benchmark run the window held a x6 healthy bump, the bar rose to x6^2.5 ~ x88, and the
  injected x50 spike (x420 over the median) passed unflagged. Replaying the losses of six
  benchmark runs (about 41,000 steps): cap x10 flags 66-133 healthy steps in two runs, x20 one
  healthy x21.9 step, x25-x40 exactly the injected spikes and nothing else.
- ``min_samples=16``: no verdict before the window holds enough values for a meaningful MAD
  (NaN/Inf are flagged from the first step).
- ``rel_floor=1e-3``: a MAD of ~0 (a constant stream) would make any wiggle a spike; 0.1% of the
  level is below any real spike.
- ``persist=3`` in a row makes a spike persistent (PaLM, Chowdhery et al. 2022, sec. 5.1 report
  spikes that last many steps; a single bad batch shows as one step).

Anomalous values are not added to the window, so a persistent spike never becomes the baseline.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from streamshard.errors import ConfigError

MAD_TO_SIGMA = 1.4826  # 1 / Phi^-1(3/4): MAD of a normal distribution is 0.6745 sigma


@dataclass(frozen=True)
class SpikeConfig:
    window: int = 128
    threshold: float = 6.0
    min_samples: int = 16
    rel_floor: float = 1e-3
    abs_floor: float = 1e-12
    log_scale: bool = True
    tail_factor: float = 2.5
    tail_cap: float = 30.0

    def __post_init__(self) -> None:
        if self.window < 3:
            raise ConfigError(f"window must be >= 3, got {self.window}")
        if not 2 <= self.min_samples <= self.window:
            raise ConfigError(f"min_samples must be in [2, window={self.window}], got {self.min_samples}")
        if not self.threshold > 0:
            raise ConfigError(f"threshold must be positive, got {self.threshold}")
        if self.rel_floor < 0 or self.abs_floor <= 0:
            raise ConfigError(
                f"rel_floor must be >= 0 and abs_floor > 0, got {self.rel_floor} and {self.abs_floor}"
            )
        if not self.tail_factor >= 0 or math.isinf(self.tail_factor):
            raise ConfigError(f"tail_factor must be finite and >= 0, got {self.tail_factor}")
        if not self.tail_cap > 1:
            raise ConfigError(f"tail_cap must be a ratio > 1 (inf: no cap), got {self.tail_cap}")


@dataclass(frozen=True)
class Verdict:
    """What one value looked like. ``z`` is NaN while warming up or for non-finite values."""

    anomalous: bool
    reason: str  # "ok", "warmup", "nonfinite", "spike"
    value: float
    z: float = math.nan


def is_nonfinite(x: float) -> bool:
    return math.isnan(x) or math.isinf(x)


def _median(sorted_vals: list[float]) -> float:
    n = len(sorted_vals)
    mid = n // 2
    return sorted_vals[mid] if n % 2 else 0.5 * (sorted_vals[mid - 1] + sorted_vals[mid])


def robust_z(x: float, values: Iterable[float], cfg: SpikeConfig) -> float:
    """Robust z-score of ``x`` against ``values`` on the linear scale (pure)."""
    vals = sorted(values)
    med = _median(vals)
    mad = _median(sorted(abs(v - med) for v in vals))
    scale = max(MAD_TO_SIGMA * mad, cfg.rel_floor * abs(med), cfg.abs_floor)
    return (x - med) / scale


def spike_score(x: float, values: Iterable[float], cfg: SpikeConfig) -> tuple[bool, float]:
    """(is it a spike, its robust z) for a finite ``x`` against ``values``, by the module's rule
    (log scale when ``cfg.log_scale`` and everything is positive; tail condition). Pure."""
    vals = [float(v) for v in values]
    log = cfg.log_scale and x > 0 and all(v > 0 for v in vals)
    if log:
        y, w = math.log(x), sorted(math.log(v) for v in vals)
        med = _median(w)
        mad = _median(sorted(abs(v - med) for v in w))
        z = (y - med) / max(MAD_TO_SIGMA * mad, math.log1p(cfg.rel_floor), cfg.abs_floor)
    else:
        y, w = x, sorted(vals)
        med = _median(w)
        z = robust_z(x, vals, cfg)
    bar = cfg.tail_factor * max(w[-1] - med, 0.0)
    if log:  # a rise beyond x tail_cap over the median clears any tail bar
        bar = min(bar, math.log(cfg.tail_cap))
    return z > cfg.threshold and (y - med) > bar, z


class SpikeDetector:
    """Rolling robust spike detector for one metric (loss or grad norm).

    Not thread-safe; state is a plain list of floats (``state_dict``) so it rides in a checkpoint.
    """

    def __init__(self, cfg: SpikeConfig = SpikeConfig()):
        self.cfg = cfg
        self._window: deque[float] = deque(maxlen=cfg.window)

    def observe(self, x: float) -> Verdict:
        x = float(x)
        if is_nonfinite(x):
            return Verdict(True, "nonfinite", x)
        if len(self._window) < self.cfg.min_samples:
            self._window.append(x)
            return Verdict(False, "warmup", x)
        spike, z = spike_score(x, self._window, self.cfg)
        if spike:
            return Verdict(True, "spike", x, z)
        self._window.append(x)
        return Verdict(False, "ok", x, z)

    def state_dict(self) -> dict:
        return {"window": list(self._window)}

    def load_state_dict(self, state: dict) -> None:
        values = state.get("window")
        if not isinstance(values, list) or not all(isinstance(v, (int, float)) for v in values):
            raise ConfigError(f"spike detector state must hold a list of numbers under 'window', got {state!r}")
        self._window = deque((float(v) for v in values), maxlen=self.cfg.window)


@dataclass(frozen=True)
class PersistenceConfig:
    persist: int = 3

    def __post_init__(self) -> None:
        if self.persist < 1:
            raise ConfigError(f"persist must be >= 1, got {self.persist}")


class PersistenceCounter:
    """Counts anomalous steps in a row; ``persistent`` once ``persist`` consecutive ones are seen.

    ``first`` is the first step of the current run of anomalies (None when the last step was fine).
    """

    def __init__(self, cfg: PersistenceConfig = PersistenceConfig()):
        self.cfg = cfg
        self.count = 0
        self.first: int | None = None

    def observe(self, step: int, anomalous: bool) -> bool:
        if not anomalous:
            self.count, self.first = 0, None
            return False
        if self.count == 0:
            self.first = step
        self.count += 1
        return self.count >= self.cfg.persist

    def reset(self) -> None:
        self.count, self.first = 0, None
