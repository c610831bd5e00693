"""Block-aware shuffle: inside each lane, groups of ``g`` blocks are read one at a time.

A zstd shard stores samples in blocks of ~64 KiB that decompress as a whole, so a shuffle that
visits a block's samples at scattered times decompresses the block once per sample. In this mode
(``EpochOrder(..., blocks=BlockGroups(k, g))``) a lane's samples are cut into *units* of
``c = g * k`` consecutive samples (``k`` = samples per block as the writer packs them): the
units of a lane are permuted, and the samples inside a unit are permuted, so a lane reads one
unit (``g`` blocks) at a time and each block is decompressed once per epoch per reader, as long
as the reader's block cache holds ``lanes x (g + 1)`` blocks. Global batches still take one
sample from each of ``L`` lanes in turn, hence from many shards.

Alignment (docs/SAMPLER.md "Block groups"): units start at multiples of ``c`` of the shuffled
space. Every shard starts a new block and a fixed-size schema packs exactly ``k`` samples per
block, so if every shard before a position holds a multiple of ``k`` samples, each multiple of
``k`` is a block boundary; the slot order therefore puts *regular* shards (``n % k == 0``) first
and the others (a dataset's short last shard, one per merged part) after them. With ``k`` exact
no unit shares a block with another, except the ``L - 1`` units cut by lane boundaries.

Lane ``l`` (samples ``[ls, ls + n)`` of the shuffled space, as in window mode) is rotated by
``p0 = (-ls) mod c`` (clamped to ``n``) so that its ``m = (n - p0) // c`` aligned units come
first and the *edge* (its tail piece, then its head piece: ``n - m*c`` samples, fewer than
``2c``) last. Lane index ``k`` maps to rotated index ``z``:

- ``k < m*c``: ``u = k // c``, ``u' = Permutation(m, derive_key(seed, e, "units", l))(u)``,
  ``z = u'*c + affine_permute(k % c, c, derive_key(seed, e, "unit", l, u'))`` (an affine map
  mod ``c``, below: a unit's samples share their blocks, so a cheap bijection does there);
- otherwise ``z = m*c + Permutation(n - m*c, derive_key(seed, e, "edge", l))(k - m*c)``;

then the shuffled-space position is ``ls + (z + p0) mod n``. All O(1) per position.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from streamshard.errors import ConfigError
from streamshard.sampler.permutation import Permutation, derive_key, derive_keys, permute_array

DEFAULT_BLOCKS_PER_GROUP = 16


@dataclass(frozen=True)
class BlockGroups:
    """How the block-aware shuffle groups samples: ``samples_per_block`` (``k``, what the writer
    packs in one block; an estimate is fine, it only costs decompressions when wrong) and
    ``blocks_per_group`` (``g``: blocks a lane reads at a time; the shuffle-quality knob).
    A hashable, picklable value."""

    samples_per_block: int
    blocks_per_group: int = DEFAULT_BLOCKS_PER_GROUP

    def __post_init__(self) -> None:
        for name in ("samples_per_block", "blocks_per_group"):
            value = getattr(self, name)
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) \
                    or value < 1:
                raise ConfigError(f"{name} must be a positive int, got {value!r}")
            object.__setattr__(self, name, int(value))

    @property
    def unit(self) -> int:
        """``c = g * k``: samples in one unit."""
        return self.samples_per_block * self.blocks_per_group

    def state_fields(self) -> list[int]:
        return [self.samples_per_block, self.blocks_per_group]


def slot_order(sizes: np.ndarray, groups: BlockGroups, seed: int, epoch: int) -> np.ndarray:
    """Slot -> shard for one epoch: regular shards (``size % k == 0``, empty ones included)
    permuted by ``derive_key(seed, epoch, "shards")``, then the others by ``"shards-tail"``."""
    regular = np.flatnonzero(sizes % groups.samples_per_block == 0)
    other = np.flatnonzero(sizes % groups.samples_per_block != 0)
    parts = []
    for members, name in ((regular, "shards"), (other, "shards-tail")):
        if members.size:
            perm = Permutation(int(members.size), derive_key(seed, epoch, name))
            parts.append(members[perm(np.arange(members.size, dtype=np.int64))])
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def affine_permute(x: np.ndarray, n: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Keyed bijection of ``[0, n)`` per element: ``(a * x + b) mod n``.

    ``b = key mod n``; ``a`` is the first value coprime with ``n`` among
    ``2 + ((key >> 32) mod (n - 2))``, then the next ones cyclically in ``[2, n)`` (``n - 1``
    always is one), so the map is a bijection and never a mere rotation; ``a = 1`` for
    ``n <= 2``. Cheap (no cycle walking) and
    only used inside a unit, whose samples all come from the same few blocks anyway.
    """
    x, n, k = np.broadcast_arrays(np.asarray(x, np.int64), np.asarray(n, np.int64),
                                  np.asarray(keys, np.uint64))
    nn = np.maximum(n, 1).astype(np.uint64)
    b = (k % nn).astype(np.int64)
    span = np.maximum(n - 2, 1).astype(np.uint64)
    a = np.where(n > 2, 2 + ((k >> np.uint64(32)) % span).astype(np.int64), 1)
    bad = np.flatnonzero(np.gcd(a, n) != 1)
    while bad.size:  # the gap between coprimes is small (Jacobsthal's function): a few rounds
        a[bad] = 2 + (a[bad] - 1) % (n[bad] - 2)  # a + 1, wrapping n - 1 -> 2
        bad = bad[np.gcd(a[bad], n[bad]) != 1]
    # (a*x + b) mod n without int64 overflow: a, x < n and n*n may exceed 2^63 only for
    # n > 3e9 samples in one unit, which a unit of g blocks never reaches.
    return np.where(n > 1, (a * x + b) % np.maximum(n, 1), 0)


