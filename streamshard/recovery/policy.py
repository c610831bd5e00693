"""The recovery ladder as a pure state machine: verdicts in, action values out.

Ladder (defaults from PaLM, Chowdhery et al. 2022, sec. 5.1: "we re-started training from a
checkpoint roughly 100 steps before the spike started, and skipped roughly 200-500 data batches,
which cover the batches that were seen before and during the spike"):

1. An isolated anomaly (fewer than ``persist`` in a row, NaN/Inf included) -> ``SkipUpdate``:
   the caller drops the optimizer step; the data is consumed.
2. A persistent anomaly -> ``Rollback`` to the newest valid checkpoint at least
   ``rollback_margin`` (100) steps before the first anomalous step, skipping the absolute data
   steps ``[max(ckpt data step, first - skip_before), last + 1 + skip_after)``.
3. A persistent anomaly again in the same region (first step within ``repeat_window`` of an earlier
   rollback's spike) -> the same, plus ``lr_scale *= lr_factor`` (0.5) and a reseed of the order
   from the end of the skip window (seed-notes: "roll back, change the seed, lower the LR, retry").
4. More than ``max_retries`` (3) attempts in one region, or more than ``max_rollbacks`` (10) in the
   job -> ``Exit(DO_NOT_REQUEUE)``: a human has to look.

Checkpoint steps count completed training steps (checkpoint N resumes at training step N).
A checkpoint saved in generation g (= number of rollbacks decided so far) is invalidated by any
later rollback whose target is older than it: training diverged from there.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

from streamshard.errors import ConfigError
from streamshard.recovery import exitcodes


@dataclass(frozen=True)
class PolicyConfig:
    rollback_margin: int = 100
    skip_before: int = 100
    skip_after: int = 0
    lr_factor: float = 0.5
    repeat_window: int = 200
    max_retries: int = 3
    max_rollbacks: int = 10

    def __post_init__(self) -> None:
        for name in ("rollback_margin", "skip_before", "skip_after", "repeat_window"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 < self.lr_factor <= 1:
            raise ConfigError(f"lr_factor must be in (0, 1], got {self.lr_factor}")
        if self.max_retries < 1 or self.max_rollbacks < 1:
            raise ConfigError(
                f"max_retries and max_rollbacks must be >= 1, got {self.max_retries} and {self.max_rollbacks}"
            )


# ---- actions (values) -------------------------------------------------------------------------


@dataclass(frozen=True)
class Proceed:
    """Apply the update and go on."""


@dataclass(frozen=True)
class SkipUpdate:
    """Drop this step's optimizer update (zero the grads); the batch counts as consumed."""

    step: int
    reason: str


@dataclass(frozen=True)
class Rollback:
    """Load checkpoint ``to_step``, then apply the ledger to the loader (skips, reseeds) and scale
    the LR by ``lr_scale`` (absolute, relative to the schedule)."""

    to_step: int
    skip: tuple[int, int]
    lr_scale: float
    reseed: tuple[int, int] | None
    attempt: int
    reason: str


@dataclass(frozen=True)
class Exit:
    """Exit the process with ``code`` (see :mod:`exitcodes`)."""

    code: int
    reason: str


Action = Proceed | SkipUpdate | Rollback | Exit
PROCEED = Proceed()


@dataclass(frozen=True)
class CheckpointRef:
    """What the policy needs to know about a checkpoint."""

    step: int
    data_step: int
    generation: int = 0


@dataclass(frozen=True)
class Region:
    """Training steps ``[start, end]`` of a spike that caused rollbacks, and how many."""

    start: int
    end: int
    attempts: int


