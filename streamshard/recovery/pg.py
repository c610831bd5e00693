"""Process-group set-up for (re)starts under torchrun / ``streamshard launch``.

Under the elastic agent, restarted workers reuse the agent's TCPStore. gloo's full-mesh connect then
reads the dead workers' addresses from the previous attempt's keys (seen with torch 2.13:
"connectFullMesh failed ... Connection refused"), so every attempt gets its own key space: a
``PrefixStore`` named after ``TORCHELASTIC_RESTART_COUNT`` (and, for an in-process re-form, a round
number the caller passes).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from datetime import timedelta

import torch.distributed as dist


def init_process_group(env: Mapping[str, str] = os.environ, *, backend: str = "gloo", round: int = 0,
                       timeout: timedelta = timedelta(seconds=120)) -> None:
    """Initialise the default process group from the launcher's environment (``RANK``,
    ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``, ``TORCHELASTIC_*``) on a store key space
    private to this restart attempt and ``round``."""
    rank, world_size = int(env["RANK"]), int(env["WORLD_SIZE"])
    agent_store = env.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    base = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), world_size,
                         is_master=not agent_store and rank == 0, timeout=timeout, wait_for_workers=False)
    # streamshard launch names each rendezvous round (a spare that just joined has restart count 0
    # while the restarted nodes have 1); under plain torchrun the restart count is the same everywhere
    attempt = env.get("STREAMSHARD_ROUND_ID") or env.get("TORCHELASTIC_RESTART_COUNT", "0")
    prefix = f"streamshard-{attempt}-round{round}"
    dist.init_process_group(backend, store=dist.PrefixStore(prefix, base), rank=rank, world_size=world_size,
                            timeout=timeout)


def destroy_process_group() -> None:
    """Tear the default group down if there is one (safe after a peer died mid-collective)."""
    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # a broken communicator can fail to shut down; the group is gone either way
            pass
