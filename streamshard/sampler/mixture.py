"""``MixtureOrder``: weighted, closed-form mixing of several ``EpochOrder`` streams.

Absolute mixture position ``P`` (counted from the start of training, not per epoch) lies in block
``b = P // M`` at slot ``m = P % M``. Stream ``s`` owns ``c_s`` slots of every block (largest
remainder rounding of ``M * w_s / sum(w)``, so the counts sum to ``M`` exactly), permuted within
the block by ``Permutation(M, derive_key(seed, "mix", b))``. The ``i``-th slot of stream ``s`` in
block ``b`` is its local position ``ell = b * c_s + i``; the stream's own epoch is
``ell // N_s`` and the sample is ``orders[s](ell // N_s, ell % N_s)``. Hence every aligned block
of ``M`` holds exactly ``c_s`` samples of stream ``s``, and every stream serves each of its
samples once per its own epoch (small streams repeat sooner). Seeking is O(1).
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Sequence

import numpy as np

from streamshard.errors import ConfigError
from streamshard.sampler.order import EpochOrder, check_int
from streamshard.sampler.permutation import M64, check_positions, derive_keys, permute_grouped

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
    """Smallest ``M >= 100`` whose largest-remainder split gives every stream a slot."""
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


class MixtureOrder:
    """Absolute mixture position -> ``(stream_ids, sample_ids)``; immutable and picklable."""

    def __init__(self, orders: Sequence[EpochOrder], weights: Sequence[float], *, seed: int,
                 block: int | None = None, epoch_size: int | None = None):
        orders = tuple(orders)
        if not orders:
            raise ConfigError("a mixture needs at least one stream, got 0")
        for s, order in enumerate(orders):
            if not isinstance(order, EpochOrder):
                raise ConfigError(f"stream {s} must be an EpochOrder, got {order!r:.80}")
            if order.size == 0:
                raise ConfigError(f"stream {s} has no samples")
        weights = tuple(weights)
        if len(weights) != len(orders):
            raise ConfigError(f"got {len(weights)} weights for {len(orders)} streams")
        for s, w in enumerate(weights):
            if isinstance(w, bool) or not isinstance(w, (int, float, np.integer, np.floating)) \
                    or not math.isfinite(w) or w <= 0:
                raise ConfigError(f"weight of stream {s} must be a positive number, got {w!r}")
        exact = [Fraction(float(w)) for w in weights]  # exact rational: no platform rounding
        self._orders = orders
        self._weights = tuple(float(w) for w in weights)
        self._seed = check_int(seed, "seed")
        self._block = default_block(exact) if block is None else check_int(
            block, "block", minimum=1)
        counts = block_counts(self._block, exact)
        for s, count in enumerate(counts):
            if count == 0:
                raise ConfigError(f"block={self._block} gives stream {s} (weight {weights[s]}) "
                                  f"no slot; use a larger block")
        self._counts = np.asarray(counts, dtype=np.int64)
        self._count_starts = np.concatenate([[0], np.cumsum(self._counts)]).astype(np.int64)
        self._sizes = np.asarray([o.size for o in orders], dtype=np.int64)
        self._epoch_size = (int(self._sizes.sum()) if epoch_size is None
                            else check_int(epoch_size, "epoch_size", minimum=1))

    orders = property(lambda self: self._orders)
    weights = property(lambda self: self._weights)
    seed = property(lambda self: self._seed)
    block = property(lambda self: self._block, doc="M, the block size.")
    epoch_size = property(lambda self: self._epoch_size, doc="Mixture positions per epoch.")

    @property
    def counts(self) -> tuple[int, ...]:
        """Slots per block for each stream (sums to ``block``)."""
        return tuple(int(c) for c in self._counts)

    def state_fields(self) -> dict:
        """JSON-able definition (weights, block, epoch size, seed and every stream's order)."""
        return {"seed": self._seed, "weights": list(self._weights), "block": self._block,
                "epoch_size": self._epoch_size,
                "streams": [order.state_fields() for order in self._orders]}

    def __repr__(self) -> str:
        return (f"MixtureOrder({len(self._orders)} streams, weights={self._weights}, "
                f"seed={self._seed}, block={self._block}, epoch_size={self._epoch_size})")

    def locate(self, positions):
        """(stream, stream epoch, position within that epoch) of absolute mixture positions."""
        pos, scalar = check_positions(positions, M64 >> 1, "mixture position")
        blk, slot = np.divmod(pos, self._block)
        blocks, group = np.unique(blk, return_inverse=True)
        keys = derive_keys((self._seed, "mix"), blocks)
        shuffled = permute_grouped(slot, self._block, keys, group.reshape(blk.shape))
        stream = np.searchsorted(self._count_starts, shuffled, side="right") - 1
        local = blk * self._counts[stream] + (shuffled - self._count_starts[stream])
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