@dataclass(frozen=True)
class Ledger:
    """Everything recovery changed so far; rebuilt from the journal at start (idempotent)."""

    skips: tuple[tuple[int, int], ...] = ()
    reseeds: tuple[tuple[int, int], ...] = ()
    lr_scale: float = 1.0
    regions: tuple[Region, ...] = ()
    rollbacks: tuple[tuple[int, int], ...] = field(default=())  # (generation, to_step) per rollback
    terminal: tuple[int, str] | None = None
    quarantine: tuple[tuple[int, int, int], ...] = ()  # (stream, sample_id, from_step): recovery/forensics.py

    @property
    def generation(self) -> int:
        return len(self.rollbacks)

    def is_valid(self, ckpt: CheckpointRef) -> bool:
        return not any(g > ckpt.generation and to < ckpt.step for g, to in self.rollbacks)

    def valid(self, checkpoints: Iterable[CheckpointRef]) -> list[CheckpointRef]:
        return sorted((c for c in checkpoints if self.is_valid(c)), key=lambda c: c.step)

    def to_json(self) -> dict:
        return {
            "skips": [list(s) for s in self.skips],
            "reseeds": [list(r) for r in self.reseeds],
            "lr_scale": self.lr_scale,
            "regions": [[r.start, r.end, r.attempts] for r in self.regions],
            "rollbacks": [list(r) for r in self.rollbacks],
            "terminal": list(self.terminal) if self.terminal else None,
            "quarantine": [list(q) for q in self.quarantine],
        }

    @classmethod
    def from_json(cls, d: dict) -> Ledger:
        try:
            return cls(
                skips=tuple((int(a), int(b)) for a, b in d["skips"]),
                reseeds=tuple((int(a), int(b)) for a, b in d["reseeds"]),
                lr_scale=float(d["lr_scale"]),
                regions=tuple(Region(int(a), int(b), int(c)) for a, b, c in d["regions"]),
                rollbacks=tuple((int(g), int(t)) for g, t in d["rollbacks"]),
                terminal=(int(d["terminal"][0]), str(d["terminal"][1])) if d["terminal"] else None,
                quarantine=tuple((int(s), int(i), int(f)) for s, i, f in d.get("quarantine", ())),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"recovery ledger is malformed ({e!r}): {d!r}") from None

    def merge(self, other: Ledger) -> Ledger:
        """The ledger that knows everything either one knows (the journal is usually a superset
        of a checkpoint's copy; merging twice changes nothing)."""
        longer = self if len(self.rollbacks) >= len(other.rollbacks) else other
        return Ledger(
            skips=_union(self.skips, other.skips),
            reseeds=_union(self.reseeds, other.reseeds),
            lr_scale=min(self.lr_scale, other.lr_scale),
            regions=longer.regions,
            rollbacks=longer.rollbacks,
            terminal=self.terminal or other.terminal,
            quarantine=_union(self.quarantine, other.quarantine),
        )


def _union(a: Sequence, b: Sequence) -> tuple:
    out = list(a)
    out.extend(x for x in b if x not in out)
    return tuple(out)


def apply_event(ledger: Ledger, event: dict) -> Ledger:
    """Fold one journal event into the ledger (pure). Unknown events leave it unchanged."""
    kind = event.get("event")
    if kind == "rollback":
        region = Region(int(event["region"][0]), int(event["region"][1]), int(event["attempt"]))
        regions = tuple(r for r in ledger.regions if (r.start, r.end) != tuple(event["prev_region"] or ()))
        reseed = tuple(event["reseed"]) if event.get("reseed") else None
        return replace(
            ledger,
            skips=_union(ledger.skips, [tuple(event["skip"])]),
            reseeds=_union(ledger.reseeds, [reseed] if reseed else []),
            lr_scale=float(event["lr_scale"]),
            regions=regions + (region,),
            rollbacks=ledger.rollbacks + ((int(event["generation"]), int(event["to_step"])),),
        )
    if kind == "quarantine":  # a data verdict of recovery/forensics.py
        entries = [(int(s), int(i), int(f)) for s, i, f in event["entries"]]
        return replace(ledger, quarantine=_union(ledger.quarantine, entries))
    if kind == "exit" and int(event["code"]) == exitcodes.DO_NOT_REQUEUE:
        return replace(ledger, terminal=(exitcodes.DO_NOT_REQUEUE, str(event["reason"])))
    return ledger


def rollback_event(action: Rollback, ledger_before: Ledger, region: Region, prev: Region | None) -> dict:
    """The journal record of a rollback; :func:`apply_event` of it reproduces the new ledger."""
    return {
        "event": "rollback",
        "to_step": action.to_step,
        "skip": list(action.skip),
        "lr_scale": action.lr_scale,
        "reseed": list(action.reseed) if action.reseed else None,
        "attempt": action.attempt,
        "region": [region.start, region.end],
        "prev_region": [prev.start, prev.end] if prev else None,
        "generation": ledger_before.generation + 1,
        "reason": action.reason,
    }


