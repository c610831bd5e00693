"""A minimal distributed job for the launcher tests: gloo all-reduce per step, heartbeats per phase,
faults from ``WORKER_FAULT`` = ``<kind>@<step>`` applied where ``WORKER_FAULT_WHERE`` matches
(``rank<r>`` or ``node:<name>`` with the agent's ``NODE_NAME``), once per job (a marker file)."""

import ctypes
import os
import sys
import time

import torch
import torch.distributed as dist

from streamshard.recovery.heartbeat import Heartbeat
from streamshard.recovery.pg import init_process_group

out, steps = sys.argv[1], int(sys.argv[2])
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
init_process_group()
hb = Heartbeat.from_env()
kind, _, at = os.environ.get("WORKER_FAULT", "none@-1").partition("@")
where = os.environ.get("WORKER_FAULT_WHERE", "")
mine = where == f"rank{rank}" or where == f"node:{os.environ.get('NODE_NAME')}"
marker = os.path.join(out, f"fired-{kind}")
with open(os.path.join(out, f"start-{os.environ.get('NODE_NAME', 'x')}-rank{rank}-attempt{attempt}"), "w") as f:
    f.write(str(world))
for step in range(steps):
    hb.step = step
    if mine and step == int(at) and not os.path.exists(marker):
        open(marker, "w").close()
        if kind == "hang":
            with hb.phase("step"):
                libc = ctypes.PyDLL(None)
                while True:
                    libc.sleep(60)
        if kind == "xid79":  # the kernel reports the GPU lost, the worker dies with a generic 75
            with open(os.environ["KERNEL_LOG"], "a") as f:
                f.write("[ 99.1] NVRM: Xid (PCI:0000:3b:00): 79, pid=1, GPU has fallen off the bus.\n")
            sys.exit(75)
        sys.exit(int(kind[4:]))  # exit75 / exit77 / exit78
    with hb.phase("step"):
        t = torch.ones(1)
        dist.all_reduce(t)
        time.sleep(0.02)
with open(os.path.join(out, f"done-rank{rank}"), "w") as f:
    f.write(f"{world}\n")
dist.destroy_process_group()
