"""Recovery hooks: detect loss spikes, hangs, slowdowns and GPU faults; recover by rolling back,
skipping data, reseeding, lowering the LR, or exiting with a documented code for the launcher.
See docs/RECOVERY.md. Importing this package does not import torch: ``CheckpointManager`` and
``install_lr_scale`` are loaded lazily, so the launcher's per-rank keeper starts without it.

This package exports what a training loop uses (configs, ``Recovery``, its actions, the journal,
watchdog, health probes, checkpoints). The detectors, classifiers and parsers behind them stay in
their modules (``streamshard.recovery.detectors``, ``.health``, ``.faultplan``, ...).
"""

from __future__ import annotations

from streamshard.recovery import exitcodes
from streamshard.recovery.detectors import PersistenceConfig, SpikeConfig
from streamshard.recovery.faultplan import fault_plan_from_env
from streamshard.recovery.forensics import ForensicsConfig
from streamshard.recovery.guard import GuardConfig, Recovery
from streamshard.recovery.health import (
    FakeProbe, HealthEvent, HealthProbe, KernelLogXidProbe, NvmlProbe, available_probes,
)
from streamshard.recovery.journal import Journal
from streamshard.recovery.policy import (
    PROCEED, Action, CheckpointRef, Exit, Ledger, PolicyConfig, Proceed, Rollback, SkipUpdate,
)
from streamshard.recovery.slowdown import SlowdownConfig, StragglerConfig
from streamshard.recovery.watchdog import Watchdog, WatchdogConfig
from streamshard.recovery.classify import classify_exception, exit_on_fault
from streamshard.recovery.goodput import EffectiveTime
from streamshard.recovery.heartbeat import Heartbeat, HeartbeatConfig, HeartbeatMonitor
from streamshard.recovery.policy import Anomaly, Rung

_LAZY = {"CheckpointManager": "streamshard.recovery.checkpoint",
         "CheckpointInfo": "streamshard.recovery.checkpoint",
         "install_lr_scale": "streamshard.recovery.lr"}

__all__ = [
    "Action", "Anomaly", "CheckpointInfo", "CheckpointManager", "CheckpointRef", "EffectiveTime",
    "Exit", "FakeProbe", "ForensicsConfig", "GuardConfig", "HealthEvent", "HealthProbe",
    "Heartbeat", "HeartbeatConfig", "HeartbeatMonitor", "Journal", "KernelLogXidProbe", "Ledger",
    "NvmlProbe", "PROCEED", "PersistenceConfig", "PolicyConfig", "Proceed", "Recovery",
    "Rollback", "Rung", "SkipUpdate", "SlowdownConfig", "SpikeConfig", "StragglerConfig",
    "Watchdog", "WatchdogConfig", "available_probes", "classify_exception", "exit_on_fault",
    "exitcodes", "fault_plan_from_env", "install_lr_scale",
]
assert sorted(__all__) == __all__


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'streamshard.recovery' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
