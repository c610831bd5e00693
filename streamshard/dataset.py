"""``StreamingDataset``: the sampler's sequence served as device batches inside PyTorch.

The dataset is an ``IterableDataset`` whose items are device batches (lists of samples): item
``k`` of worker ``w`` of ``W`` is the ``(w + k*W)``-th served step of the plan, which is exactly the
round-robin order in which ``torch.utils.data.DataLoader`` consumes its workers. So the global
order never depends on ``num_workers``, and ``num_workers`` may change between save and resume.
Use it through :class:`streamshard.StreamingDataLoader`, which counts consumed batches and owns
the checkpoint state; a plain ``DataLoader(ds, batch_size=None, collate_fn=default_collate)``
works too, with ``ds.set_epoch(e)`` as with ``DistributedSampler``.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch.utils.data

from streamshard import fastpath
from streamshard.errors import ConfigError
from streamshard.plan import Plan, PlanBox
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


class StreamingDataset(torch.utils.data.IterableDataset):
    """Device batches of one dataset or a weighted mixture, in the sampler's global order.

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
        block_cache: int | str = DEFAULT_BLOCK_CACHE,
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
        self.streams = tuple(streams)
        self.datasets: tuple[Dataset, ...] = tuple(
            open_dataset(
                s.source,
                cache_dir=cache_dir,
                cache_limit=cache_limit,
                storage_options=s.storage_options if s.storage_options is not None else storage_options,
                block_cache=block_cache,
            )
            for s in streams
        )
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
        self._plan = PlanBox(Plan(0, self.steps_per_epoch))
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
    def set_epoch(self, epoch: int) -> None:
        """Serve all of ``epoch`` on the next ``iter()`` (for use without StreamingDataLoader)."""
        if not isinstance(epoch, int) or epoch < 0:
            raise ConfigError(f"epoch must be a non-negative int, got {epoch!r}")
        self.set_plan(Plan(epoch * self.steps_per_epoch, (epoch + 1) * self.steps_per_epoch))

    def set_plan(self, plan: Plan) -> None:
        """Set the steps the next ``iter()`` serves (the loader calls this; visible to workers)."""
        self._plan.write(plan)

    @property
    def batch_size(self) -> int:
        """Samples in this rank's batches: ``G // D`` or ``G // D + 1`` (fixed per rank)."""
        return int(self.sequence.assignment(self.world.world_size,
                                            self.world.local_world_size).rank_sizes()[self.world.rank])

    @property
    def fingerprints(self) -> list[str]:
        return [ds.fingerprint for ds in self.datasets]

    def __len__(self) -> int:
        """Device batches per epoch (every device gets the same number)."""
        return self.steps_per_epoch

    # -- random access ------------------------------------------------------------------------
    def __getitem__(self, index: int) -> dict:
        """Sample ``index`` of the (first) dataset, in dataset order, without transform."""
        return self.datasets[0][index]

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

    def iter_steps(self, worker: int = 0, num_workers: int = 1) -> Iterator[tuple[int, list]]:
        """Yield ``(step, device batch)`` for this worker's share of the current plan."""
        for step, stream_ids, sample_ids in self._plan_batches(worker, num_workers):
            yield step, self.fetch(step, stream_ids, sample_ids)

    def iter_collated(self, worker: int, num_workers: int) -> Iterator[tuple[int, Any, bool]]:
        """Like :meth:`iter_steps`, but yields ``(step, batch, collated)``: fixed-size schemas
        come already collated as columns (equal to ``streamshard.collate.collate``)."""
        columns = self._columns
        for step, stream_ids, sample_ids in self._plan_batches(worker, num_workers):
            if columns is not None:
                yield step, fastpath.read_batch(self.datasets[0], columns, sample_ids.tolist()), True
            else:
                yield step, self.fetch(step, stream_ids, sample_ids), False

    def _plan_batches(self, worker: int, num_workers: int) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """``(step, stream_ids, sample_ids)`` of this worker's steps.

        One sampler call maps a chunk of ``lookahead`` steps: a call costs ~100 us of numpy
        overhead whatever its size, which per 32-sample batch would exceed the cost of reading
        it. Remote sources get the shards of chunk ``k+1`` as a prefetch hint while chunk ``k``
        is being read (and chunk 0's at once), in reading order.
        """
        chunks = self._chunks(worker, num_workers)
        remote = any(self._remote)
        current = next(chunks, None)
        if current is not None and remote:
            self._hint(current)
        while current is not None:
            upcoming = next(chunks, None)
            if upcoming is not None and remote:
                self._hint(upcoming)
            for step, stream_ids, sample_ids in current:
                yield step, stream_ids, sample_ids
            current = upcoming

    def _chunks(self, worker: int, num_workers: int) -> Iterator[list[tuple[int, np.ndarray, np.ndarray]]]:
        plan = self._plan.read()
        seq = self.sequence_with(plan.ledgers)
        world = self.world
        per_device = self.batch_size
        n = worker
        while True:
            steps = []
            while len(steps) < self.lookahead:
                step = seq.nth_served_step(plan.start, n)
                if step >= plan.stop:
                    break
                steps.append(step)
                n += num_workers
            if not steps:
                return
            chunk = []
            for epoch, group in itertools.groupby(steps, key=lambda s: s // self.steps_per_epoch):
                group = list(group)
                positions = np.concatenate([seq.device_positions(
                    s, world.rank, world.world_size, world.local_world_size) for s in group])
                stream_ids, sample_ids = seq.map_positions(epoch, positions)
                for i, step in enumerate(group):
                    cut = slice(i * per_device, (i + 1) * per_device)
                    chunk.append((step, stream_ids[cut], sample_ids[cut]))
            yield chunk

    def _hint(self, chunk: list[tuple[int, np.ndarray, np.ndarray]]) -> None:
        """Ask remote sources to prefetch the shards of a chunk's samples, in reading order."""
        stream_ids = np.concatenate([c[1] for c in chunk])
        sample_ids = np.concatenate([c[2] for c in chunk])
        for stream in np.unique(stream_ids).tolist():
            if not self._remote[stream]:
                continue
            ds = self.datasets[stream]
            shards, _ = ds.index.locate(sample_ids[stream_ids == stream])
            _, first = np.unique(shards, return_index=True)
            ds.source.prefetch([ds.index.shards[s] for s in shards[np.sort(first)].tolist()])

    def __iter__(self) -> Iterator[list]:
        worker, num_workers = _worker_slot()
        for _, batch in self.iter_steps(worker, num_workers):
            yield batch

    def __repr__(self) -> str:
        names = ", ".join(f"{s.source}(w={s.weight:g})" for s in self.streams)
        return (
            f"StreamingDataset([{names}], global_batch_size={self.global_batch_size}, "
            f"steps_per_epoch={self.steps_per_epoch}, {self.world})"
        )


def _worker_slot() -> tuple[int, int]:
    info = torch.utils.data.get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)
