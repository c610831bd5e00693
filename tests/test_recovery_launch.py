"""``streamshard launch`` with real agents, workers and signals (gloo, CPU): exit codes 75/77/78, an
external hang kill, a health check before restart, and a spare node joining through the c10d
rendezvous on loopback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest

from streamshard.recovery import exitcodes
from streamshard.recovery.journal import Journal
from tests.net import free_port

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "jobs" / "launch_worker.py"
pytestmark = pytest.mark.slow(reason="real agents + workers: 10-40 s each on the 2-core box")


def env(**kw) -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **kw)


def launch_cmd(out: Path, *flags: str, steps: int = 40) -> list[str]:
    return [sys.executable, "-m", "streamshard.cli", "launch", "--monitor-interval=0.1",
            f"--journal={out / 'journal'}", f"--heartbeat-dir={out / 'hb'}", *flags, str(WORKER), str(out),
            str(steps)]


def standalone(tmp_path, fault: str, where: str, *flags: str, **kw) -> subprocess.CompletedProcess:
    (tmp_path / "hb").mkdir(exist_ok=True)
    cmd = launch_cmd(tmp_path, "--standalone", "--nproc-per-node=2", *flags)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                          env=env(WORKER_FAULT=fault, WORKER_FAULT_WHERE=where, **kw))


def wait_all(agents: dict, timeout: float) -> dict:
    """name -> (exit code or None if it had to be killed, output), every agent stopped."""
    deadline = time.monotonic() + timeout
    for p in agents.values():
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    out = {}
    for n, p in agents.items():
        rc = p.poll()
        if rc is None:
            p.send_signal(signal.SIGTERM)  # the agent stops its workers
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        p.log.seek(0)
        out[n] = (rc, p.log.read())
        p.log.close()
    return out


def start_agent(cmd: list[str], log_path: Path, **env_kw) -> subprocess.Popen:
    log = open(log_path, "w+")  # a file: a worker outliving a killed agent cannot block a pipe read
    p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, env=env(**env_kw))
    p.log = log
    return p


def events(out: Path, kind: str) -> list[dict]:
    return Journal(out / "journal").events(kind)


def test_exit_75_restarts_in_place(tmp_path):
    proc = standalone(tmp_path, "exit75@5", "rank1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [e["exitcode"] for e in events(tmp_path, "worker_exit")] == [75, 1] or \
        75 in [e["exitcode"] for e in events(tmp_path, "worker_exit")]
    assert len(events(tmp_path, "start_workers")) == 2
    assert (tmp_path / "done-rank0").is_file() and (tmp_path / "done-rank1").is_file()


def test_exit_78_stops_at_once_without_restarts(tmp_path):
    proc = standalone(tmp_path, "exit78@5", "rank0")
    assert proc.returncode == exitcodes.DO_NOT_REQUEUE, proc.stderr[-3000:]
    assert len(events(tmp_path, "start_workers")) == 1  # --max-restarts=3 left unused
    (stop,) = events(tmp_path, "stop")
    assert stop["code"] == 78 and not (tmp_path / "done-rank1").exists()


def test_hang_with_the_gil_held_is_killed_from_outside_and_restarted(tmp_path):
    proc = standalone(tmp_path, "hang@8", "rank1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    # rank 1 is stuck in C; rank 0 waits for it inside the all-reduce: both are hung at step 8
    hangs = {e["worker_rank"]: e for e in events(tmp_path, "hang")}
    hang = hangs[1]
    assert all(h["phase"] == "step" and h["step"] == 8 for h in hangs.values())
    assert 3.0 <= hang["timeout"] < 60.0  # calibrated from the first steps (floor 3 s), not the 300 s start-up
    dump = Path(hang["dump"]).read_text()
    assert "launch_worker.py\", line 35" in dump and "no heartbeat for" in dump  # the libc.sleep loop
    assert any(e["hang"] for e in events(tmp_path, "worker_exit"))
    assert (tmp_path / "done-rank1").is_file()


def test_health_check_before_restart_drains_the_node(tmp_path):
    kern = tmp_path / "kern.log"
    kern.write_text("boot\n")
    proc = standalone(tmp_path, "xid79@5", "rank0", f"--kernel-log={kern}", KERNEL_LOG=str(kern))
    assert proc.returncode == exitcodes.REPLACE_NODE, proc.stderr[-3000:]
    (health,) = events(tmp_path, "health")
    assert health["verdict"] == "replace-node" and health["reason"].startswith("XID 79")
    assert len(events(tmp_path, "start_workers")) == 1  # no restart on a node that lost its GPU


def test_exit_77_node_leaves_and_a_spare_takes_its_place(tmp_path):
    import torch.distributed as dist

    port = free_port()
    store = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False,  # the rendezvous host
                          timeout=timedelta(seconds=60))
    (tmp_path / "hb").mkdir()
    agents = {}
    try:
        for name in ("a", "b", "c"):  # two nodes needed, one spare
            out = tmp_path
            cmd = launch_cmd(out, "--nnodes=2:2", "--nproc-per-node=1", "--rdzv-backend=c10d",
                             f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=job1", "--rdzv-conf=is_host=0",
                             steps=60)
            cmd[cmd.index(f"--heartbeat-dir={out / 'hb'}")] = f"--heartbeat-dir={out / 'hb' / name}"
            (out / "hb" / name).mkdir()
            agents[name] = start_agent(cmd, tmp_path / f"agent-{name}.log", NODE_NAME=name, WORKER_FAULT="exit77@10",
                                       WORKER_FAULT_WHERE="rank0")
        results = wait_all(agents, 100)
    finally:
        del store
    codes = sorted(rc if rc is not None else -1 for rc, _ in results.values())
    assert codes == [0, 0, 77], {n: (rc, log[-2000:]) for n, (rc, log) in results.items()}
    leaver = next(n for n, (rc, _) in results.items() if rc == 77)
    starts = sorted(p.name for p in tmp_path.glob("start-*"))
    # the leaver ran only in the first round; the spare started later; the last round has world size 2
    assert sum(s.startswith(f"start-{leaver}-") for s in starts) == 1
    assert len({s.split("-")[1] for s in starts}) == 3
    assert json.loads((tmp_path / "done-rank0").read_text()) == 2 and (tmp_path / "done-rank1").is_file()


def test_exit_78_on_one_node_stops_every_node(tmp_path):
    import torch.distributed as dist

    port = free_port()
    store = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=60))
    agents = {}
    try:
        for name in ("a", "b"):
            (tmp_path / "hb" / name).mkdir(parents=True)
            cmd = launch_cmd(tmp_path, "--nnodes=2:2", "--nproc-per-node=1", "--rdzv-backend=c10d",
                             f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=job78", "--rdzv-conf=is_host=0",
                             steps=400)
            cmd[cmd.index(f"--heartbeat-dir={tmp_path / 'hb'}")] = f"--heartbeat-dir={tmp_path / 'hb' / name}"
            agents[name] = start_agent(cmd, tmp_path / f"agent-{name}.log", NODE_NAME=name, WORKER_FAULT="exit78@10",
                                       WORKER_FAULT_WHERE="rank1")
        results = wait_all(agents, 100)
    finally:
        del store
    assert sorted(rc if rc is not None else -1 for rc, _ in results.values()) == [78, 78], {n: log[-2000:] for n, (_, log) in results.items()}
    stops = events(tmp_path, "stop")
    assert len(stops) == 2 and all(s["code"] == 78 for s in stops)
    assert len(events(tmp_path, "start_workers")) == 2  # one start per node, no restart anywhere
    assert not list(tmp_path.glob("done-rank*"))  # stopped long before step 400
