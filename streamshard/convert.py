"""The conversion driver behind ``streamshard convert``: plan, convert chunks in processes, resume.

Plan: the inputs (files, directories recursed and sorted, globs) are cut by the converter into
pieces, and pieces are packed in input order into chunks of about ``chunk_size`` input bytes. The
plan depends only on the inputs and the arguments, never on ``workers``, and chunk ``i`` is written
by its own ``ShardWriter`` to ``DEST/parts/chunk-{i:06d}/``; the final ``DEST/index.json`` lists the
shards of all chunks in chunk order (``merge_datasets``, no shard data copied). So every worker
count gives byte-identical shards and the same fingerprint. See docs/CONVERT.md.

Resume: ``DEST/.streamshard-convert.json`` records the arguments while a conversion is unfinished.
A chunk whose part index exists is complete and is reused by a rerun with the same arguments; a
rerun with different arguments is refused, naming the difference. The final index is written last.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

import streamshard.converters as converters
from streamshard.converters import Piece
from streamshard.atomic import atomic_write_json
from streamshard import lifeline
from streamshard.destlock import DestLock, RemoteDestLock
from streamshard.errors import (
    ConfigError, DatasetExistsError, InputError, SchemaError, StreamshardError,
)
from streamshard.index import INDEX_FILE, DatasetIndex
from streamshard.location import resolve
from streamshard.sizes import parse_size
from streamshard.writer import (
    DEFAULT_BLOCK_SIZE, DEFAULT_COMPRESSION_LEVEL, DEFAULT_SHARD_SIZE, SIZE_WARNING, ShardWriter,
)

MARKER = ".streamshard-convert.json"
PARTS = "parts"
STATS_FILE = "convert-stats.json"
MARKER_VERSION = 1
MAX_EXAMPLES = converters.MAX_EXAMPLES


@dataclass(frozen=True)
class Chunk:
    """Deterministic unit of work: consecutive pieces, written to ``parts/chunk-{index:06d}``."""

    index: int
    pieces: tuple[Piece, ...]

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.pieces)

    @property
    def part(self) -> str:
        return f"{PARTS}/chunk-{self.index:06d}"


@dataclass(frozen=True)
class ConvertSummary:
    """What a conversion produced. ``input_bytes`` is the on-disk size of all inputs;
    ``converted_bytes`` the part of it converted by this run (the rest was resumed)."""

    samples: int
    shards: int
    chunks: int
    reused_chunks: int
    input_bytes: int
    converted_bytes: int
    raw_bytes: int
    stored_bytes: int
    seconds: float
    cpu_seconds: float  # this process + the worker processes, for this run's chunks
    skipped: int
    skipped_examples: tuple[str, ...]
    counters: Mapping[str, int]
    fingerprint: str

    @property
    def ratio(self) -> float:
        return self.raw_bytes / self.stored_bytes if self.stored_bytes else 1.0

    @property
    def mb_per_s(self) -> float:
        return self.converted_bytes / max(self.seconds, 1e-9) / 1e6


@dataclass(frozen=True)
class _Job:
    """Everything a worker process needs for one chunk (picklable: sent to forkserver children)."""

    chunk: Chunk
    dest: str
    format: str
    options: dict
    columns: dict
    writer: dict
    skip_errors: bool
    storage_options: dict = field(default_factory=dict)


@contextlib.contextmanager
def part_writer(chunk: Chunk, dest: str, columns: Mapping[str, str], writer: Mapping[str, Any],
                storage_options: Mapping[str, Any], fs: Any, root: str) -> Iterator[ShardWriter]:
    """The ``ShardWriter`` of ``chunk``'s part dataset, for either kind of chunk job
    (:func:`convert_chunk`, ``packjobs.pack_chunk``): the shard-size warning is off (the driver
    gave it once for all chunks), and on any error the part is removed and the error re-raised,
    so a rerun redoes the chunk. Write the chunk's ``STATS_FILE`` inside the block."""
    token = SIZE_WARNING.set(False)
    try:
        with ShardWriter(f"{dest.rstrip('/')}/{chunk.part}", columns=columns,
                         storage_options=storage_options, **writer) as w:
            yield w
    except BaseException:
        _remove(fs, f"{root}/{chunk.part}")
        raise
    finally:
        SIZE_WARNING.reset(token)


