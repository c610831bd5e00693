"""Fault-injection plan read from the environment, for tests and benchmarks of recovery.

``STREAMSHARD_FAULTS="kill@120:rank1,hang@300:rank0,spike@500,nan@700,slow@200-260:rank1=0.2,xid@800:rank0"``

Grammar of one comma-separated item: ``KIND@STEP[-STOP][:rankR][=VALUE]``

- ``kill``   SIGKILL this process at training step STEP (fires once per job: the firing is
             journaled before the signal, so the restarted job runs through that step).
- ``hang``   block forever in :func:`injected_hang` at training step STEP (fires once); the hang
             watchdog must catch it.
- ``xid``    the fake health probe reports XID ``VALUE`` (default 79, fallen off the bus) at STEP
             (fires once).
- ``spike``  multiply the loss of the batches at *absolute data steps* STEP..STOP (inclusive)
             by ``VALUE`` (default 50). Tied to the data, like a real bad batch: it recurs when
             the same data is served again and disappears once that data is skipped.
- ``nan``    the loss of the batch at data steps STEP..STOP becomes NaN (tied to data as well).
- ``corrupt`` flip one byte of the newest checkpoint's tensor file, then SIGKILL this process at
             STEP (fires once): the restart must quarantine that checkpoint and use the one before.
- ``slow``   sleep ``VALUE`` seconds (default 0.2) in the compute of every training step
             STEP..STOP (inclusive) on that rank.
- ``flaky``  a flaky device: multiply this rank's local loss, hence its gradients, by ``VALUE``
             (default 50) at training step STEP (fires once). Tied to the rank, not the data:
             spike forensics must call it hardware (recovery/forensics.py).

No rank means every rank. The plan is a frozen value; firing bookkeeping is the caller's.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from streamshard.errors import ConfigError

ENV_VAR = "STREAMSHARD_FAULTS"
KINDS = ("kill", "hang", "xid", "spike", "nan", "slow", "corrupt", "flaky")
ONCE_KINDS = frozenset({"kill", "hang", "xid", "corrupt", "flaky"})  # process-level faults fire once per job
DATA_KINDS = frozenset({"spike", "nan"})  # keyed by absolute data step, recur with the data
DEFAULT_VALUES = {"kill": 0.0, "hang": 0.0, "xid": 79.0, "spike": 50.0, "nan": 0.0, "slow": 0.2,
                  "corrupt": 0.0, "flaky": 50.0}

_ITEM = re.compile(
    r"^(?P<kind>[a-z]+)@(?P<start>\d+)(?:-(?P<stop>\d+))?(?::rank(?P<rank>\d+))?(?:=(?P<value>[-+0-9.eE]+))?$"
)


@dataclass(frozen=True)
class Fault:
    """One planned fault; ``start``/``stop`` inclusive; ``rank=None`` means every rank."""

    kind: str
    start: int
    stop: int
    rank: int | None = None
    value: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"fault kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.start < 0 or self.stop < self.start:
            raise ConfigError(f"fault steps must satisfy 0 <= start <= stop, got {self.start}-{self.stop}")
        if self.rank is not None and self.rank < 0:
            raise ConfigError(f"fault rank must be >= 0, got {self.rank}")

    @property
    def key(self) -> str:
        """Stable identity used to journal that a once-only fault fired."""
        rank = "" if self.rank is None else f":rank{self.rank}"
        return f"{self.kind}@{self.start}-{self.stop}{rank}"

    def applies(self, step: int, rank: int) -> bool:
        return self.start <= step <= self.stop and (self.rank is None or self.rank == rank)


@dataclass(frozen=True)
class FaultPlan:
    faults: tuple[Fault, ...] = ()

    def at(self, kind: str, step: int, rank: int) -> tuple[Fault, ...]:
        """Faults of ``kind`` that apply at ``step`` (training or data step, see module doc)."""
        return tuple(f for f in self.faults if f.kind == kind and f.applies(step, rank))

    def __bool__(self) -> bool:
        return bool(self.faults)


def parse_fault_plan(text: str) -> FaultPlan:
    """Parse the ``STREAMSHARD_FAULTS`` grammar; an unreadable item raises ConfigError naming it."""
    faults = []
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            continue
        m = _ITEM.match(item)
        if m is None:
            raise ConfigError(
                f"fault item {item!r} does not match KIND@STEP[-STOP][:rankR][=VALUE] "
                f"(e.g. 'kill@120:rank1', 'slow@200-260:rank1=0.2')"
            )
        kind = m["kind"]
        if kind not in KINDS:
            raise ConfigError(f"fault item {item!r}: kind must be one of {', '.join(KINDS)}, got {kind!r}")
        start = int(m["start"])
        stop = int(m["stop"]) if m["stop"] is not None else start
        try:
            value = float(m["value"]) if m["value"] is not None else DEFAULT_VALUES[kind]
        except ValueError:
            raise ConfigError(f"fault item {item!r}: value must be a number, got {m['value']!r}") from None
        rank = int(m["rank"]) if m["rank"] is not None else None
        faults.append(Fault(kind, start, stop, rank, value))
    return FaultPlan(tuple(faults))


def fault_plan_from_env(env: Mapping[str, str]) -> FaultPlan:
    """The plan in ``env[STREAMSHARD_FAULTS]``, empty when unset. ``env`` is passed in (os.environ)."""
    return parse_fault_plan(env.get(ENV_VAR, ""))


def injected_hang(max_seconds: float, sleep) -> None:
    """Block like a hung collective would. Bounded by ``max_seconds`` so a broken watchdog
    cannot leave an immortal process; ``sleep`` is injected (``time.sleep``)."""
    slices = max(1, int(max_seconds / 0.5))
    for _ in range(slices):
        sleep(0.5)
