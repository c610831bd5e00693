"""In-process restart under `streamshard launch --in-process`: a SIGKILLed rank and a hung rank are
each replaced by one new process; the surviving rank keeps its interpreter (same pid), re-forms the
process group in the next round, reloads the newest checkpoint and continues; the group is never
restarted by the agent, and the consumed ids equal an uninterrupted run."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.test_recovery_integration import (  # noqa: F401 (data is a fixture)
    EXAMPLE, G, SEED, _env, assert_no_sample_twice, consumed, data, expected, ids_of, journal, ok,
)

pytestmark = pytest.mark.slow(reason="two ranks, two faults, three process starts: ~40 s on the dev box")


def test_kill_and_hang_cost_one_process_start_each(tmp_path, data):
    out = tmp_path / "inproc"
    cmd = [sys.executable, "-m", "streamshard.cli", "launch", "--standalone", "--nproc-per-node=2", "--in-process",
           f"--journal={out / 'journal'}", str(EXAMPLE), "--data", data, "--out", str(out), "--global-batch",
           str(G), "--seed", str(SEED), "--steps", "50"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240,
                          env=_env("kill@15:rank1,hang@32:rank0"))
    ok(proc)
    events = journal(out)
    assert sum(e["event"] == "start_workers" for e in events) == 1  # the agent never restarted the group
    pids = {r: [e["pid"] for e in events if e["event"] == "start" and e["rank"] == r] for r in (0, 1)}
    # rank 1 died at 15 (new process), rank 0 hung at 32 (killed by its keeper, new process)
    assert len(set(pids[0])) == 2 and len(set(pids[1])) == 2, pids
    assert len(pids[0]) == 3 and len(pids[1]) == 3  # each rank: start, +1 round as survivor, +1 as new process
    restarts = [e for e in events if e["event"] == "inprocess_restart"]
    assert {e["rank"] for e in restarts} == {0, 1}  # each survived the other's fault
    (hang,) = [e for e in events if e["event"] == "hang"]
    assert hang["keeper"] and hang["worker_rank"] == 0 and 3.0 <= hang["timeout"] < 60.0  # calibrated, floor 3 s
    assert [e["exitcode"] for e in events if e["event"] == "respawn"] == [-9, -9]
    standby = [e for e in events if e["event"] == "standby"]  # every start was a fork of a warm zygote
    assert sorted(e["worker_rank"] for e in standby) == [0, 1] and all(e["warm"] for e in standby), standby
    run = consumed(out)
    assert ids_of(run) == expected(data, 50)
    assert_no_sample_twice(run)
