"""Where packing and token budgets meet the sampler: pack windows, pools and their keys.

Pure arithmetic on the sequence (main process) and the worker's side of a key; no torch.

- **Pools.** The steps of an epoch are cut into pools of ``pool`` consecutive steps (the last
  pool of an epoch may be shorter: pools never cross epochs). Step ``t`` is part
  ``(t mod S) mod pool`` of the pool starting at ``t - that``.
- **Windows.** A step's ``G`` positions hold ``G / group`` windows: window ``w`` takes the step's
  positions ``w + (G / group) * i`` for ``i < group``; over a pool, a window is those positions
  of every step of the pool (``group * pool`` documents, in step then position order). When
  the lanes divide ``G / group`` (the default lanes do) every document of a window comes from
  one lane, lane ``w mod L``.
- **Who reads a window.** The sampler's :class:`~streamshard.sampler.assign.Assignment` with
  ``G / group`` positions per step splits windows among ranks as it splits positions (lanes
  owned by nodes, counts within one), so a rank reads only documents of lanes it owns and
  never needs another rank's lengths. The same rank reads a window for the whole pool.
- **Ledgers.** Skips drop a step's share of rows or buckets. A reseed or a quarantine whose
  step falls inside a pool takes effect at the next pool boundary (it is rounded up), so a
  pool is always packed from one mapping: exactly-once holds and steps already served keep
  their content (:func:`pooled_ledgers`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from streamshard.batch_keys import BatchKey
from streamshard.errors import ConfigError
from streamshard.lru import LRU
from streamshard.packing import (
    Packing, Rows, TokenBudget, bucket_batches, deal, pack, packed_batch, window_key,
)
from streamshard.sampler.assign import Assignment
from streamshard.sampler.ledgers import Ledgers


@dataclass(frozen=True)
class PackKey(BatchKey):
    """A :class:`BatchKey` for a packed or bucketed step: ``sample_ids``/``stream_ids`` are the
    documents of this rank's ``windows`` over the whole pool (window-major, ``docs`` each),
    and the step serves part ``part`` of ``parts`` of each window's rows or buckets."""

    windows: tuple[int, ...] = ()
    docs: int = 0
    part: int = 0
    parts: int = 1
    epoch: int = 0
    pool_start: int = 0