def convert_chunk(job: _Job, report: Callable[[int, int], None]) -> dict:
    """Write one chunk's part dataset and its stats; on any error remove the part and re-raise."""
    conv = converters.get(job.format)
    loc = resolve(job.dest, job.storage_options)
    fs, root = loc.fs, loc.root
    ctx = converters.CountingContext(job.skip_errors, report)
    cpu0 = time.process_time()
    with part_writer(job.chunk, job.dest, job.columns, job.writer, job.storage_options,
                     fs, root) as writer:
        write = writer.write
        for piece in job.chunk.pieces:
            for sample in conv.read(piece, job.options, ctx):
                try:
                    write(sample)
                except SchemaError as exc:
                    ctx.bad_record(InputError(f"{ctx.where()}: {exc}"))
                    continue
                ctx.samples += 1
                if not ctx.samples & 15:
                    ctx.tick()
        stats = {"chunk": job.chunk.index, "samples": ctx.samples, "skipped": ctx.skipped,
                 "examples": ctx.examples, "counters": ctx.counters,
                 "input_bytes": job.chunk.nbytes,
                 "cpu_seconds": round(time.process_time() - cpu0, 6)}
        atomic_write_json(f"{root}/{job.chunk.part}/{STATS_FILE}", stats, fs=fs)
    ctx.tick(force=True)
    return stats


# -- planning ------------------------------------------------------------------------------

def plan_chunks(pieces: Sequence[Piece], chunk_size: int) -> list[Chunk]:
    """Pack pieces, in order, into chunks: a chunk closes before a piece that would take it past
    ``chunk_size`` bytes (a piece is never split here; converters cut pieces of at most about
    ``chunk_size``), so small files share chunks and large files get one chunk per piece."""
    chunks: list[Chunk] = []
    current: list[Piece] = []
    acc = 0
    for piece in pieces:
        if current and acc + piece.nbytes > chunk_size:
            chunks.append(Chunk(len(chunks), tuple(current)))
            current, acc = [], 0
        current.append(piece)
        acc += piece.nbytes
    if current:
        chunks.append(Chunk(len(chunks), tuple(current)))
    return chunks


# -- destination helpers ---------------------------------------------------------------------

def _get_json(fs: Any, path: str) -> Any:
    return json.loads(fs.cat_file(path)) if fs.exists(path) else None


def _remove(fs: Any, path: str) -> None:
    if fs.exists(path):
        fs.rm(path, recursive=True)


def marker_diff(saved: Mapping[str, Any], live: Mapping[str, Any]) -> list[str]:
    """Human-readable differences between the saved and the live conversion arguments."""
    out = []
    for key in sorted(set(saved) | set(live)):
        a, b = saved.get(key), live.get(key)
        if a == b:
            continue
        if key == "inputs" and isinstance(a, list) and isinstance(b, list):
            old, new = {x[0]: x[1:] for x in a}, {x[0]: x[1:] for x in b}
            for path in sorted(set(old) | set(new)):
                if path not in new:
                    out.append(f"input {path} was removed")
                elif path not in old:
                    out.append(f"input {path} was added")
                elif old[path] != new[path]:
                    out.append(f"input {path} changed (size, mtime {old[path]} -> {new[path]})")
            if not out and [x[0] for x in a] != [x[0] for x in b]:
                out.append("input order changed")
        else:
            out.append(f"{key}: unfinished conversion used {a!r}, now {b!r}")
    return out


# -- the driver ------------------------------------------------------------------------------

