"""What a loader reads, without torch: the :class:`Stream` value, the batch-size rule, opening the
streams and building the sampler order. ``StreamingDataset`` (PyTorch) and
``NumpyBatchIterator`` (numpy / JAX) both build their sequence here, so for the same arguments
they serve the same global batches and save the same state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

from streamshard import blockshuffle
from streamshard.errors import ConfigError
from streamshard.reader import DEFAULT_BLOCK_CACHE, Dataset, open_dataset
from streamshard.sampler import EpochOrder, MixtureOrder, SampleSequence, derive_key
from streamshard.sampler.order import default_lanes
from streamshard.world import World


@dataclass(frozen=True)
class Stream:
    """One dataset of a weighted mixture. ``weight`` is relative; it need not sum to 1."""

    source: str
    weight: float = 1.0
    storage_options: dict | None = field(default=None, compare=False, hash=False)

    def __post_init__(self) -> None:
        if not isinstance(self.source, str) or not self.source:
            raise ConfigError(f"Stream source must be a path or URL string, got {self.source!r}")
        if not (isinstance(self.weight, (int, float)) and math.isfinite(self.weight)) or self.weight <= 0:
            raise ConfigError(f"Stream weight must be a positive number, got {self.weight!r}")


def resolve_batch(batch_size: int | None, global_batch_size: int | None, world: World) -> int:
    """The global batch size from exactly one of ``batch_size`` (per device) and
    ``global_batch_size``."""
    if (batch_size is None) == (global_batch_size is None):
        raise ConfigError(
            "give exactly one of batch_size (per device) and global_batch_size, "
            f"got batch_size={batch_size!r}, global_batch_size={global_batch_size!r}"
        )
    if batch_size is not None:
        if not isinstance(batch_size, int) or batch_size <= 0:
            raise ConfigError(f"batch_size must be a positive int, got {batch_size!r}")
        return batch_size * world.world_size
    if not isinstance(global_batch_size, int) or global_batch_size <= 0:
        raise ConfigError(f"global_batch_size must be a positive int, got {global_batch_size!r}")
    return global_batch_size  # any world size: rank batches differ by at most one sample


def as_streams(source: str | Sequence[Stream], storage_options: dict | None) -> tuple[Stream, ...]:
    """``source`` (a path/URL or a list of :class:`Stream`) as a non-empty tuple of streams."""
    streams = [Stream(source, 1.0, storage_options)] if isinstance(source, str) else list(source)
    if not streams or not all(isinstance(s, Stream) for s in streams):
        raise ConfigError(f"source must be a path/URL or a non-empty list of Stream, got {source!r}")
    return tuple(streams)


def open_streams(streams: Sequence[Stream], *, cache_dir: str | None, cache_limit: Any,
                 storage_options: dict | None, block_cache: Any,
                 verify_blocks: bool = True) -> tuple[Dataset, ...]:
    """Open every stream's dataset (index only; shards are read lazily)."""
    return tuple(
        open_dataset(
            s.source,
            cache_dir=cache_dir,
            cache_limit=cache_limit,
            storage_options=s.storage_options if s.storage_options is not None else storage_options,
            block_cache=DEFAULT_BLOCK_CACHE if block_cache is None else block_cache,
            verify_blocks=verify_blocks,
        )
        for s in streams
    )


def build_order(datasets: Sequence[Dataset], streams: Sequence[Stream], *, seed: int,
                shuffle: bool, lanes: int | None, window: int | None, epoch_size: int | None,
                mixture_block: int | None, block_shuffle: bool | None = None,
                blocks_per_group: int = blockshuffle.DEFAULT_BLOCKS_PER_GROUP,
                global_batch_size: int | None = None,
                ) -> tuple[EpochOrder | MixtureOrder, list[EpochOrder]]:
    """``(order, per-stream orders)``: the sampler order of one dataset, or of a weighted
    mixture (docs/SAMPLER.md), and the order of each stream in it. ``lanes=None`` with one
    stream and a ``global_batch_size`` is ``default_lanes(#shards, G)`` (locality at any world
    size); a mixture's streams keep ``EpochOrder``'s own default."""
    if not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"seed must be a non-negative int, got {seed!r}")
    if block_shuffle is not None and not isinstance(block_shuffle, bool):
        raise ConfigError(f"block_shuffle must be a bool or None, got {block_shuffle!r}")
    # The block-aware shuffle (docs/SAMPLER.md) is the default for compressed shards only:
    # uncompressed shards are mmapped, a random sample costs no more than a sequential one.
    groups = [
        blockshuffle.block_groups(ds.index, blocks_per_group)
        if shuffle and (block_shuffle if block_shuffle is not None
                        else ds.index.compression is not None) else None
        for ds in datasets
    ]
    orders = [
        EpochOrder(
            ds.index.shards.samples,
            # One stream keeps the user's seed; mixture members get distinct derived keys so
            # two copies of one dataset in a mixture are not read in lockstep.
            seed=seed if len(streams) == 1 else derive_key(seed, i),
            shuffle=shuffle,
            lanes=(default_lanes(len(ds.index.shards), global_batch_size)
                   if lanes is None and len(streams) == 1 and global_batch_size is not None
                   else lanes),
            window=window,
            blocks=groups[i],
        )
        for i, ds in enumerate(datasets)
    ]
    if len(orders) == 1 and epoch_size is None:
        return orders[0], orders
    return MixtureOrder(orders, [s.weight for s in streams], seed=seed, block=mixture_block,
                        epoch_size=epoch_size), orders


def reserve_block_caches(datasets: Sequence[Dataset], orders: Sequence[EpochOrder],
                         world: World, sequence: SampleSequence) -> None:
    """Size each block cache to what the block-aware shuffle keeps in flight on this rank (when
    the user left ``block_cache`` to the default): lanes the rank reads (the sequence's rank
    split for one stream; every lane of a mixture's streams)."""
    for ds, order in zip(datasets, orders):
        if order.blocks is not None:
            lanes_read = (sequence.assignment(world.world_size, world.local_world_size)
                          .lanes_read(world.rank) if sequence.order is order else order.lanes)
            ds.reserve_block_cache(blockshuffle.cache_bytes_needed(ds.index, order.blocks,
                                                                  lanes_read))
