"""Per-rank keeper for in-process restart: ``python -m streamshard.recovery.keeper SCRIPT [ARGS]``.

``streamshard launch --in-process`` starts this instead of the training script. It runs the script
as a child with ``STREAMSHARD_INPROCESS=1``, watches the child's heartbeat (the agent does not,
in this mode), and when the child dies (SIGKILL, a crash, exit 75/76, or killed by the monitor after
a hang) starts it again: one process start, while the other ranks keep running and re-form the
group with it (:mod:`inprocess`). Every start of the rank is a fork of a warm standby
(:mod:`zygote`, :mod:`standby`) that has already imported what the script imports, so a replacement
does not pay for ``import torch``; ``STREAMSHARD_ZYGOTE=0`` starts ranks cold instead. Exit codes 0, 77 and 78 end the keeper with the same code (the
agent acts on them); so does a child that dies ``--max-respawns`` (default 10) times. SIGTERM from
the agent is passed to the child.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile

from streamshard.recovery import exitcodes
from streamshard.recovery.heartbeat import ENV_DIR, HeartbeatConfig, HeartbeatMonitor
from streamshard.recovery.journal import Journal
from streamshard.recovery.standby import Standby

ENV_INPROCESS = "STREAMSHARD_INPROCESS"  # set for the rank: streamshard.recovery.inprocess.enabled()
ENV_JOURNAL = "STREAMSHARD_JOURNAL"
ENV_HANG_FLOOR = "STREAMSHARD_HANG_FLOOR"
MAX_RESPAWNS = 10
FINAL = (exitcodes.OK, exitcodes.REPLACE_NODE, exitcodes.DO_NOT_REQUEUE)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print("usage: python -m streamshard.recovery.keeper SCRIPT [ARGS]", file=sys.stderr)
        return 2
    hb_dir = os.environ.get(ENV_DIR) or tempfile.mkdtemp(prefix="streamshard-hb-")
    local = os.environ.get("LOCAL_RANK", "0")
    rank = int(os.environ.get("RANK", "0"))
    env = dict(os.environ, **{ENV_INPROCESS: "1", ENV_DIR: hb_dir})
    journal = Journal(os.environ[ENV_JOURNAL], rank=os.getpid(), role="agent") if os.environ.get(ENV_JOURNAL) else None

    def on_hang(h) -> None:
        if journal is not None:
            journal.append("hang", code=exitcodes.HANG, worker_rank=rank, pid=h.pid, phase=h.phase, step=h.step,
                           elapsed=h.elapsed, timeout=h.timeout, dump=h.dump, keeper=True)

    floor = float(os.environ.get(ENV_HANG_FLOOR, HeartbeatConfig.floor))
    monitor = HeartbeatMonitor(HeartbeatConfig(floor=floor), on_hang=on_hang).start()
    child = None
    standby: Standby | None = None

    def forward(signum, frame):
        if child is not None:
            try:
                child.send_signal(signum)
            except ProcessLookupError:
                pass
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    rc = 1
    try:
        standby = Standby.start(argv, env)
        for attempt in range(MAX_RESPAWNS + 1):
            child = standby.spawn()
            if journal is not None and attempt == 0:
                journal.append("standby", worker_rank=rank, warm=standby.warm, shared=standby.shared,
                               why_cold=standby.why_cold)
            monitor.watch(local, child.pid, os.path.join(hb_dir, f"local{local}.hb"),
                          os.path.join(hb_dir, f"stacks-local{local}-pid{child.pid}.txt"))
            rc = child.wait()
            monitor.unwatch_all()
            standby.lost(child)
            if rc in FINAL:
                return rc
            if journal is not None:
                journal.append("respawn", worker_rank=rank, exitcode=rc, attempt=attempt + 1, name=exitcodes.describe(rc))
            print(f"streamshard keeper: rank {rank} exited {rc}; starting it again (in-process restart "
                  f"of the others)", file=sys.stderr, flush=True)
        return rc if rc > 0 else 1
    finally:
        monitor.stop()
        if child is not None and child.returncode is None:
            child.kill()
            try:
                child.wait(timeout=10.0)
            except subprocess.TimeoutExpired:
                pass
        if standby is not None:
            standby.close()


if __name__ == "__main__":
    sys.exit(main())