def convert(sources: Sequence[str], dest: str, *, format: str,
            options: Mapping[str, Any] | None = None,
            shard_size: int | str = DEFAULT_SHARD_SIZE, block_size: int | str = DEFAULT_BLOCK_SIZE,
            compression: str | None = "zstd", compression_level: int = DEFAULT_COMPRESSION_LEVEL,
            workers: int = 1, chunk_size: int | str = "64MB",
            skip_errors: bool = False, overwrite: bool = False, resume: bool | None = None,
            storage_options: dict | None = None,
            input_storage_options: dict | None = None, input_cache: str | None = None,
            progress: Callable[[int, int], None] | None = None,
            on_start: Callable[[int, int, int], None] | None = None,
            on_chunk: Callable[[int], None] | None = None,
            packing: Any = None,
            on_tokens: Callable[[int], None] | None = None) -> ConvertSummary:
    """Convert ``sources`` into the dataset ``dest`` (local path or fsspec URL); see module doc.

    ``options`` are the format's options keyed by ``Option.dest`` (``None`` = default).
    ``resume=None`` resumes an unfinished conversion with the same arguments; ``False`` discards
    it; ``True`` requires nothing extra. ``progress(samples, input_bytes)`` receives increments in
    this process; ``on_start(chunks, reused_chunks, bytes_to_convert)`` is called once planned;
    ``on_chunk(index)`` in this process after each chunk is complete (in completion order).
    ``sources`` may be fsspec URLs (globs too), opened with ``input_storage_options`` and staged
    in ``input_cache`` (kept), or in a temporary directory removed after success
    (:mod:`streamshard.inputs`).

    ``packing`` (a :class:`streamshard.convert_packing.PackSpec`, from ``make_spec``) tokenizes
    and packs the documents instead: same plan, parallelism and resume; ``on_tokens(index)`` is
    then called after each chunk's tokens are written.
    """
    t0, cpu0 = time.perf_counter(), time.process_time()
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise ConfigError(f"workers must be a positive int, got {workers!r}")
    if compression == "none":
        compression = None
    conv = converters.get(format)
    opts = converters.resolve_options(conv, options or {})
    chunk_bytes = parse_size(chunk_size, name="chunk_size")
    writer = {"shard_size": parse_size(shard_size, name="shard_size"),
              "block_size": parse_size(block_size, name="block_size"),
              "compression": compression, "compression_level": compression_level}
    from streamshard.writer import warn_small_shards

    warn_small_shards(writer["shard_size"], writer["block_size"])  # once here, not per chunk
    from streamshard import inputs

    cache = input_cache or inputs.default_cache(sources, dest)
    files, identities = inputs.discover_inputs(sources, conv.extensions, exclude=dest,
                                               cache_dir=cache,
                                               storage_options=input_storage_options)
    columns = dict(conv.columns([p for p, _ in files], opts))  # also checks the inputs' layout
    if packing is not None:
        columns = packing.columns()
    from streamshard.schema import Schema

    Schema(columns)  # a bad column type fails here, before anything is written
    stats = [(p, n, os.stat(p)) for p, n in files]
    pieces = [pc for p, n, st in stats for pc in conv.split(p, n, st.st_size, chunk_bytes, opts)]
    chunks = plan_chunks(pieces, chunk_bytes)
    live = {"version": MARKER_VERSION, "format": format, "options": opts, "columns": columns,
            "chunk_size": chunk_bytes, **writer,
            "inputs": [identities.get(p) or [p, st.st_size, st.st_mtime_ns] for p, _, st in stats]}
    if packing is not None:
        live["packing"] = packing.marker()

    loc = resolve(dest, storage_options)
    fs, root = loc.fs, loc.root
    # one writer per destination (docs/FORMAT.md "Writing and atomicity")
    lock = DestLock(root) if loc.local else RemoteDestLock(fs, root, dest)
    try:
        done = _prepare_dest(fs, root, dest, live, chunks, overwrite, resume)
        todo = [c for c in chunks if c.index not in done]
        report = progress or (lambda s, b: None)
        if packing is None:
            if on_start:
                on_start(len(chunks), len(done), sum(c.nbytes for c in todo))
            jobs = [_Job(c, dest, format, opts, columns, writer, skip_errors,
                         dict(storage_options or {})) for c in todo]
            results = _run(jobs, workers, report)
        else:
            packer = packing.start(chunks, done, fs=fs, root=root)
            if on_start:
                on_start(len(chunks), len(done), packer.bytes_to_tokenize)
            results = packer.results(dest=dest, format=format, options=opts, writer=writer,
                                     skip_errors=skip_errors,
                                     storage_options=dict(storage_options or {}),
                                     workers=workers, report=report, on_tokens=on_tokens)
        worker_cpu = 0.0
        for result in results:
            done[result["chunk"]] = result
            worker_cpu += result.get("cpu_seconds", 0.0)
            if on_chunk is not None:
                on_chunk(result["chunk"])
        if packing is None and (workers == 1 or len(todo) <= 1):  # ran here: in our own time
            worker_cpu = 0.0

        from streamshard.merge import merge_datasets

        results = [done[c.index] for c in chunks]
        counters = dict(sum((Counter(r["counters"]) for r in results), Counter()))
        skipped = sum(r["skipped"] for r in results)
        meta = {"converter": {"format": format, "options": opts, "chunk_size": chunk_bytes,
                              "chunks": len(chunks), "skipped_records": skipped, **counters}}
        if packing is not None:
            meta["packing"] = packing.metadata(format)
        index = merge_datasets([f"{dest.rstrip('/')}/{c.part}" for c in chunks], dest,
                               overwrite=True, metadata=meta, storage_options=storage_options)
        if packing is not None:
            packer.cleanup()  # the token files: after the index, so a crash here loses nothing
        _remove(fs, f"{root}/{MARKER}")
        if identities and input_cache is None:
            inputs.remove_cache(cache)
        return ConvertSummary(
            samples=index.num_samples, shards=index.num_shards, chunks=len(chunks),
            reused_chunks=len(chunks) - len(todo), input_bytes=sum(c.nbytes for c in chunks),
            converted_bytes=sum(c.nbytes for c in todo),
            raw_bytes=sum(s.raw_bytes for s in index.shards),
            stored_bytes=sum(s.bytes for s in index.shards), seconds=time.perf_counter() - t0,
            cpu_seconds=time.process_time() - cpu0 + worker_cpu,
            skipped=skipped,
            skipped_examples=tuple(e for r in results for e in r["examples"])[:MAX_EXAMPLES],
            counters=counters, fingerprint=index.fingerprint)
    finally:
        if lock is not None:
            lock.release()


