"""``StreamingDataLoader``: a DataLoader that knows which global batch the training loop consumed.

A plain ``DataLoader`` over the map-style :class:`StreamingDataset` with its batch sampler
(:mod:`streamshard.batch_keys`) in the main process: the loader sets the steps the sampler
yields keys for, workers read what the keys say. State is a few integers plus the dataset
fingerprints and the sampler settings (:mod:`streamshard.state`). It counts batches returned to
the training loop, never what workers prefetched, and it is the same on every rank.
``load_state_dict`` is arithmetic: the next ``iter()`` starts at the saved step; nothing is
replayed.
"""

from __future__ import annotations

import itertools
from typing import Any, Callable, Iterator

import torch.utils.data

from streamshard.batch_keys import (
    BatchCollate, StreamingBatchSampler, Tagged, sequence_fields, with_quarantine, with_reseed,
    with_skip,
)
from streamshard.collate import cast_tokens
from streamshard.dataset import StreamingDataset
from streamshard.errors import ConfigError
from streamshard.mixing import reweight_ledgers, restore
from streamshard.sampler.ledgers import Ledgers
from streamshard.state import KEY_STEP, build_state


# Batches read at once at 0 workers: amortizes a gather's fixed numpy costs (~10 us) over the
# chunk; 8 batches of 32 x uint16[1024] hold 512 KB of rows in flight.
READ_AHEAD = 8


