"""``streamshard launch --exclude-stragglers`` through the real agent: a rank that the straggler
detector names persistently slow makes its node leave (exit 77) at the next restart instead of being
restarted; and the restart budget's refill after a healthy stretch, on an injected clock."""

from __future__ import annotations

import subprocess
import sys

import pytest

from streamshard.recovery import exitcodes
from streamshard.recovery.launch import RestartBudget
from tests.test_recovery_integration import EXAMPLE, G, SEED, _env, data, journal  # noqa: F401 (data: fixture)


@pytest.mark.slow(reason="one real agent, two example workers, a kill: ~15 s on the 2-core box")
def test_persistently_slow_node_leaves_at_the_next_restart(tmp_path, data):
    out = tmp_path / "slow"
    cmd = [sys.executable, "-m", "streamshard.cli", "launch", "--standalone", "--nproc-per-node=2",
           "--exclude-stragglers", f"--journal={out / 'journal'}", str(EXAMPLE), "--data", data, "--out", str(out),
           "--global-batch", str(G), "--seed", str(SEED), "--steps", "60"]
    # rank 1 is 0.1 s slower from step 2 on (busy times are gathered every 5 steps: 10 reports, 5 in
    # a row make it persistent, with room for a noisy one under load); rank 0, not the slow one, is
    # killed at 51: the agent restarts, and at that restart the slow node leaves
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240,
                          env=_env("slow@2-59:rank1=0.1,kill@51:rank0"))
    assert proc.returncode == exitcodes.REPLACE_NODE, f"rc={proc.returncode}\n{proc.stderr[-4000:]}"
    events = journal(out)
    verdicts = [e for e in events if e["event"] == "straggler" and e["persistent"]]
    assert verdicts and verdicts[-1]["persistent"] == [1] and verdicts[-1]["step"] <= 51
    assert [e["exitcode"] for e in events if e["event"] == "worker_exit"][:1] == [-9]  # the kill, then
    (stop,) = [e for e in events if e["event"] == "stop"]
    assert stop["code"] == exitcodes.REPLACE_NODE and "straggler exclusion at restart" in stop["reason"]
    assert "rank(s) [1] persistently slow" in stop["reason"]
    # the node left instead of restarting: one start of the workers, no second `start` of any rank
    assert sum(e["event"] == "start_workers" for e in events) == 1
    assert sorted(e["rank"] for e in events if e["event"] == "start") == [0, 1]


def test_restart_budget_refills_after_a_healthy_window():
    now = [100.0]
    budget = RestartBudget(3, window=600.0, clock=lambda: now[0])
    budget.started()
    assert budget.refill(3) is None  # nothing spent
    now[0] += 599.0
    assert budget.refill(1) is None and budget.healthy_for() == 599.0  # not healthy long enough
    now[0] += 2.0
    assert budget.refill(1) == 3 and budget.refill(0) == 3  # healthy 601 s: full budget again
    budget.started()  # a restart: the stretch begins again
    now[0] += 300.0
    assert budget.refill(2) is None
    with pytest.raises(ValueError):
        RestartBudget(3, window=0.0)
