"""``StreamingDataset``: the sampler's sequence served as rank batches inside PyTorch.

A map-style dataset: ``__getitems__`` serves one rank batch. What to read comes from a batch
sampler in the main process (:class:`streamshard.batch_keys.StreamingBatchSampler`), which owns
the sequence and the state and hands workers :class:`~streamshard.batch_keys.BatchKey` values
(step, sample ids, prefetch hints): workers hold no state, so ``num_workers`` may change between
save and resume. Three ways to drive it (docs/LOADER.md):

- ``StreamingDataLoader(ds)``: one line; counts consumed batches, owns the checkpoint state.
- ``DataLoader(ds, batch_sampler=ds.batch_sampler(), collate_fn=...)``, or torchdata's
  ``StatefulDataLoader`` the same way: its state holds the sampler's, so resume is arithmetic.
- ``DataLoader(ds, batch_size=None, collate_fn=...)``: item ``i`` is rank batch ``i`` of
  ``ds.set_epoch(e)``'s epoch; a ``DataLoader`` that batches again (``batch_size`` >= 1) gets a
  ``ConfigError`` naming these forms.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch.utils.data

from streamshard import fastpath, packplan
from streamshard.batch_keys import (
    BatchKey, Buckets, Columns, StreamingBatchSampler, Tagged, start_prefetch,
)
from streamshard.collate import collate, token_dtype_of
from streamshard.errors import ConfigError
from streamshard.options import OrderOptions, ReadOptions
from streamshard.packing import Packing, TokenBudget
from streamshard.streams import SequenceHost, Stream  # noqa: F401 (Stream re-exported)
from streamshard.sampler import sample_rng
from streamshard.world import World

Transform = Callable[[dict, np.random.Generator], Any]


class StreamingDataset(SequenceHost, torch.utils.data.Dataset):
    """Rank batches of one dataset or a weighted mixture, in the sampler's global order.

    ``source`` is a path/URL or a list of :class:`Stream`. Exactly one of ``batch_size`` (per
    device) and ``global_batch_size``. ``order=OrderOptions(...)`` (shuffle, seed, lanes,
    window, drop_last, block shuffle, mixture epoch) and ``reading=ReadOptions(...)`` (cache,
    storage options, block cache, lookahead, first-touch check) group the other options; each
    of their fields may also be passed as a keyword of its own (``seed=3``), not both.
    ``world`` defaults to :func:`detect_world` (no collectives).
    ``transform(sample, rng)`` gets a per-sample generator from ``sample_rng(seed, epoch, stream,
    sample_id)``, so augmentations are the same whatever the world size. Opening reads only the
    index (remote: fetched once into ``cache_dir``); shards are read lazily. ``packing``: a
    :class:`~streamshard.packing.Packing` or :class:`~streamshard.packing.TokenBudget` serves
    packed rows or length buckets instead of samples (docs/LOADER.md).
    """

    _SINGLE_STREAM_PATHS = ("_columns",)  # fastpath columns: one stream only

    def __init__(
        self,
        source: str | Sequence[Stream],
        *,
        batch_size: int | None = None,
        global_batch_size: int | None = None,
        order: OrderOptions | None = None,
        reading: ReadOptions | None = None,
        world: World | None = None,
        transform: Transform | None = None,
        token_dtype: torch.dtype | None = torch.int64,
        packing: Packing | TokenBudget | None = None,
        **options: Any,
    ):
        super().__init__()
        # uint16/uint32 token arrays come out in this dtype from the default collation.
        self.token_dtype = token_dtype_of(token_dtype)
        self.collate_fn = functools.partial(collate, token_dtype=self.token_dtype)
        # Set by StreamingDataLoader(pin_memory=True, num_workers=0): gather into pinned memory.
        self.pin_memory = False
        self.transform = transform
        # options, world, batch, streams, sequence: streams.SequenceHost._open (as
        # NumpyBatchIterator); adopt_saved_order, stream_order, adopt_layout: SequenceHost too
        self._open("StreamingDataset", source, options, batch_size=batch_size,
                   global_batch_size=global_batch_size, order=order, reading=reading,
                   world=world, packing=packing, planner=packplan.Planner)
        self.shuffle = self.order.shuffle
        self._epoch = 0  # the epoch plain ``DataLoader(ds, batch_size=...)`` indices refer to
        # Batches of a single fixed-size-schema stream without a transform can be read as
        # columns straight into tensors (streamshard.fastpath); None when that does not apply.
        self._columns = (fastpath.layout(self.datasets[0].schema)
                         if len(self.datasets) == 1 and transform is None else None)

    # -- plain DataLoader usage -------------------------------------------------------------
    def batch_sampler(self, *, columnar: bool = False) -> StreamingBatchSampler:
        """A batch sampler for ``DataLoader(ds, batch_sampler=...)`` or torchdata's
        ``StatefulDataLoader``: one key per served step of this rank, Stateful.
        ``columnar=True`` returns fixed-size schemas already collated (dicts of tensors)."""
        return StreamingBatchSampler(self, columnar=columnar)

    def set_epoch(self, epoch: int) -> None:
        """The epoch that integer indices (``DataLoader(ds, batch_size=None)``) and
        ``for batch in ds`` read, as with ``DistributedSampler``."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ConfigError(f"epoch must be a non-negative int, got {epoch!r}")
        self._epoch = epoch

    def __len__(self) -> int:
        """Rank batches per epoch (every rank serves the same number of steps)."""
        return self.steps_per_epoch

    # -- random access ------------------------------------------------------------------------
    def __getitem__(self, index: Any) -> Any:
        """Rank batch ``index`` of ``set_epoch``'s epoch (a list of samples, transformed): the
        item a plain ``DataLoader(ds, batch_size=None, collate_fn=...)`` reads. A
        :class:`BatchKey` gives its batch."""
        if isinstance(index, BatchKey):
            return self.__getitems__(index)
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
            raise ConfigError(f"StreamingDataset index must be an int or a BatchKey, got {index!r}")
        if not 0 <= index < self.steps_per_epoch:
            raise IndexError(f"rank batch {index} out of range [0, {self.steps_per_epoch})")
        step = self._epoch * self.steps_per_epoch + int(index)
        w = self.world
        if self.packing is not None:
            return self.__getitems__(self.pack_planner.key(step))
        streams, samples = self.sequence.batch(step, w.rank, w.world_size, w.local_world_size)
        return self.fetch(step, streams, samples)

    # -- iteration ----------------------------------------------------------------------------
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

    def __getitems__(self, key: Any) -> Any:
        """One rank batch for a :class:`BatchKey`: its samples (or columns when ``columnar``,
        ``(step, batch)`` when ``tagged``). A list of indices (a ``DataLoader`` that batches
        again, ``batch_size`` >= 1) is a ``ConfigError`` naming the fix."""
        if not isinstance(key, BatchKey):
            raise ConfigError(
                f"DataLoader(ds, batch_size={len(key)}) would batch this dataset's rank batches "
                f"again: use StreamingDataLoader(ds) (it accepts batch_size={self.batch_size}), "
                "DataLoader(ds, batch_size=None) or DataLoader(ds, "
                "batch_sampler=ds.batch_sampler()); with transformers.Trainer, "
                "streamshard.hf_trainer.StreamingTrainer")
        if key.prefetch:
            start_prefetch(self.datasets, key)
        if isinstance(key, packplan.PackKey):
            batch = _to_torch(packplan.serve(self, key), self.packing.column, self.token_dtype)
        elif key.columnar and self._columns is not None:
            batch = fastpath.read_batch(self.datasets[0], self._columns,
                                        np.asarray(key.sample_ids, dtype=np.int64),
                                        token_dtype=None if key.raw_tokens else self.token_dtype,
                                        pin_memory=self.pin_memory)
            batch = Columns(batch)
        else:
            batch = self.fetch(key.step, np.asarray(key.stream_ids, dtype=np.int64),
                               np.asarray(key.sample_ids, dtype=np.int64))
        return Tagged(key.step, batch) if key.tagged else batch

    def reads_ahead(self) -> bool:
        """Whether the 0-worker loop reads keys ahead through :meth:`read_keys` (one gather for
        several keys when the schema is one fixed-size array column): a fixed-size schema, no
        packing, no pinned output, ``__getitems__`` not overridden."""
        return (self._columns is not None and self.packing is None and not self.pin_memory
                and type(self).__getitems__ is StreamingDataset.__getitems__)

    def read_keys(self, keys: list[BatchKey]) -> list[Any]:
        """``[self.__getitems__(key) for key in keys]``, in one gather when every key asks for
        columns of this dataset's one-array-column fast path (what ``StreamingDataLoader``
        reads ahead at 0 workers)."""
        if (not self.reads_ahead() or len(keys) < 2
                or not all(type(k) is BatchKey and k.columnar and not k.raw_tokens for k in keys)):
            return [self.__getitems__(key) for key in keys]
        for key in keys:
            if key.prefetch:
                start_prefetch(self.datasets, key)
        batches = fastpath.read_batches(
            self.datasets[0], self._columns,
            [np.asarray(key.sample_ids, dtype=np.int64) for key in keys],
            token_dtype=self.token_dtype)
        return [Tagged(key.step, Columns(b)) if key.tagged else Columns(b)
                for key, b in zip(keys, batches)]

    def __iter__(self) -> Iterator[Any]:
        """This rank's batches of ``set_epoch``'s epoch, read in this process (no DataLoader,
        no collation): ``for batch in ds`` as with the iterable datasets of other libraries."""
        sampler = self.batch_sampler()
        sampler.set_epoch(self._epoch)
        for key in sampler:
            yield self.__getitems__(key)

    def __repr__(self) -> str:
        names = ", ".join(s.describe() for s in self.streams)
        return (
            f"StreamingDataset([{names}], global_batch_size={self.global_batch_size}, "
            f"steps_per_epoch={self.steps_per_epoch}, {self.world})"
        )


def _to_torch(batch: Any, column: str, token_dtype: torch.dtype | None) -> Any:
    """A numpy packed batch (-> :class:`Columns` of tensors) or list of buckets (->
    :class:`Buckets` of dicts of tensors); the token column comes out in ``token_dtype``."""
    if isinstance(batch, list):
        return Buckets(dict(_to_torch(b, column, token_dtype)) for b in batch)
    out = {}
    for name, value in batch.items():
        value = np.asarray(value)
        value = value.astype(np.int64) if value.dtype.kind == "u" else value
        tensor = (torch.from_numpy(np.ascontiguousarray(value)) if value.ndim
                  else torch.tensor(value.item()))
        out[name] = tensor.to(token_dtype) if name == column and token_dtype is not None else tensor
    return Columns(out)

