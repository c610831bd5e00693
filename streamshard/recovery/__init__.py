"""Recovery hooks: detect loss spikes, hangs, slowdowns and GPU faults; recover by rolling back,
skipping data, reseeding, lowering the LR, or exiting with a documented code for the launcher.
See docs/RECOVERY.md. Importing this package does not import torch.distributed.checkpoint;
``CheckpointManager`` is loaded lazily.

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

_LAZY = {"CheckpointManager": "streamshard.recovery.checkpoint",
         "CheckpointInfo": "streamshard.recovery.checkpoint"}

__all__ = [
    "Action", "CheckpointInfo", "CheckpointManager", "CheckpointRef", "Exit", "FakeProbe",
    "ForensicsConfig", "GuardConfig", "HealthEvent", "HealthProbe", "Journal", "KernelLogXidProbe",
    "Ledger", "NvmlProbe", "PROCEED", "PersistenceConfig", "PolicyConfig", "Proceed", "Recovery",
    "Rollback", "SkipUpdate", "SlowdownConfig", "SpikeConfig", "StragglerConfig", "Watchdog",
    "WatchdogConfig", "available_probes", "exitcodes", "fault_plan_from_env",
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
