"""The error classifier, called on the exceptions a training step raises.

``with exit_on_fault(journal): train()`` turns an exception whose text the classifier knows
(:func:`streamshard.recovery.health.classify_message`: CUDA, NCCL watchdog/heartbeat, gloo, RDMA,
ECC/XID, OOM) into the documented exit code (75/77/78) after journaling it, so the launcher acts
on it; an exception it does not know propagates unchanged (exit 1: the launcher restarts in place).
``torch.distributed``'s own error types count as a peer failure (75) when no rule matched.
"""

from __future__ import annotations

import logging
import os
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from streamshard.recovery import exitcodes
from streamshard.recovery.health import RESTART_HERE, Classification, classify_message

log = logging.getLogger(__name__)


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def classify_exception(exc: BaseException) -> Classification | None:
    """Verdict for an exception (its type name and message, causes included), or None."""
    for e in _chain(exc):
        c = classify_message(f"{type(e).__name__}: {e}")
        if c is not None:
            return c
    names = {type(e).__name__ for e in _chain(exc)}
    if names & {"DistBackendError", "DistNetworkError", "DistStoreError"}:
        return Classification(RESTART_HERE, f"torch.distributed {sorted(names)[0]}: a peer or the store failed")
    return None


@contextmanager
def exit_on_fault(journal=None, *, exit: Callable[[int], None] = os._exit, step: Callable[[], int] | None = None):
    """Classify an exception escaping the block; a known one is journaled and ends the process
    with its exit code (``exit`` is injected for tests)."""
    try:
        yield
    except Exception as e:
        c = classify_exception(e)
        if c is None:
            raise
        tb = "".join(traceback.format_exception(e))
        log.error("%s\nstreamshard.recovery: exit %d (%s): %s", tb, c.exit_code,
                  exitcodes.describe(c.exit_code), c.reason)
        if journal is not None:
            journal.append("exit", code=c.exit_code, name=exitcodes.describe(c.exit_code), reason=c.reason,
                           error=f"{type(e).__name__}: {e}"[:500], step=step() if step else None)
        exit(c.exit_code)
