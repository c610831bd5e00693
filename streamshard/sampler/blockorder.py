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
  ``z = u'*c + Permutation(c, derive_key(seed, e, "unit", l, u'))(k % c)``;
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


def lane_offsets(k: np.ndarray, lane: np.ndarray, lane_start: np.ndarray, lane_size: np.ndarray,
                 groups: BlockGroups, seed: int, epoch: int) -> np.ndarray:
    """Shuffled-space positions of lane indices ``k`` (arrays of equal shape, caller-checked)."""
    c = groups.unit
    p0 = np.minimum((-lane_start) % c, lane_size)
    m = (lane_size - p0) // c
    body = k < m * c
    u = np.where(body, k // c, 0)
    unit_keys = derive_keys((seed, epoch, "units"), lane)
    u2 = permute_array(u, np.where(body, m, 1), unit_keys)
    inner_keys = derive_keys((seed, epoch, "unit"), lane, u2)
    j2 = permute_array(np.where(body, k - u * c, 0), np.where(body, c, 1), inner_keys)
    edge_n = lane_size - m * c
    edge_keys = derive_keys((seed, epoch, "edge"), lane)
    e2 = permute_array(np.where(body, 0, k - m * c), np.where(body, 1, edge_n), edge_keys)
    z = np.where(body, u2 * c + j2, m * c + e2)
    return lane_start + (z + p0) % np.maximum(lane_size, 1)
