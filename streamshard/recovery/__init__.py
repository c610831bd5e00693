"""Recovery hooks: detect loss spikes, hangs, slowdowns and GPU faults; recover by rolling back,
skipping data, reseeding, lowering the LR, or exiting with a documented code for the launcher.
See docs/RECOVERY.md. Importing this package does not import torch.distributed.checkpoint;
``CheckpointManager`` is loaded lazily."""

from __future__ import annotations

from streamshard.recovery import exitcodes  # noqa: F401
from streamshard.recovery.detectors import (  # noqa: F401
    PersistenceConfig, PersistenceCounter, SpikeConfig, SpikeDetector, Verdict, robust_z,
)
from streamshard.recovery.faultplan import Fault, FaultPlan, fault_plan_from_env, parse_fault_plan  # noqa: F401
from streamshard.recovery.guard import GuardConfig, Recovery  # noqa: F401
from streamshard.recovery.health import (  # noqa: F401
    Classification, FakeProbe, HealthEvent, HealthProbe, KernelLogXidProbe, NvmlProbe,
    available_probes, classify_message, classify_xid, parse_xid_line, tail_file,
)
from streamshard.recovery.journal import Journal, last_exit  # noqa: F401
from streamshard.recovery.policy import (  # noqa: F401
    PROCEED, Action, CheckpointRef, Exit, Ledger, PolicyConfig, Proceed, Rollback, SkipUpdate,
)
from streamshard.recovery.slowdown import (  # noqa: F401
    SlowdownConfig, SlowdownDetector, StragglerConfig, StragglerDetector,
)
from streamshard.recovery.watchdog import Watchdog, WatchdogConfig  # noqa: F401
from streamshard.recovery.classify import classify_exception, exit_on_fault  # noqa: F401
from streamshard.recovery.goodput import EffectiveTime  # noqa: F401
from streamshard.recovery.heartbeat import Heartbeat, HeartbeatConfig, HeartbeatMonitor  # noqa: F401
from streamshard.recovery.lr import install_lr_scale  # noqa: F401
from streamshard.recovery.policy import Anomaly, Rung  # noqa: F401


def __getattr__(name: str):
    if name in ("CheckpointManager", "CheckpointInfo"):
        from streamshard.recovery import checkpoint

        return getattr(checkpoint, name)
    raise AttributeError(f"module 'streamshard.recovery' has no attribute {name!r}")


__all__ = [
    "exitcodes", "PersistenceConfig", "PersistenceCounter", "SpikeConfig", "SpikeDetector", "Verdict", "robust_z",
    "Fault", "FaultPlan", "fault_plan_from_env", "parse_fault_plan", "GuardConfig", "Recovery",
    "Classification", "FakeProbe", "HealthEvent", "HealthProbe", "KernelLogXidProbe", "NvmlProbe",
    "available_probes", "classify_message", "classify_xid", "parse_xid_line", "tail_file", "Journal", "last_exit",
    "PROCEED", "Action", "CheckpointRef", "Exit", "Ledger", "PolicyConfig", "Proceed", "Rollback", "SkipUpdate",
    "SlowdownConfig", "SlowdownDetector", "StragglerConfig", "StragglerDetector", "Watchdog", "WatchdogConfig",
    "CheckpointManager", "CheckpointInfo", "classify_exception", "exit_on_fault", "EffectiveTime", "Heartbeat",
    "HeartbeatConfig", "HeartbeatMonitor", "install_lr_scale", "Anomaly", "Rung",
]
