"""Detectors on synthetic streams: spike, NaN/Inf, persistence, slowdown, straggler (pure, fast)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from streamshard.errors import ConfigError
from streamshard.recovery.detectors import (
    PersistenceConfig, PersistenceCounter, SpikeConfig, SpikeDetector, robust_z, spike_score,
)
from streamshard.recovery.slowdown import (
    SlowdownConfig, SlowdownDetector, StragglerConfig, StragglerDetector,
)


def noisy_decay(n: int, seed: int = 0) -> list[float]:
    """A training-like loss: exponential decay to 2.0 plus 2% multiplicative noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    return list((2.0 + 3.0 * np.exp(-t / 300)) * (1 + 0.02 * rng.standard_normal(n)))


CFG = SpikeConfig(window=64, threshold=6.0, min_samples=16)

# (name, stream, index of the probe value in the stream, expected reason)
SPIKE_TABLE = [
    # a clean decaying loss: nothing is flagged anywhere
    ("clean", noisy_decay(400), None, None),
    # x3 spike after warm-up: far beyond 6 robust sigmas of 2% noise
    ("spike_x3", noisy_decay(200)[:150] + [3 * noisy_decay(200)[150]], 150, "spike"),
    # x1.5 during the steep early decay: the trend inflates the MAD, still ~9 robust sigmas
    ("spike_x1.5_steep", noisy_decay(200)[:150] + [1.5 * noisy_decay(200)[150]], 150, "spike"),
    # x1.2 in the same place is within trend + noise (z ~ 3.5): a known blind spot, not flagged
    ("bump_x1.2_steep", noisy_decay(200)[:150] + [1.2 * noisy_decay(200)[150]], 150, "ok"),
    # x1.2 once the loss has flattened (step 1500) is ~10 sigmas of 2% noise
    ("spike_x1.2_flat", noisy_decay(1600)[:1500] + [1.2 * noisy_decay(1600)[1500]], 1500, "spike"),
    # a large *drop* is good news, never flagged (one-sided test)
    ("drop", noisy_decay(200)[:150] + [0.2], 150, "ok"),
    # NaN is flagged even during warm-up (index 2 < min_samples)
    ("nan_warmup", [1.0, 1.1, math.nan], 2, "nonfinite"),
    # +Inf after warm-up
    ("inf", noisy_decay(100)[:60] + [math.inf], 60, "nonfinite"),
    # -Inf is non-finite as well
    ("neg_inf", noisy_decay(100)[:60] + [-math.inf], 60, "nonfinite"),
    # a huge value during warm-up (index 5 < min_samples) is not judged yet
    ("spike_in_warmup", [1.0] * 5 + [100.0], 5, "warmup"),
    # constant stream: MAD = 0, the relative floor (0.1% of level) still flags a +50% jump
    ("constant_then_jump", [2.0] * 40 + [3.0], 40, "spike"),
    # constant stream: a +0.1% wiggle is within the floor x threshold (6 x 0.1% = 0.6%)
    ("constant_then_wiggle", [2.0] * 40 + [2.002], 40, "ok"),
]


@pytest.mark.parametrize("name, stream, probe, reason", SPIKE_TABLE, ids=[r[0] for r in SPIKE_TABLE])
def test_spike_detector_table(name, stream, probe, reason):
    det = SpikeDetector(CFG)
    verdicts = [det.observe(x) for x in stream]
    if probe is None:
        assert not any(v.anomalous for v in verdicts), [(i, v) for i, v in enumerate(verdicts) if v.anomalous]
        return
    assert verdicts[probe].reason == reason
    assert verdicts[probe].anomalous == (reason in ("spike", "nonfinite"))
    assert not any(v.anomalous for v in verdicts[:probe])


def test_anomalies_do_not_enter_the_window():
    det = SpikeDetector(CFG)
    for x in noisy_decay(100):
        det.observe(x)
    # a persistent plateau at x5 stays flagged: it never becomes the baseline
    assert all(det.observe(10.0).reason == "spike" for _ in range(200))


def test_robust_z_ignores_the_outliers_it_looks_for():
    vals = [1.0] * 50 + [1.01] * 50 + [1000.0] * 3  # a few huge outliers in the window
    z = robust_z(1.2, vals, CFG)  # (1.2 - 1.01) / (1.4826 * 0.01) = 12.8
    assert 5 < z < 20  # a mean/std z-score would be ~0 here


def test_state_round_trip():
    a = SpikeDetector(CFG)
    for x in noisy_decay(80):
        a.observe(x)
    b = SpikeDetector(CFG)
    b.load_state_dict(a.state_dict())
    probe = noisy_decay(81)[80] * 1.5
    assert a.observe(probe) == b.observe(probe)
    with pytest.raises(ConfigError, match="window"):
        b.load_state_dict({"window": "nope"})