def _prepare_dest(fs: Any, root: str, dest: str, live: dict, chunks: Sequence[Chunk],
                  overwrite: bool, resume: bool | None) -> dict[int, dict]:
    """Apply the resume / overwrite rules; write the marker; return the reusable chunks' stats."""
    marker = _get_json(fs, f"{root}/{MARKER}")
    if marker is not None and resume is not False and not overwrite:
        diff = marker_diff(marker, live)
        if diff:
            raise ConfigError(
                f"{dest} holds an unfinished conversion with other arguments: "
                f"{'; '.join(diff[:5])}. Rerun with the same arguments to resume it, or pass "
                f"--no-resume to discard it")
        done = {}
        for c in chunks:
            part = f"{root}/{c.part}"
            stats = fs.exists(f"{part}/{INDEX_FILE}") and _get_json(fs, f"{part}/{STATS_FILE}")
            if stats:
                done[c.index] = stats
            else:
                _remove(fs, part)  # a chunk interrupted midway: its partial output goes
        return done
    index_path = f"{root}/{INDEX_FILE}"
    if fs.exists(index_path):
        if marker is None and not overwrite:
            raise DatasetExistsError(f"{dest} already holds a dataset ({index_path}); pass "
                                     f"--overwrite to replace it")
        try:
            old = DatasetIndex.from_bytes(fs.cat_file(index_path), index_path)
        except StreamshardError:
            old = None  # a damaged index: its shards cannot be listed, only parts/ goes
        fs.rm_file(index_path)  # first: from here on dest is not a dataset
        for shard in old.shards if old is not None else ():
            if not shard.file.startswith(PARTS + "/") and fs.exists(f"{root}/{shard.file}"):
                fs.rm_file(f"{root}/{shard.file}")
    elif marker is None and fs.exists(f"{root}/{PARTS}") and not overwrite:
        raise DatasetExistsError(f"{dest}/{PARTS} exists but no conversion is recorded in "
                                 f"{dest}; pass --overwrite to replace it")
    _remove(fs, f"{root}/{PARTS}")
    atomic_write_json(f"{root}/{MARKER}", live, fs=fs)
    return {}


class _Tally:
    """Aggregates chunk progress in the parent. Queue messages may arrive after their chunk's
    result (the queue has a feeder thread), so a finished chunk reports exactly its remainder
    and later messages for it are ignored: the totals always end at the true numbers."""

    def __init__(self, report: Callable[[int, int], None]):
        self.report, self.seen, self.finished = report, {}, set()

    def add(self, chunk: int, samples: int, nbytes: int) -> None:
        if chunk not in self.finished:
            s, b = self.seen.get(chunk, (0, 0))
            self.seen[chunk] = (s + samples, b + nbytes)
            self.report(samples, nbytes)

    def finish(self, result: dict) -> dict:
        s, b = self.seen.pop(result["chunk"], (0, 0))
        self.finished.add(result["chunk"])
        self.report(result["samples"] - s, result["input_bytes"] - b)
        return result


