"""Hang watchdog: calibration with a fake clock, and a real blocked subprocess it must kill."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest

from streamshard.errors import ConfigError
from streamshard.recovery import exitcodes
from streamshard.recovery.watchdog import PhaseTimer, Watchdog, WatchdogConfig


class FakeClock:  # a clock the test advances by hand
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_timeouts_calibrate_from_p99_with_a_floor():
    t = PhaseTimer(WatchdogConfig.uniform(2.0, factor=10.0, initial=600.0, min_samples=5))
    assert t.timeout("step") == 600.0  # uncalibrated
    for d in [0.1] * 99 + [0.5]:
        t.record("step", d)
    assert t.timeout("step") == pytest.approx(5.0)  # 10 x p99 (0.5 s)
    for _ in range(10):
        t.record("data", 0.001)
    assert t.timeout("data") == 2.0  # 10 x 1 ms is under the floor
    assert t.timeout("checkpoint_save") == 600.0  # phases calibrate separately


def test_watchdog_fires_only_past_the_timeout(tmp_path):
    clock, exits, hangs = FakeClock(), [], []
    wd = Watchdog(WatchdogConfig.uniform(1.0, factor=3.0, min_samples=2), str(tmp_path / "dump.txt"),
                  clock=clock, exit=exits.append, on_hang=lambda *a: hangs.append(a))
    for _ in range(3):
        with wd.phase("step"):
            clock.now += 0.5
    assert wd.timer.timeout("step") == pytest.approx(1.5)
    with wd.phase("step"):
        clock.now += 1.4
        assert wd.check() is False and exits == []
        clock.now += 0.2
        assert wd.check() is True
    assert exits == [exitcodes.HANG] and hangs[0][0] == "step" and hangs[0][2] == pytest.approx(1.5)
    assert "test_watchdog_fires_only_past_the_timeout" in (tmp_path / "dump.txt").read_text()
    assert wd.check() is False  # fires once


def test_config_validation():
    with pytest.raises(ConfigError, match="floor"):
        WatchdogConfig(floor={"step": 1.0})
    with pytest.raises(ConfigError, match="phase must be one of"):
        with Watchdog(WatchdogConfig(), "/dev/null").phase("lunch"):
            pass


BLOCKED = textwrap.dedent("""
    import sys, threading, time
    from streamshard.recovery.watchdog import Watchdog, WatchdogConfig
    wd = Watchdog(WatchdogConfig.uniform(0.5, factor=5.0, min_samples=3, poll=0.05), sys.argv[1]).start()
    for _ in range(5):
        with wd.phase("data"):
            time.sleep(0.01)
    def wait_for_a_batch_that_never_comes():
        threading.Event().wait(60)   # bounded: the test would fail rather than hang forever
    with wd.phase("data"):
        print("blocking", flush=True)
        wait_for_a_batch_that_never_comes()
    sys.exit(0)
""")


def test_watchdog_kills_a_really_blocked_process(tmp_path):
    dump = tmp_path / "stacks.txt"
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.Popen([sys.executable, "-c", BLOCKED, str(dump)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "blocking"
        t0 = time.monotonic()
        rc = proc.wait(timeout=30)
        elapsed = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert rc == exitcodes.HANG
    assert elapsed < 0.5 + 1.5  # timeout max(0.5, 5 x 10 ms) = 0.5 s, plus polling and exit
    text = dump.read_text()
    assert "phase 'data'" in text and "wait_for_a_batch_that_never_comes" in text
