"""The per-step API a plain PyTorch loop calls.

```python
guard = Recovery(GuardConfig(), journal=Journal(path, rank=rank), checkpoints=ckpt.refs, writer=rank == 0)
if (a := guard.startup()) is not None: sys.exit(a.code)     # a terminal decision was journaled
...
action = guard.observe(step, data_step=loader.last_step, loss=loss, grad_norm=gn, step_time=dt)
match action:
    case Proceed():    optimizer.step()
    case SkipUpdate(): optimizer.zero_grad()                   # drop the update
    case Rollback():   ckpt.load(action.to_step, ...); guard.apply_to_loader(loader); step = action.to_step
    case Exit():       sys.exit(action.code)
```

Every rank must feed identical numbers (all-reduce the loss first; DDP grad norms already agree),
so every rank takes the same decision; only the ``writer`` rank journals decisions. Per-rank
events (health, hang, straggler reports, fired faults) are journaled by the rank that saw them.
"""

from __future__ import annotations

import logging

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from streamshard.errors import ConfigError
from streamshard.recovery import exitcodes
from streamshard.recovery.detectors import (
    PersistenceConfig, PersistenceCounter, SpikeConfig, SpikeDetector, Verdict,
)
from streamshard.recovery.forensics import ForensicsConfig
from streamshard.recovery.health import HealthEvent
from streamshard.recovery.journal import Journal
from streamshard.recovery.policy import (
    DEFAULT_RUNGS, PROCEED, Action, Anomaly, CheckpointRef, Exit, Ledger, PolicyConfig, Rollback, Rung, SkipUpdate,
    apply_event, climb,
)
from streamshard.recovery.slowdown import (
    SlowdownConfig, SlowdownDetector, StragglerConfig, StragglerDetector, Stragglers,
)

