"""In-process restart: surviving ranks keep their interpreter, model and loader; a dead rank costs
one process start (the approach of NVIDIA nvidia-resiliency-ext's ``inprocess.Wrapper``).

Pieces:

- :mod:`keeper` (``streamshard launch --in-process``): each rank runs under a small keeper process
  that respawns it when it dies (and kills it, after a stack dump, when its heartbeat stops), instead
  of the agent restarting every rank of the job.
- :class:`Rounds`: the process group is formed in numbered *rounds* agreed through the launcher's
  TCPStore. A survivor that sees a peer fail tears its group down (``destroy_process_group``) and
  moves the shared round from R to R+1 (``compare_set``: the first one moves it, the others read
  it); a respawned rank reads the round its predecessor was in (``rank<r>/round``) and joins R+1 too.
  Each round's group lives under its own store prefix, so no stale key of round R is read in R+1.
- :func:`recoverable`: which exceptions a survivor handles this way (a peer failure or timeout, by the
  error classifier); anything else still ends the process.

The training loop then reloads the newest verified checkpoint (collective) and continues.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from datetime import timedelta

import torch.distributed as dist

from streamshard.recovery.classify import classify_exception
from streamshard.recovery.health import RESTART_HERE
from streamshard.recovery.keeper import ENV_INPROCESS

log = logging.getLogger(__name__)


def enabled(env: Mapping[str, str] = os.environ) -> bool:
    return env.get(ENV_INPROCESS) == "1"


def recoverable(exc: BaseException) -> bool:
    """A peer died, hung or broke the collective: survivors re-form the group instead of exiting."""
    c = classify_exception(exc)
    return c is not None and c.verdict == RESTART_HERE


class Rounds:
    """Numbered process-group rounds through the launcher's store (``MASTER_ADDR``/``MASTER_PORT``)."""

    def __init__(self, env: Mapping[str, str] = os.environ, *, backend: str = "gloo",
                 timeout: timedelta = timedelta(seconds=120)):
        self.rank, self.world_size = int(env["RANK"]), int(env["WORLD_SIZE"])
        self.backend, self.timeout = backend, timeout
        agent_store = env.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
        base = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), self.world_size,
                             is_master=not agent_store and self.rank == 0, timeout=timeout, wait_for_workers=False)
        launch_round = env.get("STREAMSHARD_ROUND_ID") or env.get("TORCHELASTIC_RESTART_COUNT", "0")
        self.store = dist.PrefixStore(f"streamshard-inprocess-{launch_round}", base)
        self.round: int | None = None
        self.reforms = 0

    def _me(self) -> str:
        return f"rank{self.rank}/round"

    def join(self) -> int:
        """First join of this process: round 0, or the round after the one a predecessor died in."""
        if self.store.check([self._me()]):
            pred = int(self.store.get(self._me()))
            target = int(self.store.compare_set("round", str(pred), str(pred + 1)))
            target = max(target, pred + 1)
        else:
            target = int(self.store.compare_set("round", "", "0"))
        return self._form(target)

    def reform(self) -> int:
        """After a peer failure: tear down, move to the next round, form the group again."""
        from streamshard.recovery.pg import destroy_process_group

        destroy_process_group()
        current = self.round if self.round is not None else 0
        target = int(self.store.compare_set("round", str(current), str(current + 1)))
        self.reforms += 1
        return self._form(max(target, current + 1))

    def _form(self, target: int) -> int:
        self.store.set(self._me(), str(target))
        log.info("rank %d joins process-group round %d", self.rank, target)
        dist.init_process_group(self.backend, store=dist.PrefixStore(f"round{target}", self.store), rank=self.rank,
                                world_size=self.world_size, timeout=self.timeout)
        self.round = target
        return target
