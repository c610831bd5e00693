"""The main-process half of the map-style adapter: a batch sampler that owns the sequence and
the state, and the batch keys it hands to stateless workers.

``StreamingBatchSampler`` yields one :class:`BatchKey` per served step of this rank: the step,
the ``(stream, sample)`` ids the rank reads (mapped here, in vectorized chunks of ``lookahead``
steps), and the shards of the next chunk as a prefetch hint. A worker only reads what a key says
(``StreamingDataset.__getitems__``), so ``num_workers`` may change between save and resume and
nothing is ever pushed into a live worker. The sampler and each of its iterators implement
torchdata's ``Stateful`` protocol, so ``StatefulDataLoader(ds, batch_sampler=...)`` saves the
loader state (a few integers) and resumes by arithmetic, not by replaying batches.
"""

from __future__ import annotations

import collections
import itertools
from dataclasses import dataclass
from typing import Any, Callable, Iterator, NamedTuple

import numpy as np

from streamshard.errors import ConfigError
from streamshard.mixing import restore, reweight_ledgers
from streamshard.sampler.ledgers import Ledgers
from streamshard.state import KEY_STEP, build_state


# Chunks of ``lookahead`` steps whose shards a key hints to remote sources (issue 12, item 6).
HINT_CHUNKS = 16
# Fewest epoch positions mapped per sampler call (several chunks at once when batches are small):
# a call's fixed numpy costs dominate up to a few thousand positions (keys of a 32-sample batch:
# ~150 us at 512 positions, ~14 us at 4,096, ~11 us at 16,384 on bench_speed's gather workload;
# 16,384 positions are 128 KiB of ids, a few ms before the first batch).
MAP_POSITIONS = 16384


@dataclass(frozen=True)
class BatchKey:
    """What a worker needs to serve one rank batch. Picklable, small (ints only).

    ``tagged``: ``__getitems__`` returns ``(step, batch)`` (StreamingDataLoader checks the step);
    ``columnar``: fixed-size schemas come back already collated (``streamshard.fastpath``);
    ``prefetch``: ``(stream, shard index)`` pairs to start downloading, in reading order;
    ``raw_tokens``: columnar uint16/uint32 token columns come back as stored, for the main
    process to convert (a quarter of int64's bytes cross through shared memory).
    """

    step: int
    stream_ids: tuple[int, ...]
    sample_ids: tuple[int, ...]
    prefetch: tuple[tuple[int, int], ...] = ()
    columnar: bool = False
    tagged: bool = False
    raw_tokens: bool = False

    def __len__(self) -> int:
        return len(self.sample_ids)


class Columns(dict):
    """A rank batch already collated as columns (``columnar`` keys): collation passes it on."""


class Buckets(list):
    """A rank batch already collated as a list of micro-batches (``TokenBudget``): passed on."""


class Tagged(NamedTuple):
    """``(step, batch)`` from a ``tagged`` key: StreamingDataLoader checks the step."""

    step: int
    batch: Any


class BatchCollate:
    """``collate_fn`` for batch keys: collates a list of samples with ``collate_fn`` (default
    :func:`streamshard.collate.collate`), passes :class:`Columns` on as a plain dict, and keeps
    a :class:`Tagged` batch's step. Picklable (runs in workers)."""

    def __init__(self, collate_fn: Callable[[list], Any] | None = None):
        if collate_fn is None:
            from streamshard.collate import collate as collate_fn
        self.collate_fn = collate_fn

    def __call__(self, data: Any) -> Any:
        if isinstance(data, Tagged):
            return Tagged(data.step, self._one(data.batch))
        return self._one(data)

    def _one(self, batch: Any) -> Any:
        if isinstance(batch, Buckets):
            return list(batch)
        return dict(batch) if isinstance(batch, Columns) else self.collate_fn(batch)


# -- run-time ledger changes, validated once for every loader ----------------------------------

def with_skip(ledgers: Ledgers, start_step: int, stop_step: int) -> Ledgers:
    """``ledgers`` plus a skip of absolute steps ``[start_step, stop_step)`` (idempotent)."""
    if not (isinstance(start_step, int) and isinstance(stop_step, int)) or \
            not 0 <= start_step <= stop_step:
        raise ConfigError(f"skip needs 0 <= start_step <= stop_step, got [{start_step}, "
                          f"{stop_step})")
    return ledgers.with_skip(start_step, stop_step) if start_step < stop_step else ledgers


def with_reseed(ledgers: Ledgers, step: int, salt: int) -> Ledgers:
    """``ledgers`` plus a reseed of the rest of ``step``'s epoch with ``salt`` (idempotent)."""
    if not isinstance(step, int) or step < 0 or not isinstance(salt, int) or salt < 0:
        raise ConfigError(f"reseed_from needs a step >= 0 and a salt >= 0, got {step!r}, "
                          f"{salt!r}")
    return ledgers.with_reseed(step, salt)


