"""``Ledgers``: every run-time change to the sequence definition, carried as one value.

A ledger is part of the sequence definition (docs/SAMPLER.md), lives in the loader state and is
identical on every rank. Four exist:

- ``skips``: half-open ranges of absolute steps never served (merged, sorted);
- ``reseeds``: ``(step, salt)`` pairs (distinct, sorted);
- ``quarantine``: ``(stream, sample_id, from_step)`` sample ids never served from ``from_step`` on,
  their positions filled deterministically (:mod:`streamshard.sampler.quarantine`);
- ``reweights``: ``(from_step, c_0, c_1, ...)`` the mixture's slots per block for each stream
  from absolute step ``from_step`` on (one entry per step, sorted; trailing zero counts dropped,
  so a stream added later reads an older entry as 0; :mod:`streamshard.sampler.mixture`).

Every ledger is normalized on construction, so adding an entry twice, or merging two copies of a
ledger in any order, gives the same value. Code that moves ledgers around (loader, plan, state,
recovery) passes this one value, so a new ledger is one field here, not an edit in five places.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Iterable, Mapping

from streamshard.errors import ConfigError
from streamshard.sampler.order import check_int
from streamshard.sampler.quarantine import normalize_quarantine


def normalize_skips(ranges: Iterable) -> tuple[tuple[int, int], ...]:
    """Sorted, merged half-open step ranges; overlapping and adjacent ranges are united."""
    pairs = []
    for item in ranges:
        start, stop = item
        start = check_int(start, "skip start", minimum=0)
        stop = check_int(stop, "skip stop", minimum=0)
        if stop < start:
            raise ConfigError(f"skip range must have start <= stop, got [{start}, {stop})")
        if stop > start:  # an empty range skips nothing
            pairs.append((start, stop))
    merged: list[tuple[int, int]] = []
    for start, stop in sorted(pairs):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], stop))
        else:
            merged.append((start, stop))
    return tuple(merged)


def normalize_reseeds(entries: Iterable) -> tuple[tuple[int, int], ...]:
    """Distinct (step, salt) pairs sorted by step, then salt."""
    pairs = set()
    for item in entries:
        step, salt = item
        pairs.add((check_int(step, "reseed step", minimum=0),
                   check_int(salt, "reseed salt", minimum=0)))  # salts are keys: never negative
    return tuple(sorted(pairs))


def normalize_reweights(entries: Iterable) -> tuple[tuple[int, ...], ...]:
    """One ``(from_step, counts...)`` per step, sorted by step, trailing zero counts dropped.

    Two entries for one step (two copies merged) keep the greater counts tuple: an arbitrary but
    order-free choice; ``reweight`` itself replaces its step's entry before merging."""
    by_step: dict[int, tuple[int, ...]] = {}
    for item in entries:
        row = tuple(item)
        if len(row) < 2:
            raise ConfigError(f"reweight entry must be (from_step, count, ...), got {item!r:.80}")
        step = check_int(row[0], "reweight from_step", minimum=0)
        counts = [check_int(c, "reweight count", minimum=0) for c in row[1:]]
        while counts and counts[-1] == 0:
            counts.pop()
        if not counts:
            raise ConfigError(f"reweight entry at step {step} gives every stream 0 slots")
        counts = tuple(counts)
        by_step[step] = max(by_step.get(step, counts), counts)
    return tuple((step,) + by_step[step] for step in sorted(by_step))


_NORMALIZE = {"skips": normalize_skips, "reseeds": normalize_reseeds,
              "quarantine": normalize_quarantine, "reweights": normalize_reweights}
# Ledgers a state saved by an older streamshard may lack (read as empty).
OPTIONAL = frozenset({"quarantine", "reweights"})
# Row width of each ledger; None: at least 2 (a step and one count per stream).
_WIDTH = {"skips": 2, "reseeds": 2, "quarantine": 3, "reweights": None}


@dataclass(frozen=True)
class Ledgers:
    """All ledgers of a sequence; hashable, normalized, JSON-able through :meth:`to_state`."""

    skips: tuple[tuple[int, int], ...] = ()
    reseeds: tuple[tuple[int, int], ...] = ()
    quarantine: tuple[tuple[int, int, int], ...] = ()
    reweights: tuple[tuple[int, ...], ...] = ()

    def __post_init__(self) -> None:
        for f in fields(self):
            object.__setattr__(self, f.name, _NORMALIZE[f.name](getattr(self, f.name)))

    # -- building -------------------------------------------------------------------------------
    def merged(self, other: "Ledgers") -> "Ledgers":
        """Everything either value knows (commutative, idempotent)."""
        return Ledgers(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})

    def with_skip(self, start: int, stop: int) -> "Ledgers":
        return self.merged(Ledgers(skips=((start, stop),)))

    def with_reseed(self, step: int, salt: int) -> "Ledgers":
        return self.merged(Ledgers(reseeds=((step, salt),)))

    def with_quarantine(self, entries: Iterable) -> "Ledgers":
        """Add ``(stream, sample_id, from_step)`` entries (an existing id keeps the earlier step)."""
        return self.merged(Ledgers(quarantine=tuple(entries)))

    def without_quarantine(self, ids: Iterable) -> "Ledgers":
        """Drop the entries of ``(stream, sample_id)`` pairs (a human's decision: the CLI's
        ``quarantine remove``; recovery never removes)."""
        drop = {(int(s), int(i)) for s, i in ids}
        return replace(self, quarantine=tuple(e for e in self.quarantine if e[:2] not in drop))

    def with_reweight(self, from_step: int, counts) -> "Ledgers":
        """The mixture's counts from ``from_step`` on: replaces an entry at that step."""
        kept = tuple(e for e in self.reweights if e[0] != from_step)
        return replace(self, reweights=kept + ((from_step, *counts),))

    def __bool__(self) -> bool:
        return any(getattr(self, f.name) for f in fields(self))

    # -- state ----------------------------------------------------------------------------------
    def to_state(self) -> dict[str, list[list[int]]]:
        """``{"skips": [[a, b], ...], "reseeds": [...], "quarantine": [[s, id, f], ...],
        "reweights": [[step, c0, c1, ...], ...]}``."""
        return {f.name: [list(e) for e in getattr(self, f.name)] for f in fields(self)}

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> "Ledgers":
        """Read the ledger keys of a loader state (untrusted): every row must be a list of ints
        of the ledger's width; a missing optional ledger is empty. Raises ``ConfigError``."""
        values = {}
        for name in cls.names():
            if name not in state:
                if name in OPTIONAL:
                    continue
                raise ConfigError(f"loader state has no {name!r} ledger")
            rows = state[name]
            if not isinstance(rows, list) or not all(
                isinstance(r, (list, tuple))
                and (len(r) == _WIDTH[name] if _WIDTH[name] else len(r) >= 2)
                # type(): a bool is not a step; < 2**63: steps, salts and ids are int64s (each
                # ledger's normalizer names a negative value by what it is)
                and all(type(x) is int and x < 2**63 for x in r) for r in rows
            ):
                text = repr(rows)
                shape = ", ".join(["int"] * _WIDTH[name]) if _WIDTH[name] else "int, int, ..."
                raise ConfigError(f"{name} must be a list of [{shape}] "
                                  f"with ints below 2**63, got {text[:100]}")
            values[name] = tuple(tuple(r) for r in rows)
        return cls(**values)
