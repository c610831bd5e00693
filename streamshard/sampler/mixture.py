"""``MixtureOrder``: weighted, closed-form mixing of several ``EpochOrder`` streams.

Absolute mixture position ``P`` (counted from the start of training, not per epoch) lies in block
``b = P // M`` at slot ``m = P % M``. Stream ``s`` owns ``c_s`` slots of every block (largest
remainder rounding of ``M * w_s / sum(w)``, so the counts sum to ``M`` exactly), permuted within
the block by ``Permutation(M, derive_key(seed, "mix", b))``. The ``i``-th slot of stream ``s`` in
block ``b`` is its local position ``ell = b * c_s + i``; the stream's own epoch is
``ell // N_s`` and the sample is ``orders[s](ell // N_s, ell % N_s)``. Hence every aligned block
of ``M`` holds exactly ``c_s`` samples of stream ``s``, and every stream serves each of its
samples once per its own epoch (small streams repeat sooner). Seeking is O(1).

Weights that change (a ``schedule`` known in advance, or the sequence's reweight ledger) are
*segments* starting at absolute positions, each with its own counts and blocks from its first
position (:mod:`streamshard.sampler.segments`); a stream's local positions stay contiguous
across them. A weight may be 0 (the stream gets no slot: removed, or not joined yet).
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Sequence

import numpy as np

from streamshard.errors import ConfigError
from streamshard.sampler.order import EpochOrder, check_int
from streamshard.sampler.permutation import M64, check_positions
from streamshard.sampler.segments import build_segments, locate_local

MIN_BLOCK = 100
# Default-block search stops here: weights this skewed need an explicit `block`.
MAX_DEFAULT_BLOCK = 1_000_000


def block_counts(block: int, weights: Sequence[Fraction]) -> list[int]:
    """Largest-remainder split of ``block`` slots by ``weights``; ties go to the lower index."""
    total = sum(weights)
    quotas = [block * w / total for w in weights]
    counts = [math.floor(q) for q in quotas]
    by_remainder = sorted(range(len(weights)), key=lambda s: (-(quotas[s] - counts[s]), s))
    for s in by_remainder[: block - sum(counts)]:
        counts[s] += 1
    return counts


def default_block(weights: Sequence[Fraction]) -> int:
    """Smallest ``M >= 100`` whose largest-remainder split gives every positive weight a slot."""
    weights = [w for w in weights if w > 0]  # a zero weight never gets a slot (remainder 0)
    # M >= sum(w) / min(w) guarantees floor(M * w_s / sum(w)) >= 1, so the search terminates.
    bound = max(MIN_BLOCK, math.ceil(sum(weights) / min(weights)))
    if bound > MAX_DEFAULT_BLOCK:
        raise ConfigError(f"weights too skewed for a default block (smallest share "
                          f"{float(min(weights) / sum(weights)):.3g} needs up to {bound} slots); "
                          f"pass block= explicitly")
    for block in range(MIN_BLOCK, bound + 1):
        if min(block_counts(block, weights)) >= 1:
            return block
    return bound




def check_weights(weights: Sequence, what: str) -> tuple[float, ...]:
    """Finite non-negative numbers, at least one positive (a 0 gives that stream no slot)."""
    weights = tuple(weights)
    for s, w in enumerate(weights):
        if isinstance(w, bool) or not isinstance(w, (int, float, np.integer, np.floating)) \
                or not math.isfinite(w) or w < 0:
            raise ConfigError(f"weight of stream {s}{what} must be a non-negative number, got {w!r}")
    if weights and not any(w > 0 for w in weights):
        raise ConfigError(f"weights{what} must have at least one positive value, got {list(weights)}")
    return tuple(float(w) for w in weights)


def _exact(weights: Sequence[float]) -> list[Fraction]:
    return [Fraction(float(w)) for w in weights]  # exact rational: no platform rounding


class MixtureOrder:
    """Absolute mixture position -> ``(stream_ids, sample_ids)``; immutable and picklable.

    ``schedule``: ``((step, weights), ...)`` weights known in advance from absolute data steps
    ``> 0`` (the sequence turns steps into positions); ``segments``: ``((position, counts),
    ...)`` the counts in force from absolute mixture positions ``>= 0`` (set by
    :class:`~streamshard.sampler.sequence.SampleSequence` from the schedule and the reweight
    ledger through :meth:`with_segments`).
    """

    def __init__(self, orders: Sequence[EpochOrder], weights: Sequence[float], *, seed: int,
                 block: int | None = None, epoch_size: int | None = None,
                 schedule: Sequence = (), segments: Sequence = ()):
        orders = tuple(orders)
        if not orders:
            raise ConfigError("a mixture needs at least one stream, got 0")
        for s, order in enumerate(orders):
            if not isinstance(order, EpochOrder):
                raise ConfigError(f"stream {s} must be an EpochOrder, got {order!r:.80}")
            if order.size == 0:
                raise ConfigError(f"stream {s} has no samples")
        weights = check_weights(weights, "")
        if len(weights) != len(orders):
            raise ConfigError(f"got {len(weights)} weights for {len(orders)} streams")
        self._schedule = _check_schedule(schedule, len(orders))
        self._orders = orders
        self._weights = weights
        self._seed = check_int(seed, "seed")
        if block is None:
            self._block = max(default_block(_exact(w)) for w in
                              [weights] + [w for _, w in self._schedule])
        else:
            self._block = check_int(block, "block", minimum=1)
        counts = self._counts_of(weights, "")
        for step, w in self._schedule:
            self._counts_of(w, f" (schedule step {step})")
        self._counts = np.asarray(counts, dtype=np.int64)
        self._sizes = np.asarray([o.size for o in orders], dtype=np.int64)
        self._epoch_size = (int(self._sizes.sum()) if epoch_size is None
                            else check_int(epoch_size, "epoch_size", minimum=1))
        self._cuts = _check_segments(segments, len(orders))
        # A segment at position 0 (a reweight from step 0) replaces the counts of the weights.
        cuts = list(self._cuts) if self._cuts and self._cuts[0][0] == 0 else \
            [(0, tuple(counts))] + list(self._cuts)
        self._segments = build_segments(self._seed, cuts)

    def _counts_of(self, weights: Sequence[float], where: str) -> list[int]:
        counts = block_counts(self._block, _exact(weights))
        for s, count in enumerate(counts):
            if count == 0 and weights[s] > 0:
                raise ConfigError(f"block={self._block} gives stream {s} (weight {weights[s]}"
                                  f"{where}) no slot; use a larger block")
        return counts

    orders = property(lambda self: self._orders)
    weights = property(lambda self: self._weights, doc="Weights at position 0.")
    seed = property(lambda self: self._seed)
    block = property(lambda self: self._block, doc="M, the block size at position 0.")
    epoch_size = property(lambda self: self._epoch_size, doc="Mixture positions per epoch.")
    schedule = property(lambda self: self._schedule, doc="((step, weights), ...) known in advance.")
    segments = property(lambda self: self._cuts, doc="((position, counts), ...) after position 0.")

    @property
    def counts(self) -> tuple[int, ...]:
        """Slots per block for each stream at position 0 (sums to ``block``)."""
        return tuple(int(c) for c in self._counts)

    def counts_for(self, weights: Sequence[float]) -> tuple[int, ...]:
        """Slots per block for ``weights`` (one per stream, >= 0): split over this mixture's
        block, or over the default block of ``weights`` when that leaves a positive weight
        without a slot (the block is the sum of the counts, so a segment may change it)."""
        weights = check_weights(weights, "")
        if len(weights) != len(self._orders):
            raise ConfigError(f"got {len(weights)} weights for {len(self._orders)} streams")
        exact = _exact(weights)
        counts = block_counts(self._block, exact)
        if any(c == 0 and w > 0 for c, w in zip(counts, weights)):
            counts = block_counts(default_block(exact), exact)
        return tuple(counts)

    def schedule_counts(self) -> tuple[tuple[int, tuple[int, ...]], ...]:
        """The schedule as ``((step, counts), ...)``."""
        return tuple((step, tuple(self._counts_of(w, ""))) for step, w in self._schedule)

    def with_segments(self, segments: Sequence) -> "MixtureOrder":
        """The same mixture with ``segments`` (``((position, counts), ...)``) instead."""
        if tuple(tuple((int(p), tuple(c))) for p, c in segments) == self._cuts:
            return self
        return MixtureOrder(self._orders, self._weights, seed=self._seed, block=self._block,
                            epoch_size=self._epoch_size, schedule=self._schedule,
                            segments=segments)

    def state_fields(self) -> dict:
        """JSON-able definition (weights, block, epoch size, seed, every stream's order and the
        schedule when there is one; segments come from the sequence's ledger)."""
        fields = {"seed": self._seed, "weights": list(self._weights), "block": self._block,
                  "epoch_size": self._epoch_size,
                  "streams": [order.state_fields() for order in self._orders]}
        if self._schedule:  # absent without one: older states stay valid
            fields["schedule"] = [[step, list(w)] for step, w in self._schedule]
        return fields

    def __repr__(self) -> str:
        return (f"MixtureOrder({len(self._orders)} streams, weights={self._weights}, "
                f"seed={self._seed}, block={self._block}, epoch_size={self._epoch_size}"
                + (f", schedule={self._schedule}" if self._schedule else "")
                + (f", {len(self._cuts)} segments" if self._cuts else "") + ")")

    def locate(self, positions):
        """(stream, stream epoch, position within that epoch) of absolute mixture positions."""
        pos, scalar = check_positions(positions, M64 >> 1, "mixture position")
        stream, local = locate_local(self._segments, self._seed, pos)
        epoch, within = np.divmod(local, self._sizes[stream])
        if scalar:
            return int(stream), int(epoch), int(within)
        return stream.astype(np.int64), epoch, within

    def __call__(self, positions):
        """(stream_ids, sample_ids) at absolute mixture positions (int or int64 array)."""
        stream, epoch, within = self.locate(positions)
        if np.ndim(stream) == 0:
            return stream, self._orders[stream](epoch, within)
        samples = np.empty(stream.shape, dtype=np.int64)
        for s, order in enumerate(self._orders):
            in_s = stream == s
            if not in_s.any():
                continue
            epochs_s, within_s = epoch[in_s], within[in_s]
            first = int(epochs_s.min())
            if first == int(epochs_s.max()):  # the usual case: one stream epoch per request
                samples[in_s] = order.map_checked(first, within_s)
                continue
            out = np.empty(epochs_s.shape, dtype=np.int64)
            # One call per stream epoch touched: many only for streams much smaller than a batch.
            for e in np.unique(epochs_s).tolist():
                at = epochs_s == e
                out[at] = order.map_checked(e, within_s[at])
            samples[in_s] = out
        return stream, samples


def _check_schedule(schedule: Sequence, n_streams: int) -> tuple:
    out, last = [], 0
    for item in schedule:
        try:
            step, weights = item
        except (TypeError, ValueError):
            raise ConfigError(f"schedule entry must be (step, weights), got {item!r:.80}") from None
        step = check_int(step, "schedule step", minimum=1)
        if step <= last:
            raise ConfigError(f"schedule steps must increase, got {step} after {last}")
        weights = check_weights(weights, f" at schedule step {step}")
        if len(weights) != n_streams:
            raise ConfigError(f"schedule step {step} has {len(weights)} weights for "
                              f"{n_streams} streams")
        out.append((step, weights))
        last = step
    return tuple(out)


def _check_segments(segments: Sequence, n_streams: int) -> tuple:
    out, last = [], -1
    for start, counts in segments:
        start = check_int(start, "segment position", minimum=0)
        if start <= last:
            raise ConfigError(f"segment positions must increase, got {start} after {last}")
        counts = tuple(check_int(c, "segment count", minimum=0) for c in counts)
        if len(counts) != n_streams or not sum(counts):
            raise ConfigError(f"segment at {start} needs {n_streams} counts, not all 0, "
                              f"got {list(counts)}")
        out.append((start, counts))
        last = start
    return tuple(out)