def heavy_tailed_healthy(n: int = 3000, seed: int = 0) -> list[float]:
    """A healthy loss shaped like the example GPT's in bench_recovery (issue 11): decays to 0.05,
    Student-t (df 6) multiplicative minibatch noise of scale 0.12 in log, and natural bumps every
    ~250 steps that ramp up over 6-20 steps to x1.5..x4 and come back within 5-40 steps."""
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    log_loss = np.log(0.05 + 4.0 * np.exp(-t / 150)) + 0.12 * rng.standard_t(6, n)
    i = 200
    while i < n:
        i += int(rng.geometric(1 / 250))
        up, down, peak = int(rng.integers(6, 20)), int(rng.integers(5, 40)), math.log(rng.uniform(1.5, 4))
        bump = np.concatenate([np.linspace(0, peak, up + 1)[1:], np.linspace(peak, 0, down + 1)[1:]])
        log_loss[i:i + len(bump)] += bump[: max(0, n - i)]
        i += len(bump)
    return list(np.exp(log_loss))


OLD_RULE = SpikeConfig(log_scale=False, tail_factor=0.0)  # linear robust z only (before issue 11's fix)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_heavy_tailed_healthy_stream_is_not_flagged_at_defaults(seed):
    stream = heavy_tailed_healthy(seed=seed)
    det = SpikeDetector()  # library defaults
    flagged = [(i, round(x, 3)) for i, x in enumerate(stream) if det.observe(x).anomalous]
    assert flagged == []
    # the linear robust z alone rolls such a stream back again and again (the bug this guards)
    old = SpikeDetector(OLD_RULE)
    assert sum(old.observe(x).anomalous for x in stream) > 40


def test_injected_spike_in_heavy_tailed_stream_is_caught_and_persistent():
    stream = heavy_tailed_healthy(seed=0)
    det, counter = SpikeDetector(), PersistenceCounter()
    for x in stream[:2500]:
        det.observe(x)
    # bench_recovery's spike: the loss x50 for three data steps -> three flags -> persistent
    verdicts = [det.observe(50 * x) for x in stream[2500:2503]]
    assert [v.reason for v in verdicts] == ["spike"] * 3
    assert [counter.observe(i, v.anomalous) for i, v in enumerate(verdicts)] == [False, False, True]
    assert det.observe(math.nan).reason == "nonfinite"
    assert det.observe(stream[2503]).reason == "ok"  # the spikes did not enter the window


@pytest.mark.parametrize("factor", [1.5, 3.0, 10.0])
def test_divergence_spikes_x1_5_to_x10_caught_on_a_low_noise_loss(factor):
    stream = noisy_decay(1600)  # 2% noise, as an LLM loss
    det = SpikeDetector()
    assert not any(det.observe(x).anomalous for x in stream[:1500])
    assert det.observe(factor * stream[1500]).reason == "spike"


def test_tail_condition_needs_a_rise_beyond_the_windows_own_tail():
    window = [1.0] * 100 + [1.01] * 27 + [2.0]  # a healthy x2 step in the window
    cfg = SpikeConfig()
    assert spike_score(2.0, window, cfg)[1] > cfg.threshold  # far out in robust sigmas...
    assert not spike_score(2.0, window, cfg)[0]  # ...but no further than the window's own tail
    assert not spike_score(2.0 ** 2.4, window, cfg)[0]
    assert spike_score(2.0 ** 2.6, window, cfg)[0]  # beyond tail_factor (2.5) x the largest log rise
    assert spike_score(2.0, window, SpikeConfig(tail_factor=0.0))[0]


def test_a_large_healthy_excursion_does_not_blind_the_detector_to_a_x50_spike():
    # Run E of issue 11: the window held a x6 healthy bump, so the tail bar alone asked for
    # x6^2.5 ~ x88 and the injected x50 spike passed; the cap (x30) keeps it catchable.
    window = [0.05] * 100 + [0.3] * 28
    cfg = SpikeConfig()
    assert not spike_score(0.3 * 1.5, window, cfg)[0]  # healthy-sized rises stay unflagged
    assert not spike_score(0.05 * 25, window, cfg)[0]  # x25: under the cap and the tail bar
    assert spike_score(0.05 * 50, window, cfg)[0]
    assert not spike_score(0.05 * 50, window, SpikeConfig(tail_cap=math.inf))[0]  # the old hole


def test_non_positive_values_fall_back_to_the_linear_scale():
    cfg = SpikeConfig(tail_factor=0.0)
    window = [-1.0, 0.0, 1.0] * 10
    spike, z = spike_score(20.0, window, cfg)
    assert spike and z == pytest.approx(robust_z(20.0, window, cfg))
    assert not spike_score(-5.0, window, cfg)[0]


