"""``SampleSequence``: the served sequence of global batches, with skip and reseed ledgers.

A *step* is an absolute data step, the global batch index counted from epoch 0:
``epoch = step // S``, ``j = step % S``, and global batch ``step`` is epoch positions
``[j*G, (j+1)*G)``. Which rank of ``D`` reads which of them is fixed by
:class:`streamshard.sampler.assign.Assignment` (lanes owned by nodes; rank sizes within one).
An epoch position goes through the epoch's reseeds, then through the order (docs/SAMPLER.md).
Every call is pure and costs O(#skips + #reseeds) besides the vectorized mapping.
"""

from __future__ import annotations

import bisect
from math import ceil
from typing import Iterable, Iterator, Union

import numpy as np

from streamshard.errors import ConfigError
from streamshard.lru import LRU
from streamshard.sampler.assign import Assignment
from streamshard.sampler.ledgers import Ledgers, normalize_reseeds, normalize_skips  # noqa: F401
from streamshard.sampler.ledgers import normalize_reweights
from streamshard.sampler.mixture import MixtureOrder
from streamshard.sampler.reweight import check_reweight_step, mixture_with_reweights
from streamshard.sampler.order import EpochOrder, check_int
from streamshard.sampler.permutation import derive_key, derive_keys, permute_array
from streamshard.sampler.quarantine import fill as fill_quarantine
from streamshard.sampler.quarantine import normalize_quarantine, table_of

Order = Union[EpochOrder, MixtureOrder]
# Derived (reseeded) EpochOrders kept per sequence; one per distinct set of earlier salts.
_ORDER_CACHE_SIZE = 8