def pool_of(step: int, steps_per_epoch: int, pool: int) -> tuple[int, int, int]:
    """``(first step, steps, part)`` of the pool holding absolute step ``step``."""
    epoch, j = divmod(step, steps_per_epoch)
    first = (j // pool) * pool
    return epoch * steps_per_epoch + first, min(pool, steps_per_epoch - first), j - first


def round_up(step: int, steps_per_epoch: int, pool: int) -> int:
    """``step`` if it starts a pool, else the first step of the next pool."""
    first, count, part = pool_of(step, steps_per_epoch, pool)
    return step if part == 0 else first + count


def pooled_ledgers(ledgers: Ledgers, steps_per_epoch: int, pool: int) -> Ledgers:
    """The ledgers a pooled sequence maps with: reseed and reweight steps and quarantine
    ``from_step``s rounded up to a pool boundary (skips are applied per step, as served), so a
    pool's documents never change once its first step has been served."""
    if pool == 1 or not (ledgers.reseeds or ledgers.quarantine or ledgers.reweights):
        return ledgers
    up = lambda s: round_up(s, steps_per_epoch, pool)  # noqa: E731
    return dataclasses.replace(
        ledgers,
        reseeds=tuple((up(r), salt) for r, salt in ledgers.reseeds),
        quarantine=tuple((stream, sid, up(f)) for stream, sid, f in ledgers.quarantine),
        # Two changes rounded into one pool boundary: the later one is in force there.
        reweights=tuple((step,) + counts for step, counts in
                        {up(entry[0]): tuple(entry[1:]) for entry in ledgers.reweights}.items()))


def rank_windows(global_batch_size: int, group: int, lanes: int, world: Any) -> np.ndarray:
    """Window ids (ascending) this rank reads: the assignment of ``G / group`` positions."""
    windows = global_batch_size // group
    assignment = Assignment(windows, lanes, world.world_size, world.local_world_size)
    return np.sort(assignment.split(np.arange(windows, dtype=np.int64), world.rank))


def window_positions(seq: Any, first: int, steps: int, windows: np.ndarray,
                     group: int) -> np.ndarray:
    """Epoch positions of ``windows`` over the pool's steps: shape ``(len(windows), steps *
    group)``, each row in step then position order."""
    g = seq.global_batch_size
    stride = g // group
    per_step = [seq.step_positions(first + s) for s in range(steps)]
    offsets = windows[:, None] + stride * np.arange(group)[None, :]  # (W, group)
    return np.concatenate([p[offsets] for p in per_step], axis=1).reshape(len(windows), -1)


class Planner:
    """Keys of one rank for a length-aware dataset (main process). Caches the mapped pool."""

    def __init__(self, dataset: Any):
        self.dataset = dataset
        self.cfg = dataset.packing
        self._windows: tuple[int, np.ndarray] | None = None  # (lanes, window ids)
        self._pools: LRU = LRU(2)  # (ledgers, first step, base sequence) -> mapped ids
        self._seqs: LRU = LRU(4)  # pooled-ledger sequences (an LRU pickles empty)


    def windows(self, seq: Any) -> np.ndarray:
        if self._windows is None or self._windows[0] != seq.lanes:
            self._windows = (seq.lanes, rank_windows(seq.global_batch_size, self.cfg.group,
                                                     seq.lanes, self.dataset.world))
        return self._windows[1]

    def _sequence(self, ledgers: Ledgers) -> Any:
        ds = self.dataset
        seq = self._seqs.get((ledgers, ds.sequence))  # the base changes when lanes are adopted
        if seq is None:
            seq = ds.sequence.with_ledgers(pooled_ledgers(ledgers, ds.steps_per_epoch,
                                                          self.cfg.pool))
            self._seqs.put((ledgers, ds.sequence), seq)
        return seq

    def _mapped(self, seq: Any, ledgers: Ledgers, first: int, windows: np.ndarray) -> tuple:
        """(stream ids, sample ids) of this rank's windows over the pool starting at ``first``,
        as arrays and as the tuples keys carry (cached: the current pool and the next)."""
        ds, cfg = self.dataset, self.cfg
        cache_key = (ledgers, first, ds.sequence)
        found = self._pools.get(cache_key)
        if found is None:
            _, steps, _ = pool_of(first, ds.steps_per_epoch, cfg.pool)
            pos = window_positions(seq, first, steps, windows, cfg.group)
            streams, samples = seq.map_positions(first // ds.steps_per_epoch, pos.reshape(-1))
            found = (streams, samples, tuple(streams.tolist()), tuple(samples.tolist()))
            self._pools.put(cache_key, found)
        return found

    def key(self, step: int, ledgers: Ledgers = Ledgers(), *, prefetch: tuple = (),
            columnar: bool = False, tagged: bool = False) -> PackKey:
        """The key of absolute step ``step`` for this rank. For remote streams, the key of a
        pool's first step carries the shards of that pool and of the next one (reading order):
        the next pool downloads while this one is served."""
        ds, cfg = self.dataset, self.cfg
        seq = self._sequence(ledgers)
        first, steps, part = pool_of(step, ds.steps_per_epoch, cfg.pool)
        windows = self.windows(seq)
        if part == 0 and any(ds.is_remote(s) for s in range(len(ds.datasets))):
            from streamshard.batch_keys import _shards  # (stream, shard) pairs, reading order

            prefetch = prefetch or _shards(ds, [
                (start, *self._mapped(seq, ledgers, start, windows)[:2])
                for start in (first, first + steps)])
        _, _, streams, samples = self._mapped(seq, ledgers, first, windows)
        return PackKey(step, streams, samples, prefetch, columnar, tagged,
                       windows=tuple(windows.tolist()), docs=steps * cfg.group, part=part,
                       parts=steps, epoch=first // ds.steps_per_epoch, pool_start=first)

    def keys(self, steps: Iterator[int], ledgers: Ledgers, **flags: Any) -> Iterator[PackKey]:
        for step in steps:
            yield self.key(step, ledgers, **flags)


# -- the worker's side -----------------------------------------------------------------------
_CACHE_WINDOWS = 2  # pools kept per process: the current one and the next


def _column(sample: Any, column: str, stream: int, sample_id: int) -> np.ndarray:
    """The document of a (transformed) sample: its ``column``, a 1-D integer array."""
    value = sample.get(column) if isinstance(sample, dict) else None
    arr = np.asarray(value) if value is not None else None
    if arr is None or arr.ndim != 1 or arr.dtype.kind not in "iu":
        got = type(sample).__name__ if arr is None else f"{arr.dtype}{list(arr.shape)}"
        raise ConfigError(f"packing column {column!r} of sample {sample_id} (stream {stream}) "
                          f"must be a 1-D integer array, got {got} (a transform must keep it one)")
    return arr


def _pool_results(dataset: Any, key: PackKey) -> list:
    """Each window's packed rows or buckets for the key's pool (cached per process: the
    pool's other steps reuse them; a process packs each window once per pool it serves)."""
    cache = dataset.__dict__.get("_pack_cache")
    if cache is None:
        cache = dataset.__dict__["_pack_cache"] = LRU(_CACHE_WINDOWS)
    ident = (key.pool_start, key.windows, key.stream_ids, key.sample_ids)
    found = cache.get(ident)
    if found is not None:
        return found
    cfg = dataset.packing
    samples = dataset.fetch(key.pool_start, np.asarray(key.stream_ids, dtype=np.int64),
                            np.asarray(key.sample_ids, dtype=np.int64))
    docs = [_column(s, cfg.column, stream, sid)
            for s, stream, sid in zip(samples, key.stream_ids, key.sample_ids)]
    out = []
    for i, w in enumerate(key.windows):
        mine = docs[i * key.docs:(i + 1) * key.docs]
        if isinstance(cfg, Packing):
            out.append(pack(mine, cfg))
        else:
            out.append(bucket_batches(mine, cfg, window_key(dataset.seed, key.epoch,
                                                            key.pool_start, w)))
    cache.put(ident, out)
    return out


def serve(dataset: Any, key: PackKey) -> Any:
    """A rank batch for ``key`` as numpy: a packed dict (:class:`Packing`) or a list of bucket
    dicts (:class:`TokenBudget`), this step's share of each window in window order."""
    cfg = dataset.packing
    results = _pool_results(dataset, key)
    if isinstance(cfg, Packing):
        rows: list[Rows] = []
        for r in results:
            a, b = deal(len(r), key.parts, key.part)
            rows.append(r.take(a, b))
        return packed_batch(rows, cfg)
    assert isinstance(cfg, TokenBudget)
    out = []
    for bs in results:
        a, b = deal(len(bs), key.parts, key.part)
        out.extend(bs[a:b])
    return out
