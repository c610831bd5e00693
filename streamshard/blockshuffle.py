"""What the block-aware shuffle needs from an index: samples per block and the block cache size.

The sampler is pure and never reads shards, so ``k`` (samples per block) comes from the index:

- a fixed-size schema packs exactly ``max(1, (block_size - 16) // (row + 8))`` samples per block
  (the writer's rule: a raw block is a 16-byte header plus 8 bytes of offset and the payload per
  sample, closed before the sample that would pass ``block_size``), every block but a dataset's
  last one; this is exact, so units never share a block (docs/SAMPLER.md);
- otherwise ``max(1, block_size // (raw_bytes / samples))``: samples larger than a block are
  blocks of one (exact again), and for mixed sizes the estimate only sets how many samples a
  unit holds; unit edges then fall inside blocks whatever ``k`` is, which costs about one extra
  decompression per unit (``1 + 1/g`` blocks per block, measured in docs/SAMPLER.md).
"""

from __future__ import annotations

from streamshard.index import DatasetIndex
from streamshard.sampler.blockorder import DEFAULT_BLOCKS_PER_GROUP, BlockGroups

# Margin on the per-lane working set: LRU order is not exactly lane order at unit changes.
_CACHE_MARGIN = 1.25


def samples_per_block(index: DatasetIndex) -> int:
    """``k`` for ``index`` (see the module docstring); 1 for an empty dataset."""
    block = index.block_size
    fixed = index.schema.fixed_size
    if block > 0 and fixed is not None:
        return max(1, (block - 16) // (fixed + 8))
    n = index.num_samples
    raw = sum(index.shards.raw_bytes.tolist())  # exact Python ints
    if n == 0 or raw == 0 or block <= 0:
        return 1
    return max(1, (block * n) // raw)


def block_groups(index: DatasetIndex, blocks_per_group: int = DEFAULT_BLOCKS_PER_GROUP
                 ) -> BlockGroups:
    """The ``BlockGroups`` to pass to ``EpochOrder`` for this dataset."""
    return BlockGroups(samples_per_block(index), blocks_per_group)


def cache_bytes_needed(index: DatasetIndex, groups: BlockGroups, lanes_read: int) -> int:
    """Decompressed bytes a reader of ``lanes_read`` lanes keeps in flight: each lane holds its
    current unit (``g`` blocks, ``g + 1`` when unaligned), and at the end of an epoch its edge
    (a tail and a head piece, up to twice that)."""
    n = index.num_samples
    raw = sum(index.shards.raw_bytes.tolist())
    per_sample = raw / n if n else 0.0
    block_raw = max(float(index.block_size), per_sample * groups.samples_per_block)
    return int(lanes_read * 2 * (groups.blocks_per_group + 1) * block_raw * _CACHE_MARGIN)
