"""``NumpyBatchIterator``: the loader's batches as numpy arrays, without torch (JAX, NumPy, ...).

Same arguments, same global order and the same ``state_dict()`` as ``StreamingDataset`` +
``StreamingDataLoader``: a state saved by one restores into the other. Each process (JAX host)
gets its device batch of every global batch through ``world=World(rank, world_size)`` (default:
the environment, as for PyTorch), so the hosts together read each global batch exactly once::

    from streamshard import NumpyBatchIterator, World
    import jax

    it = NumpyBatchIterator("data/tokens", global_batch_size=256, seed=17,
                            world=World(jax.process_index(), jax.process_count()))
    for batch in it:                                  # {"tokens": np.ndarray [64, 2048], ...}
        state = train_step(state, batch)
    checkpoint["data"] = it.state_dict()              # JSON-able, identical on every host
    it.load_state_dict(checkpoint["data"])            # O(1): the next batch is the saved one

Batches are read in this process (one block read per sample, no worker processes). Collation:
columns of equal-shape arrays and scalars are stacked into one array in their stored dtype
(token ids stay ``uint16``/``uint32``; the PyTorch loader widens them to int64);
``str``/``bytes``/``json`` columns and ragged arrays stay lists. ``collate_fn(samples)``
replaces that.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

import numpy as np

from streamshard import packplan
from streamshard.options import OrderOptions, ReadOptions
from streamshard.packing import Packing, TokenBudget
from streamshard.batch_keys import (
    StreamingBatchSampler, start_prefetch, with_quarantine, with_reseed, with_skip,
)
from streamshard.sampler import Ledgers, sample_rng
from streamshard.mixing import reweight_ledgers
from streamshard.streams import SequenceHost, Stream
from streamshard.world import World

Transform = Callable[[dict, np.random.Generator], Any]


# The dtype collate_numpy gives the Python scalars the per-sample decoder returns.
_SCALAR_OUT = {"b": np.dtype(np.bool_), "i": np.dtype(np.int64), "u": np.dtype(np.int64),
               "f": np.dtype(np.float64)}


def row_dtype(schema: Any) -> np.dtype | None:
    """A numpy structured dtype of a fixed-size schema's encoded row (its columns' little-endian
    bytes back to back, docs/FORMAT.md), or ``None`` when a column varies in size."""
    if schema.fixed_size is None:
        return None
    fields = [(name, np.dtype(ct.dtype).newbyteorder("<"),
               () if ct.kind == "scalar" else tuple(ct.dims))
              for name, ct in schema.columns.items()]
    dtype = np.dtype(fields)
    return dtype if dtype.itemsize == schema.fixed_size else None


class RowGather:
    """The batches of one fixed-size dataset as numpy columns, equal to ``collate_numpy`` of the
    samples, read by the dataset's row gather (``Dataset.gather_rows``: one fancy index per
    batch over uncompressed maps or decompressed blocks, block by block otherwise)."""

    def __init__(self, ds: Any, dtype: np.dtype):
        self.ds, self.dtype = ds, dtype

    def __call__(self, sample_ids: np.ndarray) -> dict[str, np.ndarray]:
        ids = np.asarray(sample_ids, dtype=np.int64)
        size = self.dtype.itemsize
        out, order = self.ds.gather_rows(ids, size, np.dtype(np.uint8), size)
        if order is not None:  # read in offset order: back to the batch's order
            out = out[np.argsort(order)]
        rows = out.reshape(-1).view(self.dtype)
        columns = {}
        for name in self.dtype.names:
            col = rows[name]
            if col.ndim == 1:  # a scalar column: the dtype the per-sample path gives numbers
                columns[name] = col.astype(_SCALAR_OUT[col.dtype.kind])
            else:
                columns[name] = np.ascontiguousarray(col).astype(col.dtype.newbyteorder("="),
                                                                 copy=False)
        return columns


def collate_numpy(samples: Sequence[Any]) -> Any:
    """Stack a device batch column by column (see the module docstring)."""
    if not samples or not isinstance(samples[0], dict):
        return list(samples)
    out = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        first = values[0]
        if isinstance(first, np.ndarray) and all(
                isinstance(v, np.ndarray) and v.shape == first.shape and v.dtype == first.dtype
                for v in values):
            out[key] = np.stack(values)
        elif isinstance(first, (bool, int, float, np.generic)) and all(
                type(v) is type(first) for v in values):
            out[key] = np.asarray(values)
        else:
            out[key] = values
    return out


class NumpyBatchIterator(SequenceHost):
    """Device batches of one dataset or a weighted mixture as numpy, with exact O(1) resume.

    Arguments as :class:`streamshard.StreamingDataset` (``source`` is a path/URL or a list of
    :class:`Stream`; exactly one of ``batch_size`` per device and ``global_batch_size``).
    Iterating serves the rest of the current epoch; the next ``iter()`` starts the next one.
    What to read comes from the loader's own batch sampler
    (:class:`streamshard.batch_keys.StreamingBatchSampler`, which owns the step, the ledgers and
    the state), read here in this process. ``state_dict`` / ``load_state_dict`` / ``skip`` /
    ``reseed_from`` / ``quarantine`` behave as on ``StreamingDataLoader``. Not thread-safe.
    """

    _SINGLE_STREAM_PATHS = ("_rows",)  # the row gather: one stream only

    def __init__(self, source: str | Sequence[Stream], *, batch_size: int | None = None,
                 global_batch_size: int | None = None, order: OrderOptions | None = None,
                 reading: ReadOptions | None = None, world: World | None = None,
                 transform: Transform | None = None,
                 collate_fn: Callable[[list], Any] | None = None,
                 packing: Packing | TokenBudget | None = None, **options: Any):
        self.transform = transform
        self.collate_fn = collate_fn or collate_numpy
        # options, world, batch, streams, sequence: as StreamingDataset (streams.SequenceHost)
        self._open("NumpyBatchIterator", source, options, batch_size=batch_size,
                   global_batch_size=global_batch_size, order=order, reading=reading,
                   world=world, packing=packing, planner=packplan.Planner)
        self._keys = StreamingBatchSampler(self)  # owns the step, the ledgers and the state
        self._last_step: int | None = None
        self._generation = 0  # bumped by load_state_dict and ledger changes
        # One fixed-size stream, default collation, no transform: rows gathered as columns.
        rows = (row_dtype(self.datasets[0].schema) if len(self.datasets) == 1
                and transform is None and collate_fn is None and packing is None else None)
        self._rows = RowGather(self.datasets[0], rows) if rows is not None else None

    # -- position -----------------------------------------------------------------------------
    @property
    def step(self) -> int:
        """Absolute data step of the next batch (global batch index from epoch 0)."""
        return self.sequence_with(self._keys.ledgers).next_served_step(self._keys.step)

    @property
    def last_step(self) -> int | None:
        return self._last_step

    @property
    def epoch(self) -> int:
        return self.step // self.steps_per_epoch

    def __len__(self) -> int:
        return self.steps_per_epoch

    # -- iteration ----------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Any]:
        keys = self._keys
        while True:
            generation = self._generation
            keys.step, keys.stop = self.step, None  # the rest of the current epoch
            for key in keys:
                if key.prefetch:
                    start_prefetch(self.datasets, key)
                if isinstance(key, packplan.PackKey):  # numpy rows or buckets (packplan.py)
                    batch = packplan.serve(self, key)
                else:
                    batch = self._read(key.step, np.asarray(key.stream_ids, dtype=np.int64),
                                       np.asarray(key.sample_ids, dtype=np.int64))
                self._last_step, keys.step = key.step, key.step + 1
                yield batch
                if generation != self._generation:  # the state changed under us: re-plan
                    break
            else:
                return  # the epoch is over: the sampler moved to the next one

    def batch_at(self, step: int) -> Any:
        """This device's batch of absolute step ``step`` (with the current ledgers), collated."""
        w = self.world
        if self.packing is not None:
            return packplan.serve(self, self.pack_planner.key(step, self._keys.ledgers))
        streams, samples = self.sequence_with(self._keys.ledgers).batch(
            step, w.rank, w.world_size, w.local_world_size)
        return self._read(step, streams, samples)

    def _read(self, step: int, stream_ids: np.ndarray, sample_ids: np.ndarray) -> Any:
        if self._rows is not None:
            return self._rows(sample_ids)
        return self.collate_fn(self.fetch(step, stream_ids, sample_ids))

    def fetch(self, step: int, stream_ids: np.ndarray, sample_ids: np.ndarray) -> list:
        """The samples of one device batch, read and transformed, in order (uncollated)."""
        epoch = step // self.steps_per_epoch
        samples = []
        for stream, sample in zip(stream_ids.tolist(), sample_ids.tolist()):
            item = self.datasets[stream][sample]
            if self.transform is not None:
                item = self.transform(item, sample_rng(self.seed, epoch, stream, sample))
            samples.append(item)
        return samples

    # -- state (the batch sampler's) --------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The same small JSON-able state as ``StreamingDataLoader.state_dict()``."""
        return self._keys.state_at(self.step)

    def load_state_dict(self, state_dict: dict[str, Any], reweight: bool = False) -> None:
        """Restore strictly (a mismatch shows the saved and the live value side by side),
        adopting the saved lanes and block grouping where they were left to the defaults, as
        ``StreamingDataLoader`` does; ``reweight`` as ``StreamingDataLoader.load_state_dict``.
        A live iterator continues from the restored step."""
        self._keys.load_state_dict(state_dict, reweight)
        self._last_step = None
        self._generation += 1

    def skip(self, start_step: int, stop_step: int) -> None:
        """Never serve absolute data steps ``[start_step, stop_step)``. Idempotent."""
        self._set_ledgers(with_skip(self._keys.ledgers, start_step, stop_step))

    def reseed_from(self, step: int, salt: int) -> None:
        """Re-permute the rest of ``step``'s epoch (and key later epochs) with ``salt``."""
        self._set_ledgers(with_reseed(self._keys.ledgers, step, salt))

    def quarantine(self, entries) -> None:
        """Never serve these ``(stream, sample_id, from_step)`` samples again (see
        ``StreamingDataLoader.quarantine``)."""
        self._set_ledgers(with_quarantine(self._keys.ledgers, entries))

    def reweight(self, weights, from_step: int | None = None) -> None:
        """As ``StreamingDataLoader.reweight`` (docs/LOADER.md, "Mixtures that change")."""
        self._set_ledgers(reweight_ledgers(self.sequence_with(self._keys.ledgers), self.streams,
                                           weights, from_step, self.step))

    @property
    def ledgers(self) -> Ledgers:
        return self._keys.ledgers

    def _set_ledgers(self, ledgers: Ledgers) -> None:
        if ledgers != self._keys.ledgers:
            self._keys.ledgers = ledgers
            self._generation += 1

    def close(self) -> None:
        for ds in self.datasets:
            ds.close()

    def __repr__(self) -> str:
        names = ", ".join(s.describe() for s in self.streams)
        return (f"NumpyBatchIterator([{names}], global_batch_size={self.global_batch_size}, "
                f"steps_per_epoch={self.steps_per_epoch}, {self.world})")
