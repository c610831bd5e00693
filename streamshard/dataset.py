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

import collections
import functools
import itertools
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch.utils.data

from streamshard import blockshuffle, fastpath
from streamshard.collate import collate, token_dtype_of
from streamshard.device_batch import DeviceBatch
from streamshard.errors import ConfigError
from streamshard.plan import Plan, PlanBox
from streamshard.reader import Dataset
from streamshard.streams import (  # noqa: F401 (Stream re-exported)
    Stream, as_streams, build_order, open_streams, reserve_block_caches, resolve_batch,
)
from streamshard.sampler import Ledgers, SampleSequence, sample_rng
from streamshard.world import World, detect_world

HINT_CHUNKS = 16  # chunks of ``lookahead`` steps whose shards are hinted to remote sources

Transform = Callable[[dict, np.random.Generator], Any]


# Stream and the batch rule live in streams.py (no torch); re-exported here.
_resolve_batch = resolve_batch


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
        block_cache: int | str | None = None,
        block_shuffle: bool | None = None,
        blocks_per_group: int = blockshuffle.DEFAULT_BLOCKS_PER_GROUP,
        token_dtype: torch.dtype | None = torch.int64,
        verify_blocks: bool = True,
    ):
        super().__init__()
        streams = as_streams(source, storage_options)
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
        self.streams = streams
        self.datasets: tuple[Dataset, ...] = open_streams(
            streams, cache_dir=cache_dir, cache_limit=cache_limit,
            storage_options=storage_options, block_cache=block_cache,
            verify_blocks=verify_blocks)
        order, orders = build_order(
            self.datasets, streams, seed=seed, shuffle=shuffle, lanes=lanes, window=window,
            epoch_size=epoch_size, mixture_block=mixture_block, block_shuffle=block_shuffle,
            blocks_per_group=blocks_per_group)
        self.sequence = SampleSequence(
            order, global_batch_size=self.global_batch_size, drop_last=drop_last
        )
        self.steps_per_epoch = self.sequence.steps_per_epoch
        if not isinstance(lookahead, int) or lookahead < 1:
            raise ConfigError(f"lookahead must be a positive int, got {lookahead!r}")
        self.lookahead = lookahead
        self.working_set_shards = self.sequence.working_set_shards(self.world.rank, self.world.world_size)
        if block_cache is None:  # sized to what the block-aware shuffle keeps in flight
            reserve_block_caches(self.datasets, orders, self.world)
        self._remote = [hasattr(ds.source, "check_budget") for ds in self.datasets]
        for ds, remote in zip(self.datasets, self._remote):
            if remote:
                # A budget that cannot hold what one device reads at once would deadlock on
                # pins: refuse it now. And pin no more shards than that working set.
                ds.source.check_budget(self.working_set_shards)
                ds.max_open_shards = max(1, min(ds.max_open_shards, self.working_set_shards))
        self._plan = PlanBox(Plan(0, self.steps_per_epoch))
        # Batches of a single fixed-size-schema stream without a transform can be read as
        # columns straight into tensors (streamshard.fastpath); None when that does not apply.
        self._columns = (fastpath.layout(self.datasets[0].schema)
                         if len(self.datasets) == 1 and transform is None else None)
        self._ledger_cache: tuple[tuple, SampleSequence] | None = None

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
        """Samples per device batch."""
        return self.global_batch_size // self.world.world_size

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
        if len(self.datasets) == 1:  # read in block order (fastpath.read_samples)
            out = fastpath.read_samples(self.datasets[0], sample_ids)
        else:
            out = [None] * len(sample_ids)
            for stream in np.unique(stream_ids).tolist():
                where = np.flatnonzero(stream_ids == stream)
                for i, item in zip(where.tolist(),
                                   fastpath.read_samples(self.datasets[stream], sample_ids[where])):
                    out[i] = item
        if self.transform is not None:
            out = [self.transform(item, sample_rng(self.seed, epoch, stream, sample))
                   for item, stream, sample in zip(out, stream_ids.tolist(), sample_ids.tolist())]
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
                yield step, fastpath.read_batch(self.datasets[0], columns, sample_ids,
                                                token_dtype=self.token_dtype,
                                                pin_memory=self.pin_memory), True
            else:
                yield step, self.fetch(step, stream_ids, sample_ids), False

    def _plan_batches(self, worker: int, num_workers: int) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """``(step, stream_ids, sample_ids)`` of this worker's steps.

        One sampler call maps a chunk of ``lookahead`` steps: a call costs ~100 us of numpy
        overhead whatever its size, which per 32-sample batch would exceed the cost of reading
        it. Remote sources get the shards of the next ``HINT_CHUNKS`` chunks as one prefetch
        hint, in reading order, each time a chunk starts: far enough ahead that a cold epoch
        is not waiting on first-byte latency; the prefetcher bounds it in bytes.
        """
        chunks = self._chunks(worker, num_workers)
        remote = any(self._remote)
        ahead: collections.deque = collections.deque()

        def fill() -> None:
            while len(ahead) < HINT_CHUNKS + 1 and (chunk := next(chunks, None)) is not None:
                ahead.append(chunk)

        fill()
        while ahead:
            if remote:  # the chunk about to be read first, then what follows it
                self._hint([c for chunk in ahead for c in chunk])
            current = ahead.popleft()
            for step, stream_ids, sample_ids in current:
                yield step, stream_ids, sample_ids
            fill()

    def _chunks(self, worker: int, num_workers: int) -> Iterator[list[tuple[int, np.ndarray, np.ndarray]]]:
        plan = self._plan.read()
        seq = self.sequence_with(plan.ledgers)
        rank, world_size = self.world.rank, self.world.world_size
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
                positions = np.concatenate([seq.device_positions(s, rank, world_size) for s in group])
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

    def __iter__(self) -> Iterator[DeviceBatch]:
        """A plain ``DataLoader``'s path: device batches as ``DeviceBatch`` (which a re-batching
        ``DataLoader(ds)`` refuses with the fix, see device_batch.py)."""
        worker, num_workers = _worker_slot()
        for _, batch in self.iter_steps(worker, num_workers):
            yield DeviceBatch(batch)

    def __repr__(self) -> str:
        names = ", ".join(f"{s.source}(w={s.weight:g})" for s in self.streams)
        return (
            f"StreamingDataset([{names}], global_batch_size={self.global_batch_size}, "
            f"steps_per_epoch={self.steps_per_epoch}, {self.world})"
        )


def _worker_slot() -> tuple[int, int]:
    info = torch.utils.data.get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)
