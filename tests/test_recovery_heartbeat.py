"""External heartbeat monitor: calibration (pure, injected clock) and real hung processes — a C call
that holds the GIL and a SIGSTOPped process — caught, stack-dumped and killed from outside."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from streamshard.errors import ConfigError
from streamshard.recovery.heartbeat import (
    ENV_DIR, Heartbeat, HeartbeatConfig, HeartbeatMonitor, read_record, timeout_for,
)

CFG = HeartbeatConfig()


def rec(phase, n=None, mx=None, since=0.0):
    return {"seq": 1, "pid": 1, "step": 0, "phase": phase, "since": since, "n": n or {}, "max": mx or {}}


# each row: record, calibrated history -> expected timeout with the DEFAULT config
TIMEOUTS = [
    (None, {}, 300.0),                                  # no record yet: start-up allowance
    (rec("start"), {}, 300.0),                          # first record, nothing measured
    (rec("step"), {}, 300.0),                           # first steps: nothing calibrated yet
    (rec("step"), {"step": 0.05}, 3.0),                 # a 50 ms step: the 3 s floor
    (rec("step"), {"step": 4.0}, 20.0),                 # a 4 s step: 5x its longest
    (rec("checkpoint_save"), {"step": 0.05}, 30.0),     # first save: uncalibrated floor
    (rec("checkpoint_save"), {"step": 2.0}, 40.0),      # ... or 20x the longest known phase
    (rec("other"), {"other": 1e-4, "step": 2.0}, 10.0), # between phases: like the longest phase
    (rec("collective"), {"collective": 0.01}, 6.0),     # waiting for peers: 2x, the stuck one goes first
    (rec("exit"), {"other": 1e-4, "step": 0.05}, 30.0), # interpreter shutdown: uncalibrated
]


@pytest.mark.parametrize("record,history,want", TIMEOUTS)
def test_default_timeouts(record, history, want):
    assert timeout_for(CFG, record, history) == pytest.approx(want)


def test_config_is_validated():
    with pytest.raises(ConfigError, match="floor must be positive"):
        HeartbeatConfig(floor=0)


class FakeClock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_calibrates_from_the_first_steps_then_fires(tmp_path):
    clock = FakeClock()
    hb = Heartbeat(str(tmp_path / "local0.hb"), clock=clock)
    kills = []
    mon = HeartbeatMonitor(CFG, clock=clock, kill=lambda pid, sig: kills.append(sig), sleep=lambda s: None)
    mon.watch("0", os.getpid(), hb.path, str(tmp_path / "dump.txt"))
    assert mon.check() == [] and mon.timeout("0") == 300.0
    for i in range(6):  # a 2 s first step (warm-up, not measured), then five 50 ms steps
        hb.step = i
        with hb.phase("step"):
            clock.t += 2.0 if i == 0 else 0.05
        mon.check()
        if i == 3:
            assert mon.history["0"] == {}  # 2 warm-up + 2 measured < min_samples: still start-up rules
    assert mon.history["0"] == {"step": pytest.approx(0.05), "other": 0.0}
    assert mon.timeout("0") == 3.0  # in "other" now: bounded like the step
    with hb.phase("step"):
        clock.t += 2.9
        assert mon.check() == []
        clock.t += 0.2  # 3.1 s in a phase whose timeout is 3 s
        (hang,) = mon.check()
    assert (hang.phase, hang.step, hang.timeout) == ("step", 5, 3.0)
    assert kills == [signal.SIGUSR1, signal.SIGKILL]
    assert "no heartbeat for 3.10 s" in (tmp_path / "dump.txt").read_text()
    assert mon.check() == []  # fired once, the worker is no longer watched


def test_nested_phase_returns_to_the_outer_one(tmp_path):
    hb = Heartbeat(str(tmp_path / "x.hb"))
    with hb.phase("step"):
        with hb.phase("collective"):
            assert read_record(hb.path)["phase"] == "collective"
        assert read_record(hb.path)["phase"] == "step"
    assert read_record(hb.path)["phase"] == "other"


def test_torn_or_foreign_records_are_ignored(tmp_path):
    p = tmp_path / "x.hb"
    p.write_bytes(b'{"seq": 1, "pha')
    assert read_record(str(p)) is None
    p.write_bytes(b"[1, 2]")
    assert read_record(str(p)) is None


def test_noop_without_the_launcher():
    hb = Heartbeat.from_env({})
    with hb.phase("step"):
        pass
    assert hb.path is None


CHILD = textwrap.dedent("""
    import ctypes, os, signal, sys, time
    from streamshard.recovery.heartbeat import Heartbeat
    hb = Heartbeat.from_env()
    for i in range(6):
        hb.step = i
        with hb.phase("data"):
            time.sleep(0.01)
        with hb.phase("step"):
            time.sleep(0.02)
    print("ready", flush=True)
    def stuck_in_c_with_the_gil():
        libc = ctypes.PyDLL(None)  # PyDLL: the GIL stays held during each call
        while True:  # a signal ends one sleep() early, as it would not end a real stuck C call
            libc.sleep(60)
    with hb.phase("step"):
        if sys.argv[1] == "gil":
            stuck_in_c_with_the_gil()
        else:
            os.kill(os.getpid(), signal.SIGSTOP)
    print("not reached", flush=True)
""")


@pytest.mark.parametrize("how", ["gil", "sigstop"])
def test_real_hung_process_is_dumped_and_killed(tmp_path, how):
    env = dict(os.environ, **{ENV_DIR: str(tmp_path), "LOCAL_RANK": "0"})
    proc = subprocess.Popen([sys.executable, "-c", CHILD, how], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "ready\n"
        hangs = []
        mon = HeartbeatMonitor(HeartbeatConfig(floor=0.5), on_hang=hangs.append)
        mon.watch("0", proc.pid, str(tmp_path / "local0.hb"), str(tmp_path / f"stacks-local0-pid{proc.pid}.txt"))
        mon.start()
        try:
            rc = proc.wait(timeout=30)  # bounded: the monitor must kill it long before
        finally:
            mon.stop()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert rc == -signal.SIGKILL
    (hang,) = hangs
    assert (hang.phase, hang.step, hang.timeout) == ("step", 5, 0.5)  # calibrated, not start-up
    dump = open(hang.dump).read()
    if how == "gil":  # faulthandler ran in the C signal handler although the GIL was held
        assert "stuck_in_c_with_the_gil" in dump and "Current thread" in dump
    else:  # a stopped process cannot dump: the kernel's view says why
        assert "State:\tT (stopped)" in dump
    assert "no heartbeat for" in dump and "not reached" not in proc.stdout.read()
