"""From steps to mixture positions: a mixture's schedule and reweight ledger as weight segments.

A weight change "from step ``f``" starts at the first position of global batch ``f``: absolute
mixture position ``P0(f) = (f // S) * E + (f % S) * G`` (``S`` steps of ``G`` positions per
epoch of ``E``). From there on, every block of the new counts' ``M`` positions holds exactly the
new counts (:mod:`streamshard.sampler.segments`); positions before ``P0(f)`` keep their samples,
so steps before ``f`` are unchanged.

What is in force at a step: the mixture's weights, then its ``schedule`` (known in advance,
``Stream(weight=[(step, w), ...])``) up to the first reweight ledger entry, then the ledger's
entries (a reweight replaces the rest of the schedule; the ledger is a step function). An entry
whose counts equal those already in force is no entry at all, so adding it twice, or adding the
weights already in force, changes nothing (idempotent).
"""

from __future__ import annotations

from typing import Sequence, Union

from streamshard.errors import ConfigError
from streamshard.sampler.mixture import MixtureOrder
from streamshard.sampler.order import EpochOrder, check_int

Counts = tuple[int, ...]


def first_position(step: int, global_batch_size: int, steps_per_epoch: int, epoch_size: int) -> int:
    """``P0(step)``: the absolute mixture position of global batch ``step``'s first position."""
    epoch, j = divmod(step, steps_per_epoch)
    return epoch * epoch_size + j * global_batch_size


def _padded(entry: Sequence[int], n_streams: int) -> Counts:
    counts = tuple(entry[1:])
    if len(counts) > n_streams:
        raise ConfigError(f"reweight entry at step {entry[0]} has {len(counts)} counts for a "
                          f"mixture of {n_streams} streams")
    return counts + (0,) * (n_streams - len(counts))


def effective_entries(order: MixtureOrder, reweights: Sequence[Sequence[int]]
                      ) -> list[tuple[int, Counts]]:
    """``[(step, counts), ...]`` of every change in force after step 0's weights, no-ops
    (counts equal to those in force) dropped. A ledger entry at step 0 replaces the weights."""
    n = len(order.orders)
    ledger = [(int(e[0]), _padded(e, n)) for e in reweights]
    first = ledger[0][0] if ledger else None
    entries = [e for e in order.schedule_counts() if first is None or e[0] < first] + ledger
    out: list[tuple[int, Counts]] = []
    current = order.counts
    for step, counts in entries:
        if counts != current:
            out.append((step, counts))
            current = counts
    return out


def mixture_with_reweights(order: Union[EpochOrder, MixtureOrder], reweights: Sequence,
                           global_batch_size: int, steps_per_epoch: int):
    """``order`` with its schedule and the reweight ledger applied as position segments."""
    if isinstance(order, EpochOrder):
        if reweights:
            raise ConfigError("reweights need a mixture (a list of Stream), not a single dataset")
        return order
    cuts = [(first_position(step, global_batch_size, steps_per_epoch, order.epoch_size), counts)
            for step, counts in effective_entries(order, reweights)]
    return order.with_segments(cuts)


def counts_in_force(order: MixtureOrder, reweights: Sequence, step: int) -> Counts:
    """The counts per block in force at ``step``."""
    current = order.counts
    for s, counts in effective_entries(order, reweights):
        if s > step:
            break
        current = counts
    return current


def check_reweight_step(sequence, from_step: int) -> None:
    """Refuse a new reweight whose positions would reach steps before ``from_step``.

    Without reseeds a step reads its own positions, all before ``P0(from_step)``. A mixture
    reseed permutes the rest of an epoch (and every later epoch whole), so after one, a step
    before ``from_step`` in the same epoch may read a position at or after ``P0(from_step)``:
    the change must then start at an epoch's first step."""
    from_step = check_int(from_step, "from_step", minimum=0)
    if not isinstance(sequence.order, MixtureOrder):
        raise ConfigError("reweight needs a mixture (a list of Stream), not a single dataset")
    per_epoch = sequence.steps_per_epoch
    if from_step % per_epoch and any(r < from_step for r, _ in sequence.reseeds):
        first = (from_step // per_epoch + 1) * per_epoch
        raise ConfigError(
            f"cannot reweight from step {from_step}: a reseed at step "
            f"{min(r for r, _ in sequence.reseeds)} permutes this epoch's positions, so steps "
            f"already served may read positions after {from_step}'s; reweight from an epoch's "
            f"first step instead (the next is {first})")
