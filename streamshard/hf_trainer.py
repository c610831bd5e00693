"""Hugging Face ``transformers.Trainer`` over a :class:`StreamingDataset`, with exact O(1) resume.

``StreamingTrainer`` is a ``Trainer`` whose training data comes from a
:class:`~streamshard.loader.StreamingDataLoader`, and whose checkpoints carry that loader's state:

- **Save.** Every checkpoint folder gets ``streamshard_loader.json`` (the loader state, a few
  integers and the ledgers, plus the Trainer step it belongs to), written atomically *before* the
  Trainer writes the rest of the checkpoint, so a folder with ``trainer_state.json`` always has it.
- **Resume.** ``train(resume_from_checkpoint=...)`` (a path, or ``True`` for the newest) restores
  the loader from that file: arithmetic, no batch is read twice. The Trainer's own data skipping
  (accelerate's ``skip_first_batches``, which re-iterates the skipped batches and cannot drive a
  StreamingDataLoader) is switched off (``ignore_data_skip``): the loader already stands at the
  next unconsumed batch.
- **Steps.** Each micro-batch is one loader step (one global batch of the dataset): with
  ``gradient_accumulation_steps=A`` an optimizer step consumes ``A`` loader steps, and a
  checkpoint at Trainer step ``k`` holds loader step ``k * A`` (from a fresh start).
- **World.** The dataset's world (``torch.distributed`` under torchrun) must be the Trainer's,
  and ``per_device_train_batch_size`` this rank's share of the dataset's global batch; each rank
  reads its own part of every global batch, so the loader is not wrapped by accelerate (which
  would shard it again); the Trainer still moves batches to the device.

The Trainer sees the loader as a stream without a length (the whole run is one Trainer "epoch"
of ``max_steps``; the loader crosses its own epochs), so ``max_steps`` is required. Import this
module only with ``transformers`` and ``accelerate`` installed (``pip install
'streamshard[hf-trainer]'``).
"""

from __future__ import annotations

import inspect
import json
import logging
import os
from typing import Any, Callable, Iterator

import torch

from streamshard.atomic import atomic_write_json
from streamshard.dataset import StreamingDataset
from streamshard.errors import ConfigError, StateMismatchError, missing_dependency
from streamshard.loader import StreamingDataLoader

try:
    from transformers import Trainer
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint
except ModuleNotFoundError as exc:  # pragma: no cover - exercised only without the extra
    raise missing_dependency("transformers", "hf-trainer", "streamshard.hf_trainer") from exc

log = logging.getLogger(__name__)

LOADER_STATE_NAME = "streamshard_loader.json"
STATE_KIND = "streamshard.hf_trainer"
STATE_VERSION = 1
# A loader whose epochs serve nothing (all skipped) this many times in a row is broken.
MAX_EMPTY_EPOCHS = 1000


class TrainerBatches:
    """The loader as the Trainer iterates it: batches across the loader's epochs, no length.

    Without ``__len__`` the Trainer runs one "epoch" of ``max_steps`` and never asks for a skip;
    the loader's own epochs follow each other inside it. ``keep`` (the model's forward arguments,
    or ``None`` for all) drops the other columns of a dict batch (``remove_unused_columns``).
    """

    def __init__(self, loader: StreamingDataLoader, keep: frozenset[str] | None = None):
        self.loader = loader
        self.keep = keep

    def __iter__(self) -> Iterator[Any]:
        empty = 0
        while empty < MAX_EMPTY_EPOCHS:
            served = False
            for batch in self.loader:
                served = True
                if self.keep is not None and isinstance(batch, dict):
                    batch = {k: v for k, v in batch.items() if k in self.keep}
                yield batch
            empty = 0 if served else empty + 1
        raise RuntimeError(f"the StreamingDataLoader served nothing in {MAX_EMPTY_EPOCHS} epochs "
                           "in a row: its skips cover every step")