def with_quarantine(ledgers: Ledgers, entries: Any) -> Ledgers:
    """``ledgers`` merged with ``(stream, sample_id, from_step)`` entries or a ``Ledgers``."""
    more = entries if isinstance(entries, Ledgers) else Ledgers(quarantine=tuple(entries))
    return ledgers.merged(more)


def start_prefetch(datasets: Any, key: BatchKey) -> None:
    """Hand a key's prefetch hint to the remote sources: one call per stream, in reading order
    (it goes ahead of older hints)."""
    for stream in dict.fromkeys(stream for stream, _ in key.prefetch):
        ds = datasets[stream]
        ds.source.prefetch([ds.index.shards[shard] for s, shard in key.prefetch if s == stream])


class StreamingBatchSampler:
    """Batch keys of one rank, one per served step, from the loader state it owns.

    Each ``iter()`` serves the rest of the current epoch from :attr:`step` and then moves
    :attr:`step` to the next epoch; ``set_epoch(e)`` jumps to epoch ``e`` (as
    ``DistributedSampler``). ``state_dict()`` is the loader state of the next ``iter()``;
    an iterator's ``state_dict()`` is the state after the keys it yielded.
    """

    def __init__(self, dataset: Any, *, columnar: bool = False,
                 tagged: bool = False, raw_tokens: bool = False):
        # ``dataset``: a StreamingDataset (not imported here: it imports this module).
        self.dataset = dataset
        self.columnar, self.tagged = bool(columnar), bool(tagged)
        self.raw_tokens = bool(raw_tokens)
        self.step = 0
        self.stop: int | None = None  # None: the end of the epoch of ``step``
        self.ledgers = Ledgers()
        # load_state_dict's default for ``reweight`` (StatefulDataLoader passes none).
        self.reweight_on_load = False

    def __len__(self) -> int:
        return self.dataset.steps_per_epoch

    def set_epoch(self, epoch: int) -> None:
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ConfigError(f"epoch must be a non-negative int, got {epoch!r}")
        self.step, self.stop = epoch * self.dataset.steps_per_epoch, None

    def __iter__(self) -> "_KeyIterator":
        seq = self.dataset.sequence_with(self.ledgers)
        start = seq.next_served_step(self.step)
        stop = self.stop if self.stop is not None else (
            (start // self.dataset.steps_per_epoch + 1) * self.dataset.steps_per_epoch)
        return _KeyIterator(self, start, stop)

    # -- Stateful -----------------------------------------------------------------------------
    def state_at(self, step: int) -> dict[str, Any]:
        ds = self.dataset
        return build_state(fingerprints=ds.fingerprints, sequence=sequence_fields(ds),
                           steps_per_epoch=ds.steps_per_epoch, step=step, ledgers=self.ledgers)

    def state_dict(self) -> dict[str, Any]:
        return self.state_at(self.dataset.sequence_with(self.ledgers).next_served_step(self.step))

    def load_state_dict(self, state: dict[str, Any], reweight: bool | None = None) -> None:
        """Restore a loader state; ``reweight`` (default :attr:`reweight_on_load`) continues a
        mixture built with new weights (:mod:`streamshard.mixing`)."""
        self.ledgers = restore(self.dataset, state, lambda: self.state_at(0),
                               self.reweight_on_load if reweight is None else reweight)
        self.step, self.stop = int(state[KEY_STEP]), None

    def reweight(self, weights: Any, from_step: int | None = None) -> None:
        """As ``StreamingDataLoader.reweight``; applies from the next ``iter()`` (a live
        iterator keeps the keys it planned), so ``from_step`` defaults to :attr:`step`."""
        seq = self.dataset.sequence_with(self.ledgers)
        self.ledgers = reweight_ledgers(seq, self.dataset.streams, weights, from_step,
                                        seq.next_served_step(self.step))


class _KeyIterator:
    """Keys of steps ``[start, stop)`` minus skips; Stateful (torchdata) at its position."""

    def __init__(self, sampler: StreamingBatchSampler, start: int, stop: int):
        self._sampler = sampler
        self._seq = sampler.dataset.sequence_with(sampler.ledgers)
        self._start, self._stop, self._served = start, stop, 0
        self._keys = self._generate()

    def __iter__(self) -> "_KeyIterator":
        return self

    def __next__(self) -> BatchKey:
        try:
            key = next(self._keys)
        except StopIteration:
            self._sampler.step = max(self._sampler.step, self._stop)
            self._sampler.stop = None
            raise
        self._served += 1
        return key

    def next_step(self) -> int:
        return self._seq.nth_served_step(self._start, self._served)

    def state_dict(self) -> dict[str, Any]:
        return self._sampler.state_at(self.next_step())

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._sampler.load_state_dict(state)
        fresh = iter(self._sampler)
        self.__dict__.update(fresh.__dict__)

    def _generate(self) -> Iterator[BatchKey]:
        """Keys chunk by chunk. With a remote stream, the first key of each chunk carries the
        shards of that chunk and of the next ``HINT_CHUNKS`` (in reading order): far enough
        ahead that a cold epoch does not wait on first-byte latency; the prefetcher bounds it
        in bytes."""
        dataset = self._sampler.dataset
        planner = getattr(dataset, "pack_planner", None)  # packing= (streamshard/packplan.py)
        if planner is not None:
            served = (self._seq.nth_served_step(self._start, n) for n in itertools.count(self._served))
            yield from planner.keys(
                itertools.takewhile(lambda step: step < self._stop, served), self._sampler.ledgers,
                columnar=self._sampler.columnar, tagged=self._sampler.tagged)
            return
        remote = any(dataset.is_remote(s) for s in range(len(dataset.datasets)))
        chunks = self._chunks()
        ahead: collections.deque = collections.deque()

        def fill() -> None:  # each chunk's shards are found once, when it joins ``ahead``
            while len(ahead) < (HINT_CHUNKS + 1 if remote else 1):
                chunk = next(chunks, None)
                if chunk is None:
                    return
                ahead.append((chunk, _shards(dataset, chunk) if remote else ()))

        fill()
        while ahead:
            # the shards of every chunk ahead, first reads first (an ordered union)
            hint = tuple(dict.fromkeys(itertools.chain.from_iterable(s for _, s in ahead)))
            current, _ = ahead.popleft()
            for i, (step, streams, samples) in enumerate(current):
                yield BatchKey(step, tuple(streams.tolist()), tuple(samples.tolist()),
                               hint if i == 0 else (), self._sampler.columnar,
                               self._sampler.tagged, self._sampler.raw_tokens)
            fill()

    def _chunks(self) -> Iterator[list[tuple[int, np.ndarray, np.ndarray]]]:
        """Steps in chunks of ``lookahead`` (the prefetch hint's unit), mapped at least
        ``MAP_POSITIONS`` positions per sampler call: one call costs ~1-3 ms of numpy overhead
        up to a few thousand positions, more than reading 16 small batches."""
        ds, seq = self._sampler.dataset, self._seq
        world, per_epoch = ds.world, ds.steps_per_epoch
        lookahead = ds.lookahead
        per_step = max(1, len(seq.device_positions(self._start, world.rank, world.world_size,
                                                   world.local_world_size)))
        group = lookahead * max(1, -(-MAP_POSITIONS // (lookahead * per_step)))
        step = seq.nth_served_step(self._start, self._served)
        while True:
            steps = seq.served_run(step, group, self._stop)
            if not steps:
                return
            step = steps[-1] + 1
            mapped = []
            for epoch, same in itertools.groupby(steps, key=lambda s: s // per_epoch):
                same = list(same)
                if same[-1] - same[0] == len(same) - 1:  # no skip inside: a range
                    same = range(same[0], same[-1] + 1)
                parts = seq.device_positions_of(same, world.rank, world.world_size,
                                                world.local_world_size)
                streams, samples = seq.map_positions(epoch, np.concatenate(parts))
                cut = np.cumsum([0] + [len(p) for p in parts])
                mapped += [(s, streams[a:b], samples[a:b])
                           for s, a, b in zip(same, cut[:-1], cut[1:])]
            for i in range(0, len(mapped), lookahead):
                yield mapped[i:i + lookahead]


def _shards(dataset: Any, chunk) -> tuple[tuple[int, int], ...]:
    """(stream, shard) pairs a chunk reads, in reading order (step by step; in a step, stream by
    stream, then sample order), for remote streams only. Vectorized over the chunk."""
    if not chunk:
        return ()
    streams = np.concatenate([c[1] for c in chunk])
    samples = np.concatenate([c[2] for c in chunk])
    steps = np.repeat(np.arange(len(chunk)), [len(c[1]) for c in chunk])
    shards = np.full(len(samples), -1, dtype=np.int64)
    for stream in np.unique(streams).tolist():
        if dataset.is_remote(stream):
            mine = streams == stream
            offsets = dataset.datasets[stream].index.offsets
            shards[mine] = np.searchsorted(offsets, samples[mine], side="right") - 1
    order = np.lexsort((np.arange(len(samples)), streams, steps))
    order = order[shards[order] >= 0]
    return tuple(dict.fromkeys(zip(streams[order].tolist(), shards[order].tolist())))


def sequence_fields(dataset: Any) -> dict[str, Any]:
    """The state's ``sequence`` of a loader's dataset: the sequence's fields, plus ``packing``
    when it serves packed or bucketed steps (streamshard/packing.py)."""
    fields = dataset.sequence.state_fields()
    packing = getattr(dataset, "packing", None)
    if packing is not None:
        fields["packing"] = packing.state_fields()
    return fields