class StreamingDataLoader(torch.utils.data.DataLoader):
    """A ``DataLoader`` over a :class:`StreamingDataset` with exact, world-size-free resume.

    Each ``iter()`` serves the rest of the current epoch from the loader's step; after a full
    epoch the next ``iter()`` starts the next one. ``batch_size``/``sampler`` are owned by the
    dataset; every other DataLoader argument (``num_workers``, ``persistent_workers``,
    ``pin_memory``, ``prefetch_factor``, ``multiprocessing_context``, ...) is passed through.
    Implements torchdata's ``Stateful`` protocol (``state_dict``/``load_state_dict``).
    Without ``collate_fn`` batches are collated by :func:`streamshard.collate.collate`, which
    returns exactly what torch's ``default_collate`` would, faster, except that uint16/uint32
    token arrays come out as the dataset's ``token_dtype`` (int64 by default).
    """

    def __init__(self, dataset: StreamingDataset, *, collate_fn: Callable | None = None, **kwargs):
        if not isinstance(dataset, StreamingDataset):
            raise ConfigError(
                f"StreamingDataLoader needs a StreamingDataset, got {type(dataset).__name__}"
            )
        if "batch_size" in kwargs and kwargs["batch_size"] != dataset.batch_size:
            raise ConfigError(
                f"batch_size={kwargs['batch_size']!r} differs from the StreamingDataset's batch "
                f"of {dataset.batch_size} samples for this rank: set it on the dataset only")
        kwargs.pop("batch_size", None)  # the same value is accepted (and owned by the dataset)
        for owned in ("shuffle", "sampler", "batch_sampler", "drop_last"):
            if owned in kwargs:
                raise ConfigError(
                    f"{owned} is set on the StreamingDataset, not on StreamingDataLoader"
                )
        if kwargs.get("in_order", True) is not True:
            raise ConfigError("StreamingDataLoader needs in_order=True: it counts batches in order")
        # With workers, fixed-size token columns cross to this process as stored (uint16: a
        # quarter of int64's bytes of shared memory to fault in on both sides) and are converted
        # here. Not with pin_memory: the pinning thread must see the final tensors.
        self._cast_tokens = (collate_fn is None and bool(kwargs.get("num_workers"))
                             and not kwargs.get("pin_memory") and dataset.token_dtype is not None
                             and dataset._columns is not None and dataset.packing is None)
        self._keys = StreamingBatchSampler(dataset, columnar=collate_fn is None, tagged=True,
                                           raw_tokens=self._cast_tokens)
        if kwargs.get("num_workers"):  # obstore does not survive fork: forkserver by default
            from streamshard.remote.obstore_fs import worker_context

            kwargs["multiprocessing_context"] = worker_context(
                dataset.streams, dataset.reading.storage_options,
                kwargs.get("multiprocessing_context"))
        super().__init__(
            dataset,
            batch_sampler=self._keys,
            collate_fn=BatchCollate(collate_fn or dataset.collate_fn),
            **kwargs,
        )
        # At 0 workers the fast path gathers straight into pinned memory (no pinning copy).
        dataset.pin_memory = bool(kwargs.get("pin_memory")) and not kwargs.get("num_workers")
        self.streaming_dataset = dataset
        self._step = 0
        self._last_step: int | None = None
        self._ledgers = Ledgers()  # skips, reseeds, quarantine: one value (sampler/ledgers.py)
        self._generation = 0  # bumped by every state change that invalidates a live plan

    # -- position -----------------------------------------------------------------------------
    @property
    def steps_per_epoch(self) -> int:
        return self.streaming_dataset.steps_per_epoch

    @property
    def step(self) -> int:
        """Absolute data step of the next batch this loader will serve."""
        return self._sequence().next_served_step(self._step)

    @property
    def last_step(self) -> int | None:
        """Absolute data step of the batch returned last (``None`` before the first)."""
        return self._last_step

    @property
    def epoch(self) -> int:
        return self.step // self.steps_per_epoch

    def _sequence(self):
        return self.streaming_dataset.sequence_with(self._ledgers)

    # -- iteration ----------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Any]:
        return _LoaderIterator(self)

    def _start_epoch_iteration(self) -> tuple[int, int, Iterator]:
        """Point the batch sampler at the rest of the current epoch and start the DataLoader."""
        start = self.step
        stop = (start // self.steps_per_epoch + 1) * self.steps_per_epoch
        keys = self._keys
        keys.step, keys.stop, keys.ledgers = start, stop, self._ledgers
        if self._reads_in_process():
            return start, stop, self._in_process(keys)
        return start, stop, super().__iter__()

    def _reads_in_process(self) -> bool:
        return self.num_workers == 0 and not self.pin_memory

    def _in_process(self, keys: StreamingBatchSampler) -> Iterator[Any]:
        """What torch's single-process iterator does without pinning (fetch a key's batch with
        ``__getitems__``, collate it), minus its per-batch profiler scope and fetcher layers,
        and on the fixed-size fast path reading ``READ_AHEAD`` keys at a time
        (:meth:`StreamingDataset.read_keys`: one gather for all of them). Reading ahead moves
        no state: the loader counts the batches it returns, and a state change mid-chunk drops
        the rest (as a worker's prefetched batches are dropped)."""
        dataset, collate = self.streaming_dataset, self.collate_fn
        if not dataset.reads_ahead():  # read each key when it is asked for, as torch would
            for key in keys:
                yield collate(dataset.__getitems__(key))
            return
        it = iter(keys)
        while chunk := list(itertools.islice(it, READ_AHEAD)):
            for batch in dataset.read_keys(chunk):
                yield collate(batch)

    # -- state --------------------------------------------------------------------------------
    def _live_state(self) -> dict:
        ds = self.streaming_dataset
        return build_state(
            fingerprints=ds.fingerprints,
            sequence=sequence_fields(ds),
            steps_per_epoch=self.steps_per_epoch,
            step=self.step,
            ledgers=self._ledgers,
        )

    def state_dict(self) -> dict[str, Any]:
        """Small JSON-able state, identical on every rank; counts consumed batches only."""
        return self._live_state()

    def load_state_dict(self, state_dict: dict[str, Any], reweight: bool = False) -> None:
        """Restore a state from :meth:`state_dict`, strictly (see :mod:`streamshard.state`).

        A mixture built with other weights than the saved ones is refused unless ``reweight``:
        then the new weights apply from the saved step and the state keeps the history
        (:mod:`streamshard.mixing`). A live iterator notices and continues from the restored
        step."""
        self._ledgers = restore(self.streaming_dataset, state_dict, self._live_state, reweight)
        self._step = int(state_dict[KEY_STEP])
        self._last_step = None
        self._generation += 1

    def skip(self, start_step: int, stop_step: int) -> None:
        """Never serve absolute data steps ``[start_step, stop_step)``. Idempotent."""
        self._set_ledgers(with_skip(self._ledgers, start_step, stop_step))

    def reseed_from(self, step: int, salt: int) -> None:
        """Re-permute the rest of ``step``'s epoch (and key later epochs) with ``salt``. Idempotent."""
        self._set_ledgers(with_reseed(self._ledgers, step, salt))

    def quarantine(self, entries) -> None:
        """Never serve these samples again: ``(stream, sample_id, from_step)`` entries (or a
        ``Ledgers`` to merge). Their positions are filled by the sampler's deterministic rule
        (docs/SAMPLER.md), so batches stay full; steps before ``from_step`` are unchanged.
        Idempotent; merged like skips."""
        self._set_ledgers(with_quarantine(self._ledgers, entries))

    def reweight(self, weights, from_step: int | None = None) -> None:
        """Serve the mixture with ``weights`` (one per stream, or a dict by source) from
        absolute step ``from_step`` (default: the next step this loader serves) on: every block
        of ``M`` positions from that step's first position holds exactly the new counts, and
        each stream still serves each sample once per its own epoch. A served step is refused.
        A ledger entry (in the state, identical on all ranks); idempotent."""
        ds = self.streaming_dataset
        self._set_ledgers(reweight_ledgers(self._sequence(), ds.streams, weights, from_step,
                                           self.step))

    def apply_ledgers(self, ledgers: Ledgers) -> None:
        """Merge every ledger of ``ledgers`` into this loader's (idempotent)."""
        self._set_ledgers(self._ledgers.merged(ledgers))

    def rewind(self, step: int) -> None:
        """Serve absolute step ``step`` next (e.g. to re-serve a step after a quarantine)."""
        if not isinstance(step, int) or step < 0:
            raise ConfigError(f"rewind needs a step >= 0, got {step!r}")
        self._step, self._last_step = step, None
        self._generation += 1

    def _set_ledgers(self, ledgers: Ledgers) -> None:
        if ledgers != self._ledgers:
            self._ledgers = ledgers
            self._generation += 1

    @property
    def ledgers(self) -> Ledgers:
        return self._ledgers

    @property
    def skips(self) -> list[tuple[int, int]]:
        return list(self._ledgers.skips)

    @property
    def reseeds(self) -> list[tuple[int, int]]:
        return list(self._ledgers.reseeds)

    # -- forensics ------------------------------------------------------------------------------
    def samples_at(self, step: int, *, keys: bool = True) -> list:
        """The samples of global batch ``step`` (absolute data step) with their sources, ranks and
        quarantine fills: a list of :class:`streamshard.explain.SampleRef`. Pure arithmetic on
        the sequence plus, with ``keys``, one read per sample for its id/path columns."""
        from streamshard.explain import samples_at

        ds = self.streaming_dataset
        return samples_at(self._sequence(), ds.datasets, step, world_size=ds.world.world_size,
                          local_world_size=ds.world.local_world_size, keys=keys)

    def samples_between(self, start: int, stop: int, *, keys: bool = True) -> dict[int, list]:
        """``{step: samples_at(step)}`` for the served steps in ``[start, stop)``."""
        return {s: self.samples_at(s, keys=keys) for s in self._sequence().served_steps(start, stop)}


class _LoaderIterator:
    """Iterates one epoch; re-plans transparently when the loader's state changes under it."""

    def __init__(self, loader: StreamingDataLoader):
        self._loader = loader
        self._begin()

    def _begin(self) -> None:
        loader = self._loader
        self._generation = loader._generation
        self._start, self._stop, self._inner = loader._start_epoch_iteration()
        self._seq = loader._sequence()
        self._served = 0
        # Keys read in this process, in the sampler's order, cannot arrive out of order.
        self._checked = not loader._reads_in_process()

    def __iter__(self):
        return self

    def __len__(self) -> int:
        return len(self._loader)

    def __next__(self) -> Any:
        loader = self._loader
        if self._generation != loader._generation:
            self._begin()
        try:
            tagged = next(self._inner)
        except StopIteration:
            # The epoch is over: the next iter() starts the next epoch.
            loader._step = max(loader._step, self._stop)
            raise
        if not isinstance(tagged, Tagged):
            raise RuntimeError(f"StreamingDataLoader got a {type(tagged).__name__}, not a step-tagged "
                               "batch: do not replace its dataset, batch sampler or collate_fn")
        step, batch = tagged
        if self._checked:  # batches that came through torch's iterator (and its workers)
            expected = self._seq.nth_served_step(self._start, self._served)
            if step != expected:
                raise RuntimeError(f"batch order broken: got step {step}, expected {expected}")
        self._served += 1
        loader._last_step = step
        loader._step = step + 1
        if loader._cast_tokens:
            batch = cast_tokens(batch, loader.streaming_dataset.token_dtype)
        return batch