def save_loader_state(folder: str, loader: StreamingDataLoader, global_step: int) -> str:
    """Write ``streamshard_loader.json`` into a checkpoint folder (atomically); returns its path."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, LOADER_STATE_NAME)
    atomic_write_json(path, {"kind": STATE_KIND, "version": STATE_VERSION,
                             "global_step": int(global_step), "loader": loader.state_dict()})
    return path


def read_loader_state(folder: str, global_step: int | None = None) -> dict[str, Any]:
    """The loader state saved in checkpoint ``folder``; checks it belongs to Trainer step
    ``global_step`` (from the folder's ``trainer_state.json``) when that is given."""
    path = os.path.join(folder, LOADER_STATE_NAME)
    if not os.path.isfile(path):
        raise StateMismatchError(
            f"checkpoint {folder} has no {LOADER_STATE_NAME}: it was not saved by "
            "StreamingTrainer (or its save was cut short). Resume from a checkpoint StreamingTrainer "
            "wrote, or start the data from a state you load with trainer.streaming_loader")
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
    except (OSError, ValueError) as exc:
        raise StateMismatchError(f"{path}: not a readable loader state ({exc})") from None
    if not isinstance(saved, dict) or saved.get("kind") != STATE_KIND:
        raise StateMismatchError(f"{path}: not a {STATE_KIND} file")
    if saved.get("version") != STATE_VERSION:
        raise StateMismatchError(f"{path}: version {saved.get('version')!r}, this streamshard "
                                 f"reads version {STATE_VERSION}")
    step, loader = saved.get("global_step"), saved.get("loader")
    if isinstance(step, bool) or not isinstance(step, int) or not isinstance(loader, dict):
        raise StateMismatchError(f"{path}: malformed (needs an int global_step and a loader state)")
    if global_step is not None and step != global_step:
        raise StateMismatchError(
            f"{path} was saved at Trainer step {step}, but the checkpoint's trainer_state.json "
            f"is at step {global_step}: the folder mixes two saves")
    return loader


def _checkpoint_step(folder: str) -> int | None:
    """global_step of the checkpoint's trainer_state.json (None when it has none)."""
    try:
        with open(os.path.join(folder, "trainer_state.json"), encoding="utf-8") as f:
            step = json.load(f).get("global_step")
    except FileNotFoundError:
        return None
    except (OSError, ValueError, AttributeError) as exc:
        raise StateMismatchError(f"{folder}/trainer_state.json is unreadable: {exc}") from None
    return step if isinstance(step, int) and not isinstance(step, bool) else None


class StreamingTrainer(Trainer):
    """``transformers.Trainer`` for a :class:`StreamingDataset` ``train_dataset``: exact resume.

    Arguments are the Trainer's. With a StreamingDataset:

    - ``data_collator`` left out: batches are the dataset's own collation (the columnar fast
      path for fixed-size columns; uint16/uint32 tokens as int64). Given: it receives each rank
      batch as a list of sample dicts, as an HF collator does. Either way, with
      ``remove_unused_columns`` the columns the model's ``forward`` does not take are dropped.
    - ``args.max_steps`` must be set; ``per_device_train_batch_size`` must equal the dataset's
      batch for this rank (``global_batch_size / world_size``: a global batch the world size
      does not divide is refused, since the Trainer averages the loss per rank).
    - ``args.ignore_data_skip`` is set to True (logged): the loader's saved state resumes it.
    - DataLoader settings (``dataloader_num_workers``, ``_pin_memory``, ``_persistent_workers``,
      ``_prefetch_factor``, ``_multiprocessing_context``) pass through; shuffling, ``drop_last``
      and the seed are the dataset's (``args.data_seed``/``dataloader_drop_last`` do not apply).

    ``trainer.streaming_loader`` is the live :class:`StreamingDataLoader` once training starts
    (``skip``, ``reseed_from``, ``quarantine`` and ``samples_at`` work on it; its ledgers are
    saved with every checkpoint). Any other ``train_dataset`` trains as with ``Trainer``.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        bound = inspect.signature(Trainer.__init__).bind_partial(None, *args, **kwargs).arguments
        # None: the dataset's own collation (Trainer would put default_data_collator here).
        self._streaming_collator: Callable | None = bound.get("data_collator")
        super().__init__(*args, **kwargs)
        self.streaming_loader: StreamingDataLoader | None = None
        self._streaming_resume: tuple[str, dict] | None = None  # (checkpoint, loader state)
        if isinstance(self.train_dataset, StreamingDataset):
            self._check_streaming_setup(self.train_dataset)

    def _check_streaming_setup(self, ds: StreamingDataset) -> None:
        args = self.args
        if args.max_steps is None or args.max_steps <= 0:
            raise ConfigError(
                f"StreamingTrainer needs TrainingArguments(max_steps=...) > 0, got {args.max_steps}: "
                f"the dataset serves {ds.steps_per_epoch} steps per epoch, each micro-batch is one "
                f"step, so E epochs are max_steps = E * {ds.steps_per_epoch} // "
                f"gradient_accumulation_steps")
        world = ds.world
        if (world.rank, world.world_size) != (args.process_index, args.world_size):
            raise ConfigError(
                f"the StreamingDataset was built for rank {world.rank} of {world.world_size}, the "
                f"Trainer runs rank {args.process_index} of {args.world_size}: build the dataset "
                "after TrainingArguments, or pass world=World(rank, world_size)")
        G, D = ds.global_batch_size, world.world_size
        if G % D:
            raise ConfigError(
                f"global batch {G} is not divisible by {D} ranks: rank batches would differ by one "
                "sample and the Trainer averages the loss per rank, weighing samples unequally; "
                "use a global batch the world size divides")
        if self._train_batch_size != ds.batch_size:
            raise ConfigError(
                f"per_device_train_batch_size={args.per_device_train_batch_size} (Trainer batch "
                f"{self._train_batch_size}) differs from the StreamingDataset's batch of "
                f"{ds.batch_size} samples for this rank: set both to the same value")
        if not args.ignore_data_skip:
            log.info("StreamingTrainer sets ignore_data_skip=True: checkpoints carry the loader "
                     "state (%s), which resumes the data in O(1) without replaying batches",
                     LOADER_STATE_NAME)
            args.ignore_data_skip = True

    # -- training -------------------------------------------------------------------------------
    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any):
        if isinstance(resume_from_checkpoint, bool):
            found = get_last_checkpoint(self.args.output_dir) if resume_from_checkpoint else None
            if resume_from_checkpoint and found is None:
                raise ValueError(f"No valid checkpoint found in output directory ({self.args.output_dir})")
            resume_from_checkpoint = found
        self._streaming_resume = None
        if resume_from_checkpoint is not None and isinstance(self.train_dataset, StreamingDataset):
            folder = str(resume_from_checkpoint)
            done = _checkpoint_step(folder)
            if done is not None and done >= self.args.max_steps:
                # The Trainer would train one step past max_steps here (a stream without a
                # length counts the whole run as one epoch, and that epoch is over).
                raise ConfigError(f"{folder} is at step {done} and max_steps is "
                                  f"{self.args.max_steps}: nothing is left to train; raise "
                                  "max_steps to continue")
            # Read (and check) before the Trainer loads any weights: fail fast.
            self._streaming_resume = (folder, read_loader_state(folder, done))
        try:
            return super().train(resume_from_checkpoint, *args, **kwargs)
        finally:
            self._streaming_resume = None

    def get_train_dataloader(self):
        ds = self.train_dataset
        if not isinstance(ds, StreamingDataset):
            return super().get_train_dataloader()
        args = self.args
        collate = self._streaming_collator
        if collate is not None:  # HF semantics: the collator gets whole samples
            collate = self._get_collator_with_removed_columns(collate, description="training")
        extra: dict[str, Any] = {}
        if args.dataloader_num_workers:
            extra.update(persistent_workers=args.dataloader_persistent_workers,
                         prefetch_factor=args.dataloader_prefetch_factor,
                         multiprocessing_context=args.dataloader_multiprocessing_context)
        # Its own generator: DataLoader draws a base seed from it at every iter(), and drawing
        # from torch's global RNG there would shift the dropout stream the Trainer restored from
        # the checkpoint (the resumed run's first iter() comes after that restore).
        generator = torch.Generator()
        generator.manual_seed(args.seed)
        loader = StreamingDataLoader(ds, collate_fn=collate, generator=generator,
                                     num_workers=args.dataloader_num_workers,
                                     pin_memory=args.dataloader_pin_memory, **extra)
        if self._streaming_resume is not None:
            folder, state = self._streaming_resume
            loader.load_state_dict(state)
            log.info("resumed the StreamingDataLoader at data step %d from %s", loader.step, folder)
        self.streaming_loader = loader
        keep = None
        if args.remove_unused_columns and collate is None:
            self._set_signature_columns_if_needed()
            keep = frozenset(self._signature_columns)
        return TrainerBatches(loader, keep)

    def _save_checkpoint(self, model: Any, trial: Any, *args: Any, **kwargs: Any) -> None:
        # Written before the Trainer's files: a checkpoint with trainer_state.json has it too.
        if self.streaming_loader is not None and self.args.should_save:
            folder = os.path.join(self._get_output_dir(trial=trial),
                                  f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            save_loader_state(folder, self.streaming_loader, self.state.global_step)
        super()._save_checkpoint(model, trial, *args, **kwargs)