def _run(jobs: Sequence[Any], workers: int, report: Callable[[int, int], None],
         fn: Callable[[Any, Callable[[int, int], None]], dict] = convert_chunk):
    """Yield each job's stats as it finishes (one round of :class:`Workers`)."""
    with Workers(workers) as pool:
        yield from pool.run(jobs, report, fn)


class Workers:
    """The worker processes of one conversion: started on the first round that needs them and
    reused by later rounds (packing runs two), shut down by ``close()``. Not thread-safe."""

    def __init__(self, workers: int):
        self.workers = workers
        self._pool: Any = None
        self._queue: Any = None

    def __enter__(self) -> "Workers":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def _start(self, size: int, fn: Callable) -> Any:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # forkserver: workers fork from a clean server process that imported the converters
        # once, so each costs a fork instead of a fresh interpreter (~0.25 CPU-s each with
        # spawn), and nothing of the caller's threads or state is inherited (unlike plain fork).
        main_file = getattr(sys.modules.get("__main__"), "__file__", None)
        if main_file and not os.path.exists(main_file):
            # A script read from stdin cannot be re-imported by a new interpreter: fork instead.
            mp = multiprocessing.get_context("fork")
        else:
            mp = multiprocessing.get_context("forkserver")
            # the forkserver arms PR_SET_PDEATHSIG when it preloads lifeline (lifeline.py)
            os.environ[lifeline.FORKSERVER_PARENT_ENV] = str(os.getpid())
            # Everything a job imports is imported once there, not again in every worker
            # (fsspec alone costs ~0.25 s per process; a converter module ~0.1 s).
            mp.set_forkserver_preload(["streamshard.lifeline", "streamshard.convert",
                                       "streamshard.converters", *converters._BUILTIN,
                                       "fsspec.implementations.local", "streamshard.writer",
                                       fn.__module__])
        self._queue = mp.Queue()
        self._pool = ProcessPoolExecutor(size, mp_context=mp, initializer=_init_worker,
                                         initargs=(self._queue, os.getpid()))
        return self._pool

    def run(self, jobs: Sequence[Any], report: Callable[[int, int], None],
            fn: Callable[[Any, Callable[[int, int], None]], dict] = convert_chunk):
        """Yield each job's stats as it finishes; in this process for one worker (or one job),
        else in the worker processes, whose progress is forwarded through a queue and
        aggregated here. ``fn(job, report)`` does one job (a module-level function: it is
        pickled by name); every job has a ``chunk``. On an error no new job starts, jobs
        already running finish (their stats are yielded), then the error is raised."""
        from concurrent.futures import FIRST_COMPLETED, wait

        tally = _Tally(report)
        if self.workers == 1 or len(jobs) <= 1:
            for job in jobs:
                i = job.chunk.index
                yield tally.finish(fn(job, lambda s, b: tally.add(i, s, b)))
            return
        pool = self._pool or self._start(min(self.workers, len(jobs)), fn)
        pending = {pool.submit(_worker_run, fn, job) for job in jobs}
        error: BaseException | None = None
        try:
            while pending:
                finished, pending = wait(pending, timeout=0.1, return_when=FIRST_COMPLETED)
                _drain(self._queue, tally)
                for fut in finished:
                    if fut.cancelled():
                        continue
                    exc = fut.exception()
                    if exc is None:
                        yield tally.finish(fut.result())
                    elif error is None:
                        # Stop handing out chunks; chunks already running finish and are kept.
                        error = exc
                        for other in pending:
                            other.cancel()
        except BaseException:
            for fut in pending:
                fut.cancel()
            self.close()
            raise
        if error is not None:
            self.close()
            raise error


_QUEUE: Any = None


def _init_worker(q: Any, owner: int) -> None:
    global _QUEUE
    _QUEUE = q
    lifeline.arm(owner)  # a worker dies with the converting process, also on its SIGKILL


def _worker_run(fn: Callable[[Any, Callable[[int, int], None]], dict], job: Any) -> dict:
    i = job.chunk.index
    return fn(job, lambda s, b: _QUEUE.put((i, s, b)))


def _drain(q: Any, tally: _Tally) -> None:
    import queue

    while True:
        try:
            tally.add(*q.get_nowait())
        except queue.Empty:
            return
