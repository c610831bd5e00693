"""``StreamingDataset``: the sampler's sequence served as rank batches inside PyTorch.

A map-style dataset: ``__getitems__`` serves one rank batch. What to read comes from a batch
sampler in the main process (:class:`streamshard.batch_keys.StreamingBatchSampler`), which owns
the sequence and the state and hands workers :class:`~streamshard.batch_keys.BatchKey` values
(step, sample ids, prefetch hints): workers hold no state, so ``num_workers`` may change between
save and resume. Three ways to drive it (docs/LOADER.md):

- ``StreamingDataLoader(ds)``: one line; counts consumed batches, owns the checkpoint state.
- ``DataLoader(ds, batch_sampler=ds.batch_sampler(), collate_fn=...)``, or torchdata's
  ``StatefulDataLoader`` the same way: its state holds the sampler's, so resume is arithmetic.
- ``DataLoader(ds, batch_size=ds.batch_size)``: indices ``0..len(ds)-1`` of ``ds.set_epoch(e)``'s
  epoch, cut in this rank's batches; another batch size is a ``ConfigError`` at the first batch.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch.utils.data

from streamshard import blockshuffle, fastpath
from streamshard.batch_keys import BatchKey, Columns, StreamingBatchSampler, Tagged
from streamshard.collate import collate, token_dtype_of
from streamshard.errors import ConfigError
from streamshard.reader import DEFAULT_BLOCK_CACHE, Dataset, open_dataset
from streamshard.sampler import EpochOrder, Ledgers, MixtureOrder, SampleSequence, derive_key, sample_rng
from streamshard.sampler.order import default_lanes
from streamshard.world import World, detect_world

Transform = Callable[[dict, np.random.Generator], Any]


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


def _resolve_batch(batch_size: int | None, global_batch_size: int | None, world: World) -> int:
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


class StreamingDataset(torch.utils.data.Dataset):
    """Rank batches of one dataset or a weighted mixture, in the sampler's global order.

    ``source`` is a path/URL or a list of :class:`Stream`. Exactly one of ``batch_size`` (per
    device) and ``global_batch_size``. ``world`` defaults to :func:`detect_world` (no collectives).
    ``transform(sample, rng)`` gets a per-sample generator from ``sample_rng(seed, epoch, stream,
    sample_id)``, so augmentations are the same whatever the world size. Opening reads only the
    index (remote: fetched once into ``cache_dir``); shards are read lazily.
    """

    def __init__(
        self,
        source: str | Sequence[Stream],
        *,
        batch_size: int | None = None,
        global_batch_size: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        lanes: int | None = None,
        window: int | None = None,
        drop_last: bool = True,
        world: World | None = None,
        transform: Transform | None = None,
        cache_dir: str | None = None,
        cache_limit: int | str | None = None,
        storage_options: dict | None = None,
        epoch_size: int | None = None,
        mixture_block: int | None = None,
        lookahead: int = 16,
        block_cache: int | str | None = None,
        block_shuffle: bool | None = None,
        blocks_per_group: int = blockshuffle.DEFAULT_BLOCKS_PER_GROUP,
        token_dtype: torch.dtype | None = torch.int64,
    ):
        super().__init__()
        streams = [Stream(source, 1.0, storage_options)] if isinstance(source, str) else list(source)
        if not streams or not all(isinstance(s, Stream) for s in streams):
            raise ConfigError(f"source must be a path/URL or a non-empty list of Stream, got {source!r}")
        if not isinstance(seed, int) or seed < 0:
            raise ConfigError(f"seed must be a non-negative int, got {seed!r}")
        self.world = world if world is not None else detect_world()
        self.global_batch_size = _resolve_batch(batch_size, global_batch_size, self.world)
        self.seed, self.shuffle, self.transform = seed, shuffle, transform
        # uint16/uint32 token arrays come out in this dtype from the default collation.
        self.token_dtype = token_dtype_of(token_dtype)
        self.collate_fn = functools.partial(collate, token_dtype=self.token_dtype)
        # Set by StreamingDataLoader(pin_memory=True, num_workers=0): gather into pinned memory.
        self.pin_memory = False
        self.streams = tuple(streams)
        self.datasets: tuple[Dataset, ...] = tuple(
            open_dataset(
                s.source,
                cache_dir=cache_dir,
                cache_limit=cache_limit,
                storage_options=s.storage_options if s.storage_options is not None else storage_options,
                block_cache=DEFAULT_BLOCK_CACHE if block_cache is None else block_cache,
            )
            for s in streams
        )
        if block_shuffle is not None and not isinstance(block_shuffle, bool):
            raise ConfigError(f"block_shuffle must be a bool or None, got {block_shuffle!r}")
        # The block-aware shuffle (docs/SAMPLER.md) is the default for compressed shards only:
        # uncompressed shards are mmapped, a random sample costs no more than a sequential one.
        groups = [
            blockshuffle.block_groups(ds.index, blocks_per_group)
            if shuffle and (block_shuffle if block_shuffle is not None
                            else ds.index.compression is not None) else None
            for ds in self.datasets
        ]
        orders = [
            EpochOrder(
                [info.samples for info in ds.index.shards],
                # One stream keeps the user's seed; mixture members get distinct derived keys so
                # two copies of one dataset in a mixture are not read in lockstep.
                seed=seed if len(streams) == 1 else derive_key(seed, i),
                shuffle=shuffle,
                # One stream: lanes sized for locality at any world size (fixed into the state
                # by the first run); a mixture's streams keep EpochOrder's default.
                lanes=(default_lanes(len(ds.index.shards), self.global_batch_size)
                       if lanes is None and len(streams) == 1 else lanes),
                window=window,
                blocks=groups[i],
            )
            for i, ds in enumerate(self.datasets)
        ]
        if len(orders) == 1 and epoch_size is None:
            order: EpochOrder | MixtureOrder = orders[0]
        else:
            order = MixtureOrder(
                orders, [s.weight for s in streams], seed=seed, block=mixture_block, epoch_size=epoch_size
            )
        if not isinstance(lookahead, int) or lookahead < 1:
            raise ConfigError(f"lookahead must be a positive int, got {lookahead!r}")
        self.lookahead = lookahead
        self._remote = [hasattr(ds.source, "check_budget") for ds in self.datasets]
        # Lanes left to the default are fixed by the first run: a saved state's lanes win.
        self._lanes_adoptable = lanes is None and isinstance(order, EpochOrder)
        self._set_sequence(SampleSequence(
            order, global_batch_size=self.global_batch_size, drop_last=drop_last
        ))
        if block_cache is None:  # sized to what the block-aware shuffle keeps in flight
            for ds, stream_order in zip(self.datasets, orders):
                if stream_order.blocks is not None:
                    lanes_read = (self.sequence.assignment(
                        self.world.world_size, self.world.local_world_size).lanes_read(self.world.rank)
                        if stream_order is order else stream_order.lanes)
                    ds.reserve_block_cache(blockshuffle.cache_bytes_needed(
                        ds.index, stream_order.blocks, lanes_read))
        self._epoch = 0  # the epoch plain ``DataLoader(ds, batch_size=...)`` indices refer to
        # Batches of a single fixed-size-schema stream without a transform can be read as
        # columns straight into tensors (streamshard.fastpath); None when that does not apply.
        self._columns = (fastpath.layout(self.datasets[0].schema)
                         if len(self.datasets) == 1 and transform is None else None)

    def _set_sequence(self, sequence: SampleSequence) -> None:
        self.sequence = sequence
        self.steps_per_epoch = sequence.steps_per_epoch
        self.working_set_shards = sequence.working_set_shards(
            self.world.rank, self.world.world_size, self.world.local_world_size)
        self._ledger_cache = None
        for ds, remote in zip(self.datasets, self._remote):
            if remote:
                # A budget that cannot hold what one device reads at once would deadlock on
                # pins: refuse it now. And pin no more shards than that working set.
                ds.source.check_budget(self.working_set_shards)
                ds.max_open_shards = max(1, min(ds.max_open_shards, self.working_set_shards))

    def adopt_saved_lanes(self, saved_sequence: Any) -> Callable[[], None]:
        """Take a saved state's ``lanes`` when this dataset's were left to the default (the
        first run fixes them; states from before the locality default hold 64). Returns an undo
        callable (the loader calls it if the rest of the state does not validate)."""
        old = self.sequence
        lanes = saved_sequence.get("lanes") if isinstance(saved_sequence, dict) else None
        if (not self._lanes_adoptable or isinstance(lanes, bool) or not isinstance(lanes, int)
                or lanes < 1 or lanes == old.order.lanes):
            return lambda: None
        self._set_sequence(SampleSequence(old.order.with_lanes(lanes),
                                          global_batch_size=old.global_batch_size,
                                          drop_last=old.drop_last))
        return lambda: self._set_sequence(old)

    # -- plain DataLoader usage -------------------------------------------------------------
    def batch_sampler(self, *, columnar: bool = False) -> StreamingBatchSampler:
        """A batch sampler for ``DataLoader(ds, batch_sampler=...)`` or torchdata's
        ``StatefulDataLoader``: one key per served step of this rank, Stateful.
        ``columnar=True`` returns fixed-size schemas already collated (dicts of tensors)."""
        return StreamingBatchSampler(self, columnar=columnar)

    def set_epoch(self, epoch: int) -> None:
        """The epoch that plain integer indices (``DataLoader(ds, batch_size=B)``) refer to."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ConfigError(f"epoch must be a non-negative int, got {epoch!r}")
        self._epoch = epoch

    def is_remote(self, stream: int) -> bool:
        return self._remote[stream]

    @property
    def batch_size(self) -> int:
        """Samples in this rank's batches: ``G // D`` or ``G // D + 1`` (fixed per rank)."""
        return int(self.sequence.assignment(self.world.world_size,
                                            self.world.local_world_size).rank_sizes()[self.world.rank])

    @property
    def fingerprints(self) -> list[str]:
        return [ds.fingerprint for ds in self.datasets]

    def __len__(self) -> int:
        """Samples this rank reads per epoch (``steps_per_epoch * batch_size``): the indices a
        plain ``DataLoader(ds, batch_size=ds.batch_size)`` draws."""
        return self.steps_per_epoch * self.batch_size

    # -- random access ------------------------------------------------------------------------
    def __getitem__(self, index: Any) -> Any:
        """A :class:`BatchKey`'s rank batch. A single integer is refused with a ``ConfigError``
        naming the fix: items of this dataset are whole rank batches (a plain
        ``DataLoader(ds, batch_size=None)`` would otherwise yield unbatched samples)."""
        if isinstance(index, BatchKey):
            return self.__getitems__(index)
        raise ConfigError(
            f"StreamingDataset[{index!r}]: this dataset serves whole rank batches, not single "
            f"indices: use StreamingDataLoader(ds), DataLoader(ds, batch_size={self.batch_size}) "
            "or DataLoader(ds, batch_sampler=ds.batch_sampler()); one sample of the data is "
            "ds.datasets[stream][sample_id]")

    # -- iteration ----------------------------------------------------------------------------
    def sequence_with(self, ledgers: Ledgers = Ledgers()) -> SampleSequence:
        """The base sequence with ``ledgers`` applied (cached: the sequence depends on the
        ledgers only, not on which steps a plan serves)."""
        cached = self._ledger_cache
        if cached is not None and cached[0] == ledgers:
            return cached[1]
        seq = self.sequence.with_ledgers(ledgers)
        self._ledger_cache = (ledgers, seq)
        return seq

    def fetch(self, step: int, stream_ids: np.ndarray, sample_ids: np.ndarray) -> list:
        """Read (and transform) the samples of one device batch, in order."""
        epoch = step // self.steps_per_epoch
        out = []
        for stream, sample in zip(stream_ids.tolist(), sample_ids.tolist()):
            item = self.datasets[stream][sample]
            if self.transform is not None:
                item = self.transform(item, sample_rng(self.seed, epoch, stream, sample))
            out.append(item)
        return out

    def __getitems__(self, key: Any) -> Any:
        """One rank batch: for a :class:`BatchKey`, its samples (or columns when ``columnar``,
        ``(step, batch)`` when ``tagged``); for a list of ints from ``DataLoader(ds,
        batch_size=B)``, the rank batch those indices cut out of ``set_epoch``'s epoch."""
        if not isinstance(key, BatchKey):
            key = self._key_of_indices(key)
        for stream, shard in key.prefetch:
            ds = self.datasets[stream]
            ds.source.prefetch([ds.index.shards[shard]])
        if key.columnar and self._columns is not None:
            batch = fastpath.read_batch(self.datasets[0], self._columns,
                                        np.asarray(key.sample_ids, dtype=np.int64),
                                        token_dtype=self.token_dtype, pin_memory=self.pin_memory)
            batch = Columns(batch)
        else:
            batch = self.fetch(key.step, np.asarray(key.stream_ids, dtype=np.int64),
                               np.asarray(key.sample_ids, dtype=np.int64))
        return Tagged(key.step, batch) if key.tagged else batch

    def __iter__(self) -> Iterator[Any]:
        """This rank's batches of ``set_epoch``'s epoch, read in this process (no DataLoader,
        no collation): ``for batch in ds`` as with the iterable datasets of other libraries."""
        sampler = self.batch_sampler()
        sampler.set_epoch(self._epoch)
        for key in sampler:
            yield self.__getitems__(key)

    def _key_of_indices(self, indices: Any) -> BatchKey:
        idx = [int(i) for i in indices]
        size = self.batch_size
        if not idx or len(idx) != size or idx[0] % size or idx != list(range(idx[0], idx[0] + size)):
            raise ConfigError(
                f"a DataLoader batch of {len(idx)} indices starting at {idx[0] if idx else None} is "
                f"not one of this rank's batches of {size}: pass the dataset's batch size to the "
                f"DataLoader (batch_size={size}) or use batch_sampler=ds.batch_sampler()")
        if idx[-1] >= len(self):
            raise IndexError(f"index {idx[-1]} out of range [0, {len(self)})")
        step = self._epoch * self.steps_per_epoch + idx[0] // size
        world = self.world
        streams, samples = self.sequence.batch(step, world.rank, world.world_size,
                                               world.local_world_size)
        return BatchKey(step, tuple(streams.tolist()), tuple(samples.tolist()))

    def __repr__(self) -> str:
        names = ", ".join(f"{s.source}(w={s.weight:g})" for s in self.streams)
        return (
            f"StreamingDataset([{names}], global_batch_size={self.global_batch_size}, "
            f"steps_per_epoch={self.steps_per_epoch}, {self.world})"
        )