@pytest.mark.parametrize("kwargs, match", [
    ({"tail_factor": -1.0}, "tail_factor"),
    ({"tail_factor": math.inf}, "tail_factor"),
    ({"tail_cap": 1.0}, "tail_cap"),
    ({"window": 2}, "window must be >= 3"),
    ({"min_samples": 1}, "min_samples"),
    ({"threshold": 0}, "threshold must be positive"),
])
def test_spike_config_validation(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        SpikeConfig(**kwargs)


# (name, anomaly pattern, expected persistent flags)
PERSIST_TABLE = [
    # isolated anomalies never become persistent
    ("isolated", [1, 0, 1, 0, 1], [0, 0, 0, 0, 0]),
    # two in a row, then a clean step resets the run
    ("two_then_reset", [1, 1, 0, 1, 1], [0, 0, 0, 0, 0]),
    # the third in a row is persistent, and so is every further one
    ("three_in_a_row", [1, 1, 1, 1], [0, 0, 1, 1]),
]


@pytest.mark.parametrize("name, pattern, expect", PERSIST_TABLE, ids=[r[0] for r in PERSIST_TABLE])
def test_persistence_table(name, pattern, expect):
    c = PersistenceCounter(PersistenceConfig(3))
    got = [int(c.observe(i, bool(p))) for i, p in enumerate(pattern)]
    assert got == expect


def test_persistence_remembers_first_step():
    c = PersistenceCounter(PersistenceConfig(3))
    for step, bad in [(10, False), (11, True), (12, True), (13, True)]:
        c.observe(step, bad)
    assert c.first == 11 and c.count == 3


# (name, step times, expect slow at the end)
SLOW_TABLE = [
    # steady 100 ms steps
    ("steady", [0.1] * 300, False),
    # one 5 s pause (GC, checkpoint) moves no median
    ("one_pause", [0.1] * 150 + [5.0] + [0.1] * 30, False),
    # the last 20 steps at 2x: a sustained slowdown
    ("sustained_2x", [0.1] * 200 + [0.2] * 20, True),
    # 1.3x is below the 1.5 ratio
    ("mild_1.3x", [0.1] * 200 + [0.13] * 20, False),
    # too little history to judge
    ("short", [0.1] * 10 + [1.0] * 10, False),
]


@pytest.mark.parametrize("name, times, expect", SLOW_TABLE, ids=[r[0] for r in SLOW_TABLE])
def test_slowdown_table(name, times, expect):
    det = SlowdownDetector(SlowdownConfig(recent=20, baseline=200, ratio=1.5))
    result = [det.observe(t) for t in times][-1]
    assert result.slow == expect


# (name, world, rows of per-rank busy times, expected stragglers)
STRAGGLER_TABLE = [
    # 8 equal ranks
    ("equal", 8, [[0.1] * 8] * 10, ()),
    # rank 5 at 2x for the whole window is named
    ("rank5_slow", 8, [[0.1] * 5 + [0.2] + [0.1] * 2] * 10, (5,)),
    # a single slow report inside the window: the median ignores it
    ("one_blip", 4, [[0.1, 0.1, 0.1, 0.1]] * 9 + [[0.1, 0.9, 0.1, 0.1]], ()),
    # 2x but only 5 ms slower: under min_delta (10 ms), noise on tiny steps
    ("tiny_steps", 4, [[0.005, 0.005, 0.01, 0.005]] * 10, ()),
    # two ranks: the slow one is named (median of 2 is their mean)
    ("two_ranks", 2, [[0.05, 0.2]] * 10, (1,)),
    # a window not yet full: no verdict
    ("not_full", 4, [[0.1, 0.1, 0.5, 0.1]] * 3, ()),
    # noisy ranks (+-80 ms per report) and rank 2 50 ms slower on median: within the measured noise
    ("noisy", 4, [[0.2, 0.28, 0.25, 0.12], [0.2, 0.12, 0.25, 0.28]] * 5, ()),
]


@pytest.mark.parametrize("name, world, rows, expect", STRAGGLER_TABLE, ids=[r[0] for r in STRAGGLER_TABLE])
def test_straggler_table(name, world, rows, expect):
    det = StragglerDetector(world, StragglerConfig(window=10, ratio=1.3, min_delta=0.01))
    result = [det.observe(r) for r in rows][-1]
    assert result.ranks == expect


def test_persistent_straggler_after_persist_reports():
    det = StragglerDetector(4, StragglerConfig(window=3, persist=4))
    rows = [[0.1, 0.1, 0.1, 0.3]] * 6
    results = [det.observe(r) for r in rows]
    assert [r.ranks for r in results] == [(), (), (3,), (3,), (3,), (3,)]
    assert [r.persistent for r in results] == [(), (), (), (), (), (3,)]
    assert det.observe([0.1, 0.1, 0.1, 0.1]).persistent == (3,)  # the median still says slow
    for _ in range(3):
        last = det.observe([0.1, 0.1, 0.1, 0.1])
    assert last.ranks == () and last.persistent == ()  # recovered: the streak resets


def test_straggler_wrong_length():
    with pytest.raises(ConfigError, match="expected 4 per-rank times"):
        StragglerDetector(4).observe([0.1, 0.2])
