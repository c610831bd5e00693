"""Process exit codes the recovery layer uses to talk to the launcher (torchrun, a scheduler).

The numbers come from the BSD ``sysexits.h`` range (64-78) so they cannot collide with Python's
own ``1`` (uncaught exception), ``2`` (usage), or ``128+N`` (killed by signal N):

======  ==================  ==============================================================
code    name                what the launcher should do
======  ==================  ==============================================================
0       ``OK``              training finished; nothing to do
75      ``RESTART_HERE``    transient fault (``EX_TEMPFAIL``): restart on the same nodes
76      ``HANG``            the hang watchdog fired (stacks dumped): restart on the same nodes
77      ``REPLACE_NODE``    hardware fault (XID, ECC, fallen off the bus): restart elsewhere
78      ``DO_NOT_REQUEUE``  restarting cannot help (retry budget spent, code bug): stop
======  ==================  ==============================================================

``torchrun --max-restarts=N`` restarts the whole worker group on *any* non-zero exit and itself
exits with 1 once the budget is spent, so under torchrun these codes are read from its error
summary (or from the journal, see :func:`streamshard.recovery.journal.last_exit`) by the scheduler
wrapper that decides about requeueing; ``78`` repeats at once on every restart because the
journal remembers the terminal decision.
"""

from __future__ import annotations

OK = 0
RESTART_HERE = 75
HANG = 76
REPLACE_NODE = 77
DO_NOT_REQUEUE = 78

NAMES: dict[int, str] = {
    OK: "ok",
    RESTART_HERE: "restart-here",
    HANG: "hang",
    REPLACE_NODE: "replace-node",
    DO_NOT_REQUEUE: "do-not-requeue",
}


def describe(code: int) -> str:
    """Name of an exit code (``"hang"`` for 76), or ``"exit-<n>"`` for a code we do not own."""
    return NAMES.get(code, f"exit-{code}")
