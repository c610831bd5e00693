"""Checkpoints through ``torch.distributed.checkpoint`` (DCP), written atomically, reshardable.

Layout of ``<root>/step-000000120/`` (``step`` = training steps completed; resume runs step 120):

- DCP files (``.metadata``, ``__<rank>_0.distcp``): model and optimizer *tensors* only, under
  canonical names from ``get_state_dict`` (``model.<fqn>``, ``optim.state.<fqn>.<key>``), so a
  checkpoint saved by N ranks loads at M ranks (DCP reshards; replicated DDP tensors are saved once).
- ``meta.json``: step, data step, generation, world size, the optimizer's non-tensor settings,
  the LR scheduler's state, ``loader.state_dict()`` and caller extras (recovery state). JSON, so
  nothing of ours is ever unpickled. (DCP's own ``.metadata`` is a pickle by torch's design;
  checkpoints are trusted files this job wrote, never downloaded input.)
- ``rng-rank<r>.json``: Python, NumPy and torch CPU RNG states of rank r.
- ``COMPLETE``: written last, inside the temp dir.

Atomicity: every rank writes into ``.tmp-step-...``; after a barrier rank 0 writes ``COMPLETE``,
fsyncs, and renames the directory into place (one ``rename``), then prunes to the newest ``keep``
valid checkpoints. A crash at any point leaves either no ``step-N`` or a complete one; stale temp
dirs are removed by the next save.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from streamshard.atomic import atomic_write_json
from streamshard.errors import ConfigError, CorruptionError, StateMismatchError
from streamshard.recovery.policy import CheckpointRef
from streamshard.world import World

VERSION = 1
COMPLETE = "COMPLETE"
META = "meta.json"
_NAME = re.compile(r"^step-(\d{9})$")
_OPTS = StateDictOptions(flatten_optimizer_state_dict=True)


@dataclass(frozen=True)
class CheckpointInfo:
    step: int
    data_step: int
    generation: int
    world_size: int
    path: Path

    @property
    def ref(self) -> CheckpointRef:
        return CheckpointRef(self.step, self.data_step, self.generation)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _numpy_state() -> list:
    name, keys, pos, has_gauss, gauss_value = np.random.get_state(legacy=True)
    return [name, keys.tolist(), int(pos), int(has_gauss), float(gauss_value)]


def rng_state() -> dict:
    py = random.getstate()
    return {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": _numpy_state(),
        "torch": torch.get_rng_state().tolist(),
    }


def set_rng_state(state: dict) -> None:
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    name, keys, pos, has_gauss, gauss_value = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss_value))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))


def _jsonable(value, key: str):
    if isinstance(value, tuple):
        return list(value)
    if value is None or isinstance(value, (bool, int, float, str, list, dict)):
        return value
    raise ConfigError(f"optimizer setting {key!r} is not JSON-able: {type(value).__name__}")


class CheckpointManager:
    """Save/find/load step checkpoints under ``root`` (a local or shared POSIX directory).

    Collective: ``save`` and ``load`` must be called by every rank of the default process group
    (barriers inside when one is initialized). ``valid`` filters checkpoints that a rollback
    invalidated (``Recovery.ledger.is_valid``); invalid ones are pruned first.
    """

    def __init__(self, root: str | os.PathLike, *, world: World = World(), keep: int = 3,
                 valid: Callable[[CheckpointRef], bool] | None = None):
        if keep < 1:
            raise ConfigError(f"keep must be >= 1, got {keep}")
        self.root = Path(root)
        self.world = world
        self.keep = keep
        self._valid = valid or (lambda ref: True)

    # ---- discovery ----------------------------------------------------------------------------

    def list(self) -> list[CheckpointInfo]:
        """Complete checkpoints, oldest first (incomplete or unreadable ones are ignored)."""
        out = []
        if not self.root.is_dir():
            return out
        for d in self.root.iterdir():
            if not _NAME.match(d.name) or not (d / COMPLETE).is_file():
                continue
            try:
                meta = json.loads((d / META).read_text())
                out.append(CheckpointInfo(int(meta["step"]), int(meta["data_step"]), int(meta["generation"]),
                                          int(meta["world_size"]), d))
            except (OSError, ValueError, KeyError):
                continue
        return sorted(out, key=lambda c: c.step)

    def refs(self) -> list[CheckpointRef]:
        return [c.ref for c in self.list() if self._valid(c.ref)]

    def latest(self) -> CheckpointInfo | None:
        """Newest complete and valid checkpoint, or None."""
        good = [c for c in self.list() if self._valid(c.ref)]
        return good[-1] if good else None

    # ---- save ---------------------------------------------------------------------------------

    def _barrier(self) -> None:
        if _distributed():
            dist.barrier()

    def save(self, step: int, *, model: torch.nn.Module, data_step: int, optimizer=None, scheduler=None,
             loader=None, generation: int = 0, extra: dict | None = None) -> CheckpointInfo:
        name = f"step-{step:09d}"
        final, tmp = self.root / name, self.root / f".tmp-{name}"
        if self.world.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        self._barrier()
        msd, osd = get_state_dict(model, optimizer if optimizer is not None else [], options=_OPTS)
        tensors = {f"model.{k}": v for k, v in msd.items()}
        tensors.update({f"optim.{k}": v for k, v in osd.items() if torch.is_tensor(v)})
        with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            dcp.save(tensors, checkpoint_id=str(tmp), no_dist=not _distributed())
        atomic_write_json(tmp / f"rng-rank{self.world.rank}.json", rng_state())
        if self.world.rank == 0:
            atomic_write_json(tmp / META, {
                "version": VERSION, "step": step, "data_step": data_step, "generation": generation,
                "world_size": self.world.world_size,
                "optim": {k: _jsonable(v, k) for k, v in osd.items() if not torch.is_tensor(v)},
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "loader": loader.state_dict() if loader is not None else None,
                "extra": extra or {},
            })
        self._barrier()
        if self.world.rank == 0:
            with open(tmp / COMPLETE, "w") as f:
                f.write(f"{step}\n")
                f.flush()
                os.fsync(f.fileno())
            _fsync_dir(tmp)
            if final.exists():  # same step re-saved after a rollback: the old one is invalid
                trash = self.root / f".old-{name}-{os.getpid()}"
                os.replace(final, trash)
                shutil.rmtree(trash)
            os.replace(tmp, final)
            _fsync_dir(self.root)
            self._prune()
        self._barrier()
        return CheckpointInfo(step, data_step, generation, self.world.world_size, final)

    def _prune(self) -> None:
        infos = self.list()
        valid = [c for c in infos if self._valid(c.ref)]
        doomed = [c for c in infos if not self._valid(c.ref)] + valid[:-self.keep]
        for c in doomed:
            trash = self.root / f".old-{c.path.name}-{os.getpid()}"
            os.replace(c.path, trash)
            shutil.rmtree(trash, ignore_errors=True)

    # ---- load ---------------------------------------------------------------------------------

    def load(self, step: int, *, model: torch.nn.Module, optimizer=None, scheduler=None, loader=None,
             restore_rng: bool = True) -> dict:
        """Load checkpoint ``step`` into the live objects; returns its ``extra`` dict.
        The loader state is restored strictly (StateMismatchError shows saved vs live)."""
        path = self.root / f"step-{step:09d}"
        if not (path / COMPLETE).is_file():
            raise CorruptionError(f"{path}: not a complete checkpoint (no {COMPLETE} marker)")
        meta = json.loads((path / META).read_text())
        if meta.get("version") != VERSION:
            raise StateMismatchError(f"{path / META}: checkpoint version saved {meta.get('version')!r}, "
                                     f"live {VERSION}")
        msd, osd = get_state_dict(model, optimizer if optimizer is not None else [], options=_OPTS)
        tensors = {f"model.{k}": v for k, v in msd.items()}
        tensors.update({f"optim.{k}": v for k, v in osd.items() if torch.is_tensor(v)})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(tensors, checkpoint_id=str(path), no_dist=not _distributed())
        model_sd = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
        if optimizer is not None:
            optim_sd = {k[len("optim."):]: v for k, v in tensors.items() if k.startswith("optim.")}
            for k, v in meta["optim"].items():
                live = osd.get(k)
                optim_sd[k] = tuple(v) if isinstance(live, tuple) else v
            set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd, options=_OPTS)
        else:
            set_state_dict(model, [], model_state_dict=model_sd, optim_state_dict={}, options=_OPTS)
        if scheduler is not None and meta["scheduler"] is not None:
            scheduler.load_state_dict(meta["scheduler"])
        if loader is not None and meta["loader"] is not None:
            loader.load_state_dict(meta["loader"])
        rng_file = path / f"rng-rank{self.world.rank}.json"
        if restore_rng and rng_file.is_file():
            # A rank that did not exist at save time keeps its own (seeded) RNG state.
            set_rng_state(json.loads(rng_file.read_text()))
        return meta["extra"]