def decide_persistent(
    ledger: Ledger,
    cfg: PolicyConfig,
    *,
    first: tuple[int, int],
    last: tuple[int, int],
    checkpoints: Iterable[CheckpointRef],
    reason: str,
) -> tuple[Action, Ledger, dict]:
    """Rung 2-4 of the ladder for a persistent anomaly over training steps ``first[0]..last[0]``
    whose absolute data steps are ``first[1]`` and ``last[1]``. Returns the action, the new ledger
    and the journal event that records the decision."""
    first_step, first_data = first
    last_step, last_data = last
    prev = next(
        (r for r in ledger.regions if r.start - cfg.repeat_window <= first_step <= r.end + cfg.repeat_window),
        None,
    )
    attempt = prev.attempts + 1 if prev else 1
    if attempt > cfg.max_retries or ledger.generation + 1 > cfg.max_rollbacks:
        why = (
            f"{reason} at steps {first_step}..{last_step}: "
            + (f"attempt {attempt} in the same region exceeds max_retries={cfg.max_retries}"
               if attempt > cfg.max_retries else f"rollback budget max_rollbacks={cfg.max_rollbacks} spent")
        )
        event = {"event": "exit", "code": exitcodes.DO_NOT_REQUEUE, "reason": why}
        return Exit(exitcodes.DO_NOT_REQUEUE, why), apply_event(ledger, event), event
    valid = [c for c in ledger.valid(checkpoints) if c.step <= first_step]
    far = [c for c in valid if c.step <= first_step - cfg.rollback_margin]
    target = far[-1] if far else (valid[-1] if valid else None)
    if target is None:
        why = f"{reason} at steps {first_step}..{last_step} and no checkpoint at or before step {first_step}"
        event = {"event": "exit", "code": exitcodes.DO_NOT_REQUEUE, "reason": why}
        return Exit(exitcodes.DO_NOT_REQUEUE, why), apply_event(ledger, event), event
    skip = (max(target.data_step, first_data - cfg.skip_before), last_data + 1 + cfg.skip_after)
    lr_scale = ledger.lr_scale * (cfg.lr_factor if attempt > 1 else 1.0)
    reseed = (skip[1], ledger.generation + 1) if attempt > 1 else None
    region = Region(min(first_step, prev.start) if prev else first_step,
                    max(last_step, prev.end) if prev else last_step, attempt)
    action = Rollback(target.step, skip, lr_scale, reseed, attempt,
                      f"{reason} persisted over steps {first_step}..{last_step}")
    event = rollback_event(action, ledger, region, prev)
    return action, apply_event(ledger, event), event


# ---- the ladder as rungs ----------------------------------------------------------------------


@dataclass(frozen=True)
class Anomaly:
    """A persistent anomaly over training steps ``first[0]..last[0]`` (absolute data steps
    ``first[1]``, ``last[1]``), what a rung decides about."""

    first: tuple[int, int]
    last: tuple[int, int]
    reason: str
    checkpoints: tuple[CheckpointRef, ...]


class Rung(Protocol):
    """One rung of the ladder: a pure function of the ledger, the config and the anomaly.

    Returns ``(action, new_ledger, event)`` to decide, or None to pass to the next rung. ``event``
    is the journal record (``{"event": kind, ...}``) from which :func:`apply_event` rebuilds the new
    ledger on a restart (a rung that adds ledger state must extend ``apply_event`` for its kind).
    Rungs hold no mutable state (they run again, identically, on every rank)."""

    def __call__(self, ledger: Ledger, cfg: PolicyConfig, anomaly: Anomaly) -> tuple[Action, Ledger, dict] | None: ...


def rollback_rung(ledger: Ledger, cfg: PolicyConfig, anomaly: Anomaly) -> tuple[Action, Ledger, dict]:
    """Rungs 2-4 (rollback, rollback + LR cut + reseed, exit 78): the built-in last rung."""
    return decide_persistent(ledger, cfg, first=anomaly.first, last=anomaly.last,
                             checkpoints=anomaly.checkpoints, reason=anomaly.reason)


DEFAULT_RUNGS: tuple[Rung, ...] = (rollback_rung,)


def climb(rungs: Sequence[Rung], ledger: Ledger, cfg: PolicyConfig, anomaly: Anomaly) -> tuple[Action, Ledger, dict]:
    """The first rung that decides; the built-in rollback rung when none of ``rungs`` does."""
    for rung in rungs:
        decided = rung(ledger, cfg, anomaly)
        if decided is not None:
            return decided
    return rollback_rung(ledger, cfg, anomaly)
