"""Checkpoints through ``torch.distributed.checkpoint`` (DCP) on any fsspec URL, verified on load.

Layout of ``<root>/step-000000120/`` (``step`` = training steps completed; resume runs step 120):

- DCP files (``.metadata``, ``__<rank>_0.distcp``): model and optimizer *tensors* only, under
  canonical names from ``get_state_dict`` (``model.<fqn>``, ``optim.state.<fqn>.<key>``), so a
  checkpoint saved by N ranks loads at M ranks (DCP reshards; replicated DDP tensors are saved once).
- ``meta.json``: step, data step, generation, world size, the optimizer's non-tensor settings,
  the LR scheduler's state, ``loader.state_dict()`` and caller extras (recovery state). JSON, so
  nothing of ours is ever unpickled. (DCP's own ``.metadata`` is a pickle by torch's design;
  checkpoints are trusted files this job wrote, never downloaded input.)
- ``rng-rank<r>.json``: Python, NumPy and torch CPU RNG states of rank r.
- ``MANIFEST.json``: size and xxh64 of every other file, written last (see :mod:`manifest`).

Root: a local path or any fsspec URL (``s3://bucket/run1`` with ``storage_options``); DCP writes
through its ``FileSystemWriter`` locally and its fsspec writer elsewhere. A directory without a
manifest is an unfinished save and is never loaded; ``latest()`` verifies the newest candidate
(every rank hashes a share of the files) and quarantines it when it fails, then tries the one before.

Async (``async_save=True``): ``save`` returns once DCP has staged the tensors to CPU memory
(``dcp.async_save``); writing, hashing, the manifest and pruning run in a background thread over a
dedicated gloo group, so the training loop's collectives never interleave with the checkpoint's.
The next ``save``/``latest``/``load``/``wait`` joins it first and re-raises its error.

Retention: after each save, keep the newest ``keep`` valid checkpoints and the last one that passed
a load-time verification (``LAST_GOOD.json``), whichever are older; quarantined ones are kept under
``quarantine/`` for a post-mortem.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from streamshard.errors import ConfigError, CorruptionError, StateMismatchError
from streamshard.location import resolve
from streamshard.recovery import manifest as mf
from streamshard.recovery.policy import CheckpointRef
from streamshard.recovery.rngstate import rng_state, set_rng_state
from streamshard.world import World

VERSION = 1
META = "meta.json"
LAST_GOOD = "LAST_GOOD.json"
_NAME = re.compile(r"^step-(\d{9})$")
_OPTS = StateDictOptions(flatten_optimizer_state_dict=True)
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CheckpointInfo:
    step: int
    data_step: int
    generation: int
    world_size: int
    path: str  # fsspec path (no protocol) of the step directory
    problem: str | None = None  # set when meta.json cannot be read: verification will fail

    @property
    def ref(self) -> CheckpointRef:
        return CheckpointRef(self.step, self.data_step, self.generation)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _jsonable(value, key: str):
    if isinstance(value, tuple):
        return list(value)
    if value is None or isinstance(value, (bool, int, float, str, list, dict)):
        return value
    raise ConfigError(f"optimizer setting {key!r} is not JSON-able: {type(value).__name__}")


class CheckpointManager:
    """Save/find/verify/load step checkpoints under ``root`` (a path or fsspec URL).

    Collective: ``save``, ``latest``, ``load`` and ``wait`` must be called by every rank of the
    default process group. ``valid`` filters checkpoints that a rollback invalidated
    (``Recovery.ledger.is_valid``); ``journal`` (optional) receives ``checkpoint`` and
    ``checkpoint_quarantined`` records from rank 0.
    """

    def __init__(self, root: str, *, world: World = World(), keep: int = 3,
                 valid: Callable[[CheckpointRef], bool] | None = None, storage_options: dict | None = None,
                 async_save: bool = False, journal=None, clock: Callable[[], float] = time.monotonic):
        if keep < 1:
            raise ConfigError(f"keep must be >= 1, got {keep}")
        self.url = str(root)
        self._opts = dict(storage_options or {})
        where = resolve(self.url, self._opts)
        self.fs, self.root, self._local = where.fs, where.root, where.local
        self.world = world
        self.keep = keep
        self.async_save = async_save
        self._valid = valid or (lambda ref: True)
        self._journal = journal
        self._clock = clock
        # Checkpoint collectives (DCP's plan exchange, barriers, hash gathering) run on their own
        # gloo group: an async save's background thread then never interleaves with training's.
        self._pg = dist.new_group(backend="gloo", timeout=timedelta(seconds=120)) if _distributed() else None
        self._pending: threading.Thread | None = None
        self._error: BaseException | None = None
        self._verified: set[str] = set()
        self.stats = {"saves": 0, "blocked_s": 0.0, "total_s": 0.0, "quarantined": 0}

    # ---- collectives --------------------------------------------------------------------------

    def _barrier(self) -> None:
        if self._pg is not None:
            dist.barrier(group=self._pg)

    def _gather(self, obj) -> list:
        if self._pg is None:
            return [obj]
        out: list = [None] * dist.get_world_size(self._pg)
        dist.all_gather_object(out, obj, group=self._pg)
        return out

    # ---- discovery ----------------------------------------------------------------------------

    def _dir(self, step: int) -> str:
        return f"{self.root}/step-{step:09d}"

    def _names(self) -> list[str]:
        self.fs.invalidate_cache(self.root)
        try:
            return [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.root, detail=False)]
        except FileNotFoundError:
            return []

    def list(self) -> list[CheckpointInfo]:
        """Checkpoints whose manifest exists (finished saves), oldest first; not yet verified."""
        out = []
        for name in self._names():
            m = _NAME.match(name)
            d = f"{self.root}/{name}"
            if not m or not self.fs.exists(f"{d}/{mf.MANIFEST}"):
                continue
            try:
                meta = json.loads(self.fs.cat_file(f"{d}/{META}"))
                out.append(CheckpointInfo(int(meta["step"]), int(meta["data_step"]), int(meta["generation"]),
                                          int(meta["world_size"]), d))
            except (OSError, ValueError, KeyError, TypeError) as e:
                out.append(CheckpointInfo(int(m.group(1)), -1, 0, 0, d, f"{d}/{META}: unreadable ({e!r})"))
        return sorted(out, key=lambda c: c.step)

    def refs(self) -> list[CheckpointRef]:
        return [c.ref for c in self.list() if c.problem is None and self._valid(c.ref)]

    def verify(self, info: CheckpointInfo) -> str | None:
        """Collective: the first problem any rank finds in ``info``'s files, or None if intact."""
        problem = info.problem
        if problem is None:
            try:
                m = mf.read_manifest(self.fs, info.path)
                problem = mf.check_share(self.fs, info.path, m, self.world.rank, self.world.world_size)
            except CorruptionError as e:
                problem = str(e)
        problems = [p for p in self._gather(problem) if p]
        return problems[0] if problems else None

    def latest(self, max_step: int | None = None) -> CheckpointInfo | None:
        """Collective: the newest valid checkpoint (step <= ``max_step``) that passes verification.
        Candidates that fail are quarantined (and journaled) on the way."""
        self.wait()
        for info in reversed([c for c in self.list() if self._valid(c.ref)]):
            if max_step is not None and info.step > max_step:
                continue
            problem = self.verify(info)
            if problem is None:
                self._verified.add(info.path)
                if self.world.rank == 0:
                    mf.put_bytes(self.fs, f"{self.root}/{LAST_GOOD}", json.dumps({"step": info.step}).encode())
                return info
            self._quarantine(info, problem)
        return None

    def _quarantine(self, info: CheckpointInfo, problem: str) -> None:
        self.stats["quarantined"] += 1
        if self.world.rank == 0:
            dest = mf.quarantine(self.fs, self.root, info.path, problem)
            if self._journal is not None:
                self._journal.append("checkpoint_quarantined", step=info.step, reason=problem, moved_to=dest)
        self._barrier()

    def _last_good(self) -> int | None:
        try:
            return int(json.loads(self.fs.cat_file(f"{self.root}/{LAST_GOOD}"))["step"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    # ---- save ---------------------------------------------------------------------------------

    def _tensors(self, model, optimizer) -> tuple[dict, dict]:
        msd, osd = get_state_dict(model, optimizer if optimizer is not None else [], options=_OPTS)
        tensors = {f"model.{k}": v for k, v in msd.items()}
        tensors.update({f"optim.{k}": v for k, v in osd.items() if torch.is_tensor(v)})
        return tensors, osd

    def _storage(self, d: str, reader: bool):
        if self._local:
            return dcp.FileSystemReader(d) if reader else dcp.FileSystemWriter(d)
        # DCP's own choice for a URL checkpoint_id; imported here to pass storage options through
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter

        url = self.fs.unstrip_protocol(d)
        return FsspecReader(url, **self._opts) if reader else FsspecWriter(url, sync_files=False, **self._opts)

    def save(self, step: int, *, model: torch.nn.Module, data_step: int, optimizer=None, scheduler=None,
             loader=None, generation: int = 0, extra: dict | None = None,
             blocking: bool | None = None) -> CheckpointInfo:
        """Save checkpoint ``step``; with ``async_save`` (or ``blocking=False``) returns once the
        tensors are staged and finishes in the background (``wait()`` joins it)."""
        self.wait()
        t0 = self._clock()
        d = self._dir(step)
        if self.world.rank == 0:
            if self.fs.exists(d):  # the same step re-saved after a rollback, or an unfinished save
                self.fs.rm(d, recursive=True)
            self.fs.makedirs(d, exist_ok=True)
        self._barrier()
        tensors, osd = self._tensors(model, optimizer)
        # the small files' contents are taken now (the state at this step); their writes (fsynced)
        # happen in the background with the tensors' on an async save, before the manifest
        small = [(f"{d}/rng-rank{self.world.rank}.json", json.dumps(rng_state()).encode())]
        if self.world.rank == 0:
            small.append((f"{d}/{META}", json.dumps({
                "version": VERSION, "step": step, "data_step": data_step, "generation": generation,
                "world_size": self.world.world_size,
                "optim": {k: _jsonable(v, k) for k, v in osd.items() if not torch.is_tensor(v)},
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "loader": loader.state_dict() if loader is not None else None,
                "extra": extra or {},
            }, allow_nan=False).encode()))
        kw = dict(storage_writer=self._storage(d, reader=False), process_group=self._pg,
                  no_dist=not _distributed())
        # nested by prefix: DCP flattens it to the same "model.<k>"/"optim.<k>" keys (so checkpoints
        # are unchanged and load flat), but wraps each top-level entry in its method logger: 2
        # entries instead of ~100 took 30-60 ms off every save's blocking part on the 2-core box
        tensors = {"model": {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")},
                   "optim": {k[len("optim."):]: v for k, v in tensors.items() if k.startswith("optim.")}}
        info = CheckpointInfo(step, data_step, generation, self.world.world_size, d)
        with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            if not (self.async_save if blocking is None else not blocking):
                self._put_small(small)
                dcp.save(tensors, **kw)
                self._finish(info, t0, self._clock() - t0)
                return info
            future = dcp.async_save(tensors, **kw)
        blocked = self._clock() - t0
        self._pending = threading.Thread(target=self._finish_async, args=(future, info, t0, blocked, small),
                                         name="streamshard-ckpt", daemon=True)
        self._pending.start()
        return info

    def _put_small(self, small: list[tuple[str, bytes]]) -> None:
        for path, data in small:
            mf.put_bytes(self.fs, path, data)

    def _finish_async(self, future, info: CheckpointInfo, t0: float, blocked: float,
                      small: list[tuple[str, bytes]]) -> None:
        try:
            self._put_small(small)
            future.result()
            self._finish(info, t0, blocked)
        except BaseException as e:  # re-raised by wait() in the training thread
            self._error = e

    def _finish(self, info: CheckpointInfo, t0: float, blocked: float) -> None:
        self._barrier()  # every rank's files are written
        names = self._gather(mf.files_of(self.fs, info.path) if self.world.rank == 0 else None)[0]
        parts = self._gather(mf.hash_share(self.fs, info.path, names, self.world.rank, self.world.world_size))
        if self.world.rank == 0:
            entries = {k: v for part in parts for k, v in part.items()}
            mf.write_manifest(self.fs, info.path, info.step, entries)
            self._prune()
            total = self._clock() - t0
            self.stats["saves"] += 1
            self.stats["blocked_s"] += blocked
            self.stats["total_s"] += total
            if self._journal is not None:
                self._journal.append("checkpoint", step=info.step, data_step=info.data_step, seconds=blocked,
                                     total_seconds=total, bytes=sum(e["size"] for e in entries.values()))
        self._barrier()

    def wait(self) -> None:
        """Join a background save; re-raise its error."""
        if self._pending is not None:
            self._pending.join()
            self._pending = None
        if self._error is not None:
            err, self._error = self._error, None
            raise err

    def abandon(self) -> None:
        """Forget a background save without joining it (its process group died under it: an
        in-process restart); the unfinished directory has no manifest and is never loaded."""
        self._pending, self._error = None, None

    def _prune(self) -> None:
        infos = self.list()
        good = [c for c in infos if c.problem is None and self._valid(c.ref)]
        keep = {c.path for c in good[-self.keep:]}
        last_good = self._last_good()
        keep |= {c.path for c in good if c.step == last_good}  # never delete the last verified one
        newest = infos[-1].step if infos else -1
        doomed = [c.path for c in infos if c.path not in keep and c.problem is None]
        for name in self._names():  # unfinished saves older than the newest finished one
            m = _NAME.match(name)
            d = f"{self.root}/{name}"
            if m and int(m.group(1)) < newest and d not in {c.path for c in infos}:
                doomed.append(d)
        for d in doomed:
            self.fs.rm(d, recursive=True)

    # ---- load ---------------------------------------------------------------------------------

    def load(self, step: int, *, model: torch.nn.Module, optimizer=None, scheduler=None, loader=None,
             restore_rng: bool = True) -> dict:
        """Collective: verify checkpoint ``step`` (unless ``latest`` just did), load it into the live
        objects and return its ``extra`` dict. CorruptionError if it fails verification (see
        ``load_latest`` for quarantine and fallback); the loader state is restored strictly
        (StateMismatchError shows saved vs live)."""
        self.wait()
        d = self._dir(step)
        if d not in self._verified:
            problem = self.verify(CheckpointInfo(step, -1, 0, 0, d))
            if problem is not None:
                raise CorruptionError(f"checkpoint {d} failed verification: {problem}")
        self._verified.discard(d)  # verify again next time: files can change between loads
        meta = json.loads(self.fs.cat_file(f"{d}/{META}"))
        if meta.get("version") != VERSION:
            raise StateMismatchError(f"{d}/{META}: checkpoint version saved {meta.get('version')!r}, live {VERSION}")
        tensors, osd = self._tensors(model, optimizer)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(tensors, storage_reader=self._storage(d, reader=True), process_group=self._pg,
                     no_dist=not _distributed())
        model_sd = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
        if optimizer is not None:
            optim_sd = {k[len("optim."):]: v for k, v in tensors.items() if k.startswith("optim.")}
            for k, v in meta["optim"].items():
                optim_sd[k] = tuple(v) if isinstance(osd.get(k), tuple) else v
            set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd, options=_OPTS)
        else:
            set_state_dict(model, [], model_state_dict=model_sd, optim_state_dict={}, options=_OPTS)
        if scheduler is not None and meta["scheduler"] is not None:
            scheduler.load_state_dict(meta["scheduler"])
        if loader is not None and meta["loader"] is not None:
            loader.load_state_dict(meta["loader"])
        rng_file = f"{d}/rng-rank{self.world.rank}.json"
        if restore_rng and self.fs.exists(rng_file):
            # A rank that did not exist at save time keeps its own (seeded) RNG state.
            set_rng_state(json.loads(self.fs.cat_file(rng_file)))
        return meta["extra"]

    def load_latest(self, *, max_step: int | None = None, **objects) -> tuple[CheckpointInfo, dict] | None:
        """Collective: load the newest valid checkpoint at or before ``max_step`` that verifies,
        quarantining bad ones on the way; ``(info, extra)`` or None when there is none."""
        while (info := self.latest(max_step)) is not None:
            try:
                return info, self.load(info.step, **objects)
            except CorruptionError as e:  # changed between verification and load
                self._quarantine(info, str(e))
        return None
