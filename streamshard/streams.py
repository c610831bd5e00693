"""What a loader reads, without torch: the :class:`Stream` value, the batch-size rule, opening the
streams and building the sampler order. ``StreamingDataset`` (PyTorch) and
``NumpyBatchIterator`` (numpy / JAX) both build their sequence here, so for the same arguments
they serve the same global batches and save the same state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from streamshard import blockshuffle
from streamshard.errors import ConfigError
from streamshard.options import resolve as resolve_options
from streamshard.packing import check_column, check_config
from streamshard.reader import DEFAULT_BLOCK_CACHE, Dataset, open_dataset
from streamshard.sampler import (
    BlockGroups, EpochOrder, Ledgers, MixtureOrder, SampleSequence, derive_key,
)
from streamshard.sampler.order import DEFAULT_MAX_LANES, default_lanes
from streamshard.world import World, detect_world


def _number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


@dataclass(frozen=True)
class Stream:
    """One dataset (a member) of a mixture, and how much of it the mixture takes.

    Relative sampling: ``weight`` (need not sum to 1; 0 gives the stream no slot until a
    reweight), or a piecewise schedule known in advance, ``[(step, weight), ...]`` from step 0
    in increasing absolute data steps: the same as reweight ledger entries at those steps, so a
    resume anywhere is exact. Absolute sampling (MosaicML Streaming's ``repeat``/``choose``):
    ``repeat=2.5`` takes ``round(2.5 * N)`` samples of the stream per mixture epoch,
    ``choose=n`` exactly ``n``; the mixture epoch is the sum. Absolute and relative sampling
    are exclusive (docs/LOADER.md).
    """

    source: str
    weight: float | tuple[tuple[int, float], ...] = 1.0
    storage_options: dict | None = field(default=None, compare=False, hash=False)
    repeat: float | None = None
    choose: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.source, str) or not self.source:
            raise ConfigError(f"Stream source must be a path or URL string, got {self.source!r}")
        if isinstance(self.weight, (list, tuple)):
            object.__setattr__(self, "weight", _schedule(self.weight, self.source))
        elif not _number(self.weight) or self.weight < 0:
            raise ConfigError(f"Stream weight must be a non-negative number or a list of "
                              f"(step, weight) pairs, got {self.weight!r}")
        if self.repeat is not None and (not _number(self.repeat) or self.repeat <= 0):
            raise ConfigError(f"Stream repeat must be a positive number, got {self.repeat!r}")
        if self.choose is not None and (isinstance(self.choose, bool)
                                        or not isinstance(self.choose, int) or self.choose <= 0):
            raise ConfigError(f"Stream choose must be a positive int, got {self.choose!r}")
        if self.repeat is not None and self.choose is not None:
            raise ConfigError(f"Stream {self.source}: give repeat or choose, not both")
        if self.absolute and self.weight != 1.0:
            raise ConfigError(
                f"Stream {self.source}: repeat/choose (samples per epoch) and weight (a relative "
                f"share) are exclusive: a mixture samples by one or the other")

    @property
    def absolute(self) -> bool:
        """Sampled by ``repeat``/``choose`` rather than by a relative weight."""
        return self.repeat is not None or self.choose is not None

    @property
    def schedule(self) -> tuple[tuple[int, float], ...]:
        """``((step, weight), ...)``: ``((0, weight),)`` for a constant weight."""
        return self.weight if isinstance(self.weight, tuple) else ((0, float(self.weight)),)

    def weight_at(self, step: int) -> float:
        """The relative weight in force at absolute data step ``step``."""
        return [w for s, w in self.schedule if s <= step][-1]

    def samples_per_epoch(self, size: int) -> int:
        """Samples taken per mixture epoch when absolute (``size``: the stream's samples)."""
        n = self.choose if self.choose is not None else round(self.repeat * size)
        if n < 1:
            raise ConfigError(f"Stream {self.source}: repeat={self.repeat} of {size} samples "
                              f"takes no sample per epoch")
        return n

    def describe(self) -> str:
        if self.choose is not None:
            return f"{self.source}(choose={self.choose})"
        if self.repeat is not None:
            return f"{self.source}(repeat={self.repeat:g})"
        if isinstance(self.weight, tuple):
            return f"{self.source}(w={list(self.weight)})"
        return f"{self.source}(w={self.weight:g})"


def _schedule(pairs: Any, source: str) -> tuple[tuple[int, float], ...]:
    """Validated ``((step, weight), ...)``: from step 0, steps increasing, weights >= 0."""
    out: list[tuple[int, float]] = []
    for item in pairs:
        if not isinstance(item, (list, tuple)) or len(item) != 2:
            raise ConfigError(f"Stream {source}: a weight schedule is (step, weight) pairs, "
                              f"got {item!r:.80}")
        step, weight = item
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ConfigError(f"Stream {source}: schedule step must be an int >= 0, got {step!r}")
        if not _number(weight) or weight < 0:
            raise ConfigError(f"Stream {source}: schedule weight must be a non-negative number, "
                              f"got {weight!r} at step {step}")
        if out and step <= out[-1][0]:
            raise ConfigError(f"Stream {source}: schedule steps must increase, got {step} after "
                              f"{out[-1][0]}")
        out.append((step, float(weight)))
    if not out or out[0][0] != 0:
        raise ConfigError(f"Stream {source}: a weight schedule starts at step 0, got {list(pairs)!r:.80}")
    return tuple(out)


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
    return mixture_of(orders, streams, seed=seed, epoch_size=epoch_size,
                      mixture_block=mixture_block), orders


def mixture_of(orders: Sequence[EpochOrder], streams: Sequence[Stream], *, seed: int,
               epoch_size: int | None, mixture_block: int | None) -> EpochOrder | MixtureOrder:
    """The order of ``streams``: one stream's own order, a weighted mixture (weights or a
    schedule), or an absolute one (``repeat``/``choose``: one block of ``E = sum n_s`` positions
    per mixture epoch holding exactly ``n_s`` of stream ``s``)."""
    if any(s.absolute for s in streams):
        relative = [s.source for s in streams if not s.absolute and s.weight != 1.0]
        if relative:
            raise ConfigError(f"streams {relative} have relative weights in a mixture sampled by "
                              "repeat/choose: give each stream repeat or choose (a stream with "
                              "neither is taken once per epoch)")
        for name, value in (("epoch_size", epoch_size), ("mixture_block", mixture_block)):
            if value is not None:
                raise ConfigError(f"{name} cannot be set with repeat/choose: the mixture epoch is "
                                  "the sum of the streams' samples per epoch")
        n = [s.samples_per_epoch(o.size) if s.absolute else o.size
             for s, o in zip(streams, orders)]
        return MixtureOrder(orders, n, seed=seed, block=sum(n), epoch_size=sum(n))
    changes = sorted({step for s in streams for step, _ in s.schedule if step > 0})
    if len(orders) == 1 and epoch_size is None and not changes:
        return orders[0]
    if len(orders) == 1 and changes:
        raise ConfigError("a weight schedule needs a mixture of two or more streams")
    return MixtureOrder(orders, [s.weight_at(0) for s in streams], seed=seed,
                        block=mixture_block, epoch_size=epoch_size,
                        schedule=[(t, [s.weight_at(t) for s in streams]) for t in changes])


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


class SequenceHost:
    """What a loader holds that the batch sampler (:class:`streamshard.batch_keys.StreamingBatchSampler`)
    reads, without torch: the opened ``datasets``, the ``world``, the base ``sequence`` and its
    ``steps_per_epoch``, ``lookahead``, and the saved-order adoption of a resume. Shared by
    ``StreamingDataset`` (PyTorch) and ``NumpyBatchIterator`` (numpy / JAX), so a state saved
    by one restores into the other in every case. Subclasses call :meth:`_open` once."""

    datasets: tuple[Dataset, ...]
    streams: tuple[Stream, ...]
    world: World
    seed: int
    lookahead: int
    # Attributes holding a single-stream fast path (``None`` when it does not apply): dropped
    # while a resume lays out several streams (:meth:`adopt_layout`).
    _SINGLE_STREAM_PATHS: tuple[str, ...] = ()

    def _open(self, owner: str, source: str | Sequence[Stream], options: dict, *,
              batch_size: int | None, global_batch_size: int | None, order: Any, reading: Any,
              world: World | None, packing: Any, planner: Callable[[Any], Any]) -> None:
        """The constructor both loaders share (``owner`` names the class in errors): group the
        options (``order``/``reading``, streamshard/options.py; each field may also be a keyword
        of its own), fix the world and the global batch, open the streams, build the sequence.
        Sets ``order``, ``reading``, ``world``, ``global_batch_size``, ``packing``, ``seed``,
        ``streams``, ``datasets``, ``pack_planner``, ``lookahead`` and the sequence.
        ``planner``: ``packplan.Planner``, passed in (packplan imports batch_keys, which
        imports this module through mixing and restream)."""

        order, reading = resolve_options(order, reading, options, owner)
        self.order, self.reading = order, reading
        streams = as_streams(source, reading.storage_options)
        self.world = world if world is not None else detect_world()
        self.global_batch_size = resolve_batch(batch_size, global_batch_size, self.world)
        if packing is not None:  # length-aware batches (streamshard/packing.py, packplan.py)
            check_config(packing, self.global_batch_size, self.world.world_size)
        self.packing, self.seed, self.streams = packing, order.seed, streams
        self.datasets = open_streams(
            streams, cache_dir=reading.cache_dir, cache_limit=reading.cache_limit,
            storage_options=reading.storage_options, block_cache=reading.block_cache,
            verify_blocks=reading.verify_blocks)
        if packing is not None:
            check_column(self.datasets, packing.column)
        # The batch sampler plans packed keys with it (main process; streamshard/packplan.py).
        self.pack_planner = planner(self) if packing is not None else None
        sampler_order, orders = build_order(
            self.datasets, streams, seed=order.seed, shuffle=order.shuffle, lanes=order.lanes,
            window=order.window, epoch_size=order.epoch_size, mixture_block=order.mixture_block,
            block_shuffle=order.block_shuffle, blocks_per_group=order.blocks_per_group,
            global_batch_size=self.global_batch_size
            // (packing.group if packing is not None else 1))  # lanes divide windows per step
        self.lookahead = reading.lookahead
        self._init_sequence(SampleSequence(sampler_order, global_batch_size=self.global_batch_size,
                                           drop_last=order.drop_last),
                            lanes=order.lanes, block_shuffle=order.block_shuffle, orders=orders,
                            epoch_size=order.epoch_size)
        if reading.block_cache is None:  # sized to what the block-aware shuffle keeps in flight
            reserve_block_caches(self.datasets, orders, self.world, self.sequence)

    def _init_sequence(self, sequence: SampleSequence, *, lanes: int | None,
                       block_shuffle: bool | None, orders: Sequence[EpochOrder] = (),
                       epoch_size: int | None = None) -> None:
        """``orders``: each stream's own order (as ``build_order`` returns them)."""
        self._remote = [hasattr(ds.source, "check_budget") for ds in self.datasets]
        # Lanes and the block grouping left to their defaults are fixed by the first run: a
        # saved state's win (states from before those defaults hold 64 lanes and no blocks).
        self._lanes_adoptable = lanes is None and isinstance(sequence.order, EpochOrder)
        self._blocks_adoptable = block_shuffle is None and isinstance(sequence.order, EpochOrder)
        self._stream_orders = list(orders)  # each stream's own order (restream.py re-keys them)
        # A mixture's epoch length is the first run's (restream.py): adopted when left default.
        self._epoch_size_adoptable = epoch_size is None
        self._set_sequence(sequence)

    def _set_sequence(self, sequence: SampleSequence) -> None:
        self.sequence = sequence
        self.steps_per_epoch = sequence.steps_per_epoch
        self.working_set_shards = sequence.working_set_shards(
            self.world.rank, self.world.world_size, self.world.local_world_size)
        self._ledger_cache: tuple[Ledgers, SampleSequence] | None = None
        for ds, remote in zip(self.datasets, self._remote):
            if remote:
                # A budget that cannot hold what one device reads at once would deadlock on
                # pins: refuse it now. And pin no more shards than that working set.
                ds.source.check_budget(self.working_set_shards)
                ds.max_open_shards = max(1, min(ds.max_open_shards, self.working_set_shards))

    def adopt_saved_order(self, saved_sequence: Any) -> Callable[[], None]:
        """Take a saved state's ``lanes`` and ``blocks`` where this loader's were left to the
        default (the first run fixes them; states from before the locality default hold 64 lanes,
        states from before the block-aware shuffle hold no ``blocks``). A malformed saved value
        is left for :func:`streamshard.state.validate_state` to refuse. Returns an undo callable
        (called if the rest of the state does not validate)."""
        old = self.sequence
        if not isinstance(saved_sequence, dict):
            return lambda: None
        order = old.order
        lanes = saved_sequence.get("lanes")
        if (self._lanes_adoptable and not isinstance(lanes, bool) and isinstance(lanes, int)
                and lanes >= 1 and lanes != order.lanes):
            order = order.with_lanes(lanes)
        if self._blocks_adoptable:
            blocks = _saved_blocks(saved_sequence.get("blocks"))
            if blocks is not False and blocks != order.blocks:
                order = order.with_blocks(blocks)
        if order is old.order:
            return lambda: None
        self._set_sequence(SampleSequence(order, global_batch_size=old.global_batch_size,
                                          drop_last=old.drop_last))
        return lambda: self._set_sequence(old)

    def stream_order(self, i: int, stream_id: int) -> EpochOrder:
        """Stream ``i``'s order as the mixture member with id ``stream_id`` (its key
        ``derive_key(seed, stream_id)``; a lone dataset's default lanes become a member's)."""
        order = self._stream_orders[i]
        if len(self.streams) == 1 and self._lanes_adoptable:
            order = order.with_lanes(max(1, min(DEFAULT_MAX_LANES, order.num_shards)))
        return order.reseeded(derive_key(self.seed, stream_id))

    def adopt_layout(self, streams: tuple, datasets: tuple,
                     sequence: SampleSequence) -> Callable[[], None]:
        """Serve ``streams`` (read from ``datasets``) in ``sequence``: a saved run's stream
        history (streamshard.restream). Returns an undo callable."""
        fast = {name: getattr(self, name) for name in self._SINGLE_STREAM_PATHS}
        old = (self.streams, self.datasets, self._remote, self.sequence)
        self.streams, self.datasets = streams, datasets
        self._remote = [hasattr(getattr(ds, "source", None), "check_budget") for ds in datasets]
        if len(datasets) != 1:
            for name in fast:
                setattr(self, name, None)
        self._set_sequence(sequence)

        def undo() -> None:
            self.streams, self.datasets, self._remote = old[:3]
            for name, value in fast.items():
                setattr(self, name, value)
            self._set_sequence(old[3])
        return undo

    def sequence_with(self, ledgers: Ledgers = Ledgers()) -> SampleSequence:
        """The base sequence with ``ledgers`` applied (cached: the sequence depends on the
        ledgers only, not on which steps a plan serves)."""
        cached = self._ledger_cache
        if cached is not None and cached[0] == ledgers:
            return cached[1]
        seq = self.sequence.with_ledgers(ledgers)
        self._ledger_cache = (ledgers, seq)
        return seq

    def is_remote(self, stream: int) -> bool:
        return self._remote[stream]

    @property
    def fingerprints(self) -> list[str]:
        return [ds.fingerprint for ds in self.datasets]

    @property
    def batch_size(self) -> int:
        """Samples in this rank's batches: ``G // D`` or ``G // D + 1`` (fixed per rank)."""
        w = self.world
        return int(self.sequence.assignment(w.world_size, w.local_world_size).rank_sizes()[w.rank])


def _saved_blocks(value: Any) -> BlockGroups | None | bool:
    """A saved ``sequence.blocks`` as a BlockGroups, ``None`` (absent: window order), or
    ``False`` when it is malformed (then nothing is adopted and strict validation refuses it)."""
    if value is None:
        return None
    try:
        k, g = value
        return BlockGroups(k, g)
    except (TypeError, ValueError, ConfigError):
        return False