def lane_offsets(k: np.ndarray, lane: np.ndarray, lane_start: np.ndarray, lane_size: np.ndarray,
                 groups: BlockGroups, seed: int, epoch: int) -> np.ndarray:
    """Shuffled-space positions of lane indices ``k`` (arrays of equal shape, caller-checked).

    A call maps many positions of few units: the unit permutation (a Feistel network, whose
    cost is ~80 numpy calls per cycle-walking pass) runs once per distinct ``(lane, unit)``.
    """
    shape = np.shape(k)
    k, lane, lane_start, lane_size = (np.ravel(a) for a in np.broadcast_arrays(
        k, lane, lane_start, lane_size))
    c = groups.unit
    p0 = np.minimum((-lane_start) % c, lane_size)
    m = (lane_size - p0) // c
    z = np.empty(k.shape, dtype=np.int64)
    body = k < m * c
    idx = np.flatnonzero(body)
    if idx.size:
        kb, lb, mb = k[idx], lane[idx], m[idx]
        u = kb // c
        pair = lb * (int(mb.max()) + 1) + u
        uniq, first, inverse = np.unique(pair, return_index=True, return_inverse=True)
        ul, um, uu = lb[first], mb[first], u[first]
        u2 = permute_array(uu, um, derive_keys((seed, epoch, "units"), ul))
        inner = derive_keys((seed, epoch, "unit"), ul, u2)
        z[idx] = u2[inverse] * c + affine_permute(kb - u * c, c, inner[inverse])
    idx = np.flatnonzero(~body)
    if idx.size:
        ke, le, me = k[idx], lane[idx], m[idx]
        edge_n = lane_size[idx] - me * c
        z[idx] = me * c + permute_array(ke - me * c, edge_n,
                                        derive_keys((seed, epoch, "edge"), le))
    return (lane_start + (z + p0) % np.maximum(lane_size, 1)).reshape(shape)