class SampleSequence:
    """The whole served sequence for one order and global batch size ``G``.

    Immutable (``with_skip`` / ``with_reseed`` return new sequences) and picklable.
    ``drop_last=True`` serves ``S = E // G`` steps per epoch and never serves the last ``E % G``
    positions; ``drop_last=False`` serves ``ceil(E / G)`` steps, and positions ``p >= E`` of the
    last one wrap to ``p % E``: the pad repeats the first samples of the same epoch.
    """

    def __init__(self, order: Order, *, global_batch_size: int, drop_last: bool = True,
                 skips: Iterable = (), reseeds: Iterable = (), quarantine: Iterable = (),
                 reweights: Iterable = ()):
        if not isinstance(order, (EpochOrder, MixtureOrder)):
            raise ConfigError(f"order must be an EpochOrder or MixtureOrder, got {order!r:.80}")
        if not isinstance(drop_last, (bool, np.bool_)):
            raise ConfigError(f"drop_last must be a bool, got {drop_last!r}")
        self._order = order
        self._g = check_int(global_batch_size, "global_batch_size", minimum=1)
        self._drop_last = bool(drop_last)
        self._e = order.size if isinstance(order, EpochOrder) else order.epoch_size
        self._steps = self._e // self._g if self._drop_last else ceil(self._e / self._g)
        if self._steps == 0:
            raise ConfigError(
                f"an epoch has no step: epoch_size E={self._e} and global_batch_size "
                f"G={self._g} with drop_last={self._drop_last}")
        self._skips = normalize_skips(skips)
        self._skip_starts = [start for start, _ in self._skips]
        self._reseeds = normalize_reseeds(reseeds)
        self._quarantine = normalize_quarantine(quarantine)  # docs: sampler/quarantine.py
        self._quarantine_table = table_of(self._quarantine)
        self._reweights = normalize_reweights(reweights)
        self._mixed = mixture_with_reweights(order, self._reweights, self._g, self._steps)
        self._orders: LRU[int, EpochOrder] = LRU(_ORDER_CACHE_SIZE)
        self._assignments: dict[tuple[int, int], Assignment] = {}

    # -- description ----------------------------------------------------------------------
    order = property(lambda self: self._order)
    global_batch_size = property(lambda self: self._g)
    drop_last = property(lambda self: self._drop_last)
    skips = property(lambda self: self._skips, doc="Normalized skip ledger ((start, stop), ...).")
    reseeds = property(lambda self: self._reseeds, doc="Sorted reseed ledger ((step, salt), ...).")
    quarantine = property(lambda self: self._quarantine,
                          doc="Quarantine ledger ((stream, sample_id, from_step), ...).")
    reweights = property(lambda self: self._reweights,
                         doc="Reweight ledger ((from_step, count_0, count_1, ...), ...).")
    mixture = property(lambda self: self._mixed,
                       doc="The order with the schedule and reweights applied (what is served).")

    @property
    def ledgers(self):
        """All ledgers as one :class:`~streamshard.sampler.ledgers.Ledgers` value."""
        return Ledgers(self._skips, self._reseeds, self._quarantine, self._reweights)

    @property
    def epoch_size(self) -> int:
        """E: positions per epoch (N for an EpochOrder, ``epoch_size`` for a mixture)."""
        return self._e

    @property
    def steps_per_epoch(self) -> int:
        """S: ``E // G`` with drop_last, else ``ceil(E / G)``."""
        return self._steps

    @property
    def lanes(self) -> int:
        """Residue classes a reseed preserves: the order's lanes, 1 for a mixture."""
        return self._order.lanes if isinstance(self._order, EpochOrder) else 1

    def state_fields(self) -> dict:
        """JSON-able definition of the sequence, for the loader state and strict restore."""
        fields = {"kind": "epoch" if isinstance(self._order, EpochOrder) else "mixture",
                  "global_batch_size": self._g, "drop_last": self._drop_last,
                  "epoch_size": self._e, "steps_per_epoch": self._steps}
        fields.update(self._order.state_fields())
        fields["skips"] = [list(pair) for pair in self._skips]
        fields["reseeds"] = [list(pair) for pair in self._reseeds]
        fields["quarantine"] = [list(entry) for entry in self._quarantine]
        fields["reweights"] = [list(entry) for entry in self._reweights]
        return fields

    def __repr__(self) -> str:
        return (f"SampleSequence({self._order!r}, global_batch_size={self._g}, "
                f"drop_last={self._drop_last}, skips={self._skips}, reseeds={self._reseeds}, "
                f"quarantine={self._quarantine}"
                + (f", reweights={self._reweights})" if self._reweights else ")"))

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_orders"] = LRU(_ORDER_CACHE_SIZE)
        state["_assignments"] = {}
        return state

    # -- ledgers --------------------------------------------------------------------------
    def _replace(self, skips, reseeds, quarantine=None, reweights=None) -> "SampleSequence":
        return SampleSequence(self._order, global_batch_size=self._g, drop_last=self._drop_last,
                              skips=skips, reseeds=reseeds,
                              quarantine=self._quarantine if quarantine is None else quarantine,
                              reweights=self._reweights if reweights is None else reweights)

    def with_ledgers(self, ledgers) -> "SampleSequence":
        """The same order and batch size with ``ledgers`` (a ``Ledgers``) instead of these."""
        return self._replace(ledgers.skips, ledgers.reseeds, ledgers.quarantine,
                             ledgers.reweights)

    def with_reweight(self, from_step: int, counts) -> "SampleSequence":
        """A sequence serving a mixture's ``counts`` per block from step ``from_step`` on
        (replacing an entry at that step; checked by
        :func:`streamshard.sampler.reweight.check_reweight_step`)."""
        check_reweight_step(self, from_step)
        return self._replace(self._skips, self._reseeds,
                             reweights=self.ledgers.with_reweight(from_step, counts).reweights)

    def with_quarantine(self, stream: int, sample_id: int, from_step: int) -> "SampleSequence":
        """A sequence that never serves ``sample_id`` of ``stream`` from step ``from_step`` on."""
        return self._replace(self._skips, self._reseeds,
                             self._quarantine + ((stream, sample_id, from_step),))

    def with_skip(self, start: int, stop: int) -> "SampleSequence":
        """A sequence that never serves steps ``[start, stop)`` (united with earlier skips)."""
        return self._replace(self._skips + ((start, stop),), self._reseeds)

    def with_reseed(self, step: int, salt: int) -> "SampleSequence":
        """A sequence whose positions from ``step`` on are re-permuted with ``salt``."""
        return self._replace(self._skips, self._reseeds + ((step, salt),))

    def next_served_step(self, step: int) -> int:
        """Smallest step ``>= step`` outside every skip range."""
        step = check_int(step, "step", minimum=0)
        i = bisect.bisect_right(self._skip_starts, step) - 1
        if i >= 0 and step < self._skips[i][1]:
            return self._skips[i][1]  # merged ranges never touch, so one jump suffices
        return step

    def nth_served_step(self, start: int, n: int) -> int:
        """The ``n``-th (0-based) served step at or after ``start``, in O(#skips)."""
        n = check_int(n, "n", minimum=0)
        step = self.next_served_step(start)
        i = bisect.bisect_right(self._skip_starts, step)
        for skip_start, skip_stop in self._skips[i:]:
            gap = skip_start - step  # served steps before this skip
            if n < gap:
                break
            n -= gap
            step = skip_stop
        return step + n

    def served_run(self, start: int, count: int, stop: int) -> list[int]:
        """The first ``count`` served steps at or after ``start`` and before ``stop`` (fewer
        when ``stop`` comes first), in O(#skips + count) without a call per step."""
        count = check_int(count, "count", minimum=0)
        stop = check_int(stop, "stop", minimum=0)
        step = self.next_served_step(start)
        i = bisect.bisect_right(self._skip_starts, step)
        out: list[int] = []
        while len(out) < count and step < stop:
            gap_end = self._skips[i][0] if i < len(self._skips) else stop
            end = min(gap_end, stop, step + count - len(out))
            out.extend(range(step, end))
            step = end
            if i < len(self._skips) and step == gap_end:
                step = self._skips[i][1]
                i += 1
        return out

    def served_steps(self, start: int, stop: int) -> Iterator[int]:
        """Served steps in ``[start, stop)``, in order."""
        step = self.next_served_step(start)
        stop = check_int(stop, "stop", minimum=0)
        while step < stop:
            yield step
            step = self.next_served_step(step + 1)

    # -- batches --------------------------------------------------------------------------
    def assignment(self, world_size: int, local_world_size: int = 1) -> Assignment:
        """The split of every global batch among ``world_size`` ranks (cached)."""
        world_size = check_int(world_size, "world_size", minimum=1)
        local_world_size = check_int(local_world_size, "local_world_size", minimum=1)
        key = (world_size, local_world_size)
        found = self._assignments.get(key)
        if found is None:
            found = Assignment(self._g, self.lanes, world_size, local_world_size)
            cache = dict(self._assignments) if len(self._assignments) < _ORDER_CACHE_SIZE else {}
            cache[key] = found
            self._assignments = cache
        return found

    def step_positions(self, step: int) -> np.ndarray:
        """Epoch positions of global batch ``step``: ``[j*G, (j+1)*G)``, pad-wrapped."""
        step = check_int(step, "step", minimum=0)
        j = step % self._steps
        pos = j * self._g + np.arange(self._g, dtype=np.int64)
        if not self._drop_last:
            pos %= self._e  # only the last step of an epoch has positions >= E
        return pos

    def device_positions(self, step: int, rank: int, world_size: int,
                         local_world_size: int = 1) -> np.ndarray:
        """Epoch positions rank ``rank`` reads in step ``step`` (in the step's order, before
        reseeds).

        ``G // D`` or ``G // D + 1`` of them (:func:`streamshard.sampler.assign.rank_sizes`);
        the ranks' positions partition the step's ``G`` positions."""
        rank = check_int(rank, "rank", minimum=0)
        assignment = self.assignment(world_size, local_world_size)
        if rank >= world_size:
            raise ConfigError(f"rank must be < world_size={world_size}, got {rank}")
        return assignment.split(self.step_positions(step), rank)

    def device_positions_of(self, steps, rank: int, world_size: int,
                            local_world_size: int = 1) -> list[np.ndarray]:
        """``[device_positions(s, ...) for s in steps]``, vectorized over the steps whose
        positions do not wrap (all but a ``drop_last=False`` epoch's padded last step)."""
        if isinstance(steps, range) and steps.start >= 0:  # checked ints already
            first = np.arange(steps.start, steps.stop, steps.step, dtype=np.int64)
        else:
            steps = [check_int(s, "step", minimum=0) for s in steps]
            first = np.asarray(steps, dtype=np.int64)
        assignment = self.assignment(world_size, local_world_size)
        first = (first % self._steps) * self._g
        wraps = first + self._g > self._e
        if not wraps.any():
            return list(assignment.split_contiguous(first, rank))
        return [self.device_positions(s, rank, world_size, local_world_size) for s in steps]

    def batch(self, step: int, rank: int = 0, world_size: int = 1,
              local_world_size: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """(stream_ids, sample_ids) of rank ``rank``'s part of global batch ``step``."""
        pos = self.device_positions(step, rank, world_size, local_world_size)
        return self.map_positions(step // self._steps, pos)

    def global_batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """The whole global batch ``step`` in position order (world-independent)."""
        return self.map_positions(step // self._steps, self.step_positions(step))

    def map_positions(self, epoch: int, positions) -> tuple[np.ndarray, np.ndarray]:
        """(stream_ids, sample_ids) at epoch positions (int64 array in ``[0, E)``) of ``epoch``,
        quarantined samples replaced by their fill (:mod:`streamshard.sampler.quarantine`)."""
        return self.map_positions_marked(epoch, positions)[:2]

    def map_positions_marked(self, epoch: int, positions) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``map_positions`` plus a bool array marking quarantine fills."""
        pos = np.asarray(positions, dtype=np.int64)
        streams, samples = self._map_raw(epoch, pos)
        return fill_quarantine(self._quarantine, epoch, pos, streams, samples, steps=self._steps,
                               g=self._g, e=self._e, drop_last=self._drop_last, raw=self._map_raw,
                               table=self._quarantine_table)

    def _map_raw(self, epoch: int, positions) -> tuple[np.ndarray, np.ndarray]:
        epoch = check_int(epoch, "epoch", minimum=0)
        pos = np.asarray(positions, dtype=np.int64)
        if pos.size and (pos.min() < 0 or pos.max() >= self._e):
            bad = int(pos.min()) if pos.min() < 0 else int(pos.max())
            raise IndexError(f"epoch position {bad} out of range [0, {self._e})")
        first_step = epoch * self._steps
        within = [(r, salt) for r, salt in self._reseeds
                  if first_step <= r < first_step + self._steps]
        for r, salt in reversed(within):  # latest reseed first, then earlier ones
            pos = self._reseed_map(pos, r, salt)
        salts = [salt for r, salt in self._reseeds if r < first_step]
        if isinstance(self._order, EpochOrder):
            samples = self._epoch_order(salts)(epoch, pos)
            return np.zeros(pos.shape, dtype=np.int64), samples
        if salts:  # a mixture's later epochs are re-permuted as a whole (docs/SAMPLER.md)
            key = derive_key(self._order.seed, "reseed-epoch", *salts, epoch)
            pos = self._class_permute(pos, 0, 1, key)
        return self._mixed(epoch * self._e + pos)

    def _epoch_order(self, salts: list[int]) -> EpochOrder:
        if not salts:
            return self._order
        seed = derive_key(self._order.seed, *salts)
        order = self._orders.get(seed)
        if order is None:
            order = self._order.reseeded(seed)
            self._orders.put(seed, order)
        return order

    def _reseed_map(self, pos: np.ndarray, r: int, salt: int) -> np.ndarray:
        """Apply the reseed at step r: permute ``[p0, E)`` within residue classes mod L."""
        p0 = (r % self._steps) * self._g
        keys = derive_keys((salt, "reseed", r), (pos - p0) % self.lanes)
        return self._class_permute(pos, p0, self.lanes, keys)

    def _class_permute(self, pos, p0: int, lanes: int, keys) -> np.ndarray:
        """Positions ``p0 + c + lanes*i`` (< E) permuted in i within each class c, by key."""
        moved = pos >= p0  # wrapped pad positions are already < E
        rel = pos - p0
        cls = rel % lanes
        count = np.maximum((self._e - p0 - cls + lanes - 1) // lanes, 0)
        new_i = permute_array(np.where(moved, rel // lanes, 0), np.where(moved, count, 1), keys)
        return np.where(moved, p0 + cls + lanes * new_i, pos)

    def working_set_shards(self, rank: int, world_size: int, local_world_size: int = 1) -> int:
        """Upper bound on distinct shards rank ``rank`` needs at the same time.

        Per stream: lanes the rank reads (:meth:`Assignment.lanes_read`; every lane of a
        mixture's streams, whose lanes are not the sequence's) x (shards a window of ``W`` samples can touch
        + 1, for the step into the next window), capped at the shard count; with
        ``shuffle=False`` the shards a run of ``G`` samples touches + 1. Summed over the streams
        of a mixture. The padded last step of a ``drop_last=False`` epoch re-reads the epoch's
        first positions and may exceed the bound for that one step.
        """
        self.device_positions(0, rank, world_size, local_world_size)  # validates the world
        if isinstance(self._order, EpochOrder):
            orders = [self._order]
            lanes = [self.assignment(world_size, local_world_size).lanes_read(rank)]
        else:
            orders = list(self._order.orders)
            lanes = [order.lanes for order in orders]
        total = 0
        for order, lanes_read in zip(orders, lanes):
            if order.shuffle:
                need = lanes_read * (order.shards_per_lane_at_once() + 1)
            else:
                need = order.shards_touched_by_run(self._g) + 1
            total += min(need, order.num_shards)
        return total