STATE_VERSION = 1
_DATA_MAP_LIMIT = 4096  # training steps of step -> data step kept; a run of anomalies is far shorter
_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GuardConfig:
    loss: SpikeConfig = field(default_factory=SpikeConfig)
    grad_norm: SpikeConfig | None = field(default_factory=SpikeConfig)  # None: do not watch it
    persistence: PersistenceConfig = field(default_factory=PersistenceConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    slowdown: SlowdownConfig = field(default_factory=SlowdownConfig)
    straggler: StragglerConfig = field(default_factory=StragglerConfig)
    forensics: ForensicsConfig = field(default_factory=ForensicsConfig)  # off by default


class Recovery:
    """Detectors + ladder + journal for one training process. Not thread-safe."""

    def __init__(self, cfg: GuardConfig = GuardConfig(), *, journal: Journal | None = None,
                 checkpoints: Callable[[], Iterable[CheckpointRef]] = tuple, writer: bool = True,
                 world_size: int = 1, log: Callable[[str], None] | None = None,
                 rungs: Sequence[Rung] = DEFAULT_RUNGS):
        self.cfg = cfg
        self._rungs = tuple(rungs)  # consulted in order on a persistent anomaly; rollback is always last
        self._journal = journal
        self._writer = writer
        self._checkpoints = checkpoints
        self._log = log if log is not None else _logger.warning  # no print by default
        self._loss = SpikeDetector(cfg.loss)
        self._grad = SpikeDetector(cfg.grad_norm) if cfg.grad_norm is not None else None
        self._run = PersistenceCounter(cfg.persistence)
        self._slow = SlowdownDetector(cfg.slowdown)
        self._stragglers = StragglerDetector(world_size, cfg.straggler)
        self._reported_stragglers: tuple = ((), ())
        self._was_slow = False
        self._data_of: dict[int, int] = {}
        self.ledger = journal.ledger() if journal is not None else Ledger()
        self.counts = {"proceed": 0, "skip_update": 0, "rollback": 0, "exit": 0}

    # ---- start / state ------------------------------------------------------------------------

    def startup(self) -> Exit | None:
        """An ``Exit`` if the journal holds a terminal decision (do not train again)."""
        if self.ledger.terminal is not None:
            return Exit(*self.ledger.terminal)
        return None

    @property
    def lr_scale(self) -> float:
        return self.ledger.lr_scale

    @property
    def healthy(self) -> bool:
        """False while a run of anomalies is in progress: do not checkpoint then."""
        return self._run.count == 0

    def apply_to_loader(self, loader) -> None:
        """Re-apply every skip and reseed (loader.skip / reseed_from are idempotent); call after
        ``loader.load_state_dict`` on start and after a rollback."""
        for start, stop in self.ledger.skips:
            loader.skip(start, stop)
        for step, salt in self.ledger.reseeds:
            loader.reseed_from(step, salt)
        if self.ledger.quarantine:
            loader.quarantine(self.ledger.quarantine)

    def record(self, event: dict) -> None:
        """Fold a decision made outside the ladder (e.g. a forensics verdict: recovery/forensics.py)
        into the ledger and journal it (writer rank only). Every rank must call it alike."""
        self.ledger = apply_event(self.ledger, event)
        fields = dict(event)
        self._decision(fields.pop("event"), **fields)

    def forgive(self) -> None:
        """Forget the current run of anomalies (its cause was found and removed: the step is
        trained again), so a later anomaly starts a new run."""
        self._run.reset()

    def state_dict(self) -> dict:
        return {
            "version": STATE_VERSION,
            "ledger": self.ledger.to_json(),
            "loss": self._loss.state_dict(),
            "grad_norm": self._grad.state_dict() if self._grad is not None else None,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore detector windows from a checkpoint; the ledger is merged, never rolled back."""
        if state.get("version") != STATE_VERSION:
            raise ConfigError(f"recovery state version: saved {state.get('version')!r}, live {STATE_VERSION}")
        self.ledger = self.ledger.merge(Ledger.from_json(state["ledger"]))
        self._loss.load_state_dict(state["loss"])
        if self._grad is not None and state.get("grad_norm") is not None:
            self._grad.load_state_dict(state["grad_norm"])
        self._run.reset()

    # ---- per step -----------------------------------------------------------------------------

    def observe(self, step: int, *, data_step: int, loss: float, grad_norm: float | None = None,
                step_time: float | None = None) -> Action:
        """Feed one training step's metrics; returns what to do with this step's update."""
        if self.ledger.terminal is not None:
            return Exit(*self.ledger.terminal)
        self._data_of[step] = data_step
        if len(self._data_of) > 2 * _DATA_MAP_LIMIT:  # bounded: only recent steps can be a spike's start
            for old in [s for s in self._data_of if s < step - _DATA_MAP_LIMIT]:
                del self._data_of[old]
        if step_time is not None:
            self._observe_time(step, step_time)
        verdicts = [("loss", self._loss.observe(loss))]
        if self._grad is not None and grad_norm is not None:
            verdicts.append(("grad_norm", self._grad.observe(grad_norm)))
        bad = [(name, v) for name, v in verdicts if v.anomalous]
        persistent = self._run.observe(step, bool(bad))
        if not bad:
            self.counts["proceed"] += 1
            return PROCEED
        reason = "; ".join(_describe(name, v) for name, v in bad)
        if not persistent:
            self.counts["skip_update"] += 1
            self._decision("skip_update", step=step, data_step=data_step, reason=reason)
            return SkipUpdate(step, reason)
        first = self._run.first
        refs = list(self._checkpoints())
        anomaly = Anomaly((first, self._data_of.get(first, data_step)), (step, data_step), reason, tuple(refs))
        action, self.ledger, event = climb(self._rungs, self.ledger, self.cfg.policy, anomaly)
        self._decision(event.pop("event"), step=step, **event)
        self._run.reset()
        if isinstance(action, Rollback):
            self.counts["rollback"] += 1
            for s in [s for s in self._data_of if s >= action.to_step]:
                del self._data_of[s]
        else:
            self.counts["exit"] += 1
        return action

    def _observe_time(self, step: int, step_time: float) -> None:
        s = self._slow.observe(step_time)
        if s.slow != self._was_slow and self._journal is not None:
            self._journal.append("slowdown", step=step, slow=s.slow, recent=s.recent, baseline=s.baseline)
        self._was_slow = s.slow

    def observe_ranks(self, step: int, busy_times: Sequence[float]) -> Stragglers:
        """Feed per-rank busy times (all ranks gathered by the caller); journals a change in the
        set of stragglers (writer rank only) and returns the verdict."""
        result = self._stragglers.observe(busy_times)
        if (result.ranks, result.persistent) != self._reported_stragglers:
            self._reported_stragglers = (result.ranks, result.persistent)
            self._decision("straggler", step=step, ranks=list(result.ranks), persistent=list(result.persistent),
                           per_rank=list(result.per_rank), typical=result.typical)
            if result.ranks:
                self._log(f"straggler rank(s) {list(result.ranks)} at step {step}: "
                          f"busy {[round(t, 4) for t in result.per_rank]} s vs typical {result.typical:.4f} s")
        return result

    def observe_health(self, step: int, events: Iterable[HealthEvent]) -> Action:
        """Journal health events; the first fatal one becomes ``Exit(75/77/78)``."""
        action: Action = PROCEED
        for e in events:
            c = e.classification
            if self._journal is not None:
                self._journal.append("health", step=step, source=e.source, kind=e.kind, device=e.device,
                                     detail=e.detail, verdict=c.verdict if c else None,
                                     reason=c.reason if c else None)
            if c is not None and action is PROCEED:
                action = Exit(c.exit_code, f"{e.source} {e.device}: {c.reason}")
        if isinstance(action, Exit) and self._journal is not None:
            self._journal.append("exit", step=step, code=action.code, reason=action.reason,
                                 name=exitcodes.describe(action.code))
        return action

    def _decision(self, kind: str, **fields) -> None:
        if self._writer and self._journal is not None:
            self._journal.append(kind, **fields)


def _describe(name: str, v: Verdict) -> str:
    if v.reason == "nonfinite":
        return f"{name} is {v.value}"
    return f"{name} spike {v.value:.6g} (robust z {v.z:.1f})"
