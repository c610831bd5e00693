"""The two jobs of a packing conversion (``streamshard/convert_packing.py``), run in worker
processes: :func:`tokenize_chunk` writes one chunk's token stream, :func:`pack_chunk` writes the
sequences that start in one chunk's tokens as its part dataset. The token file layout is in
docs/CONVERTERS.md."""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import xxhash

from streamshard.atomic import atomic_write_json, put_atomic
from streamshard.convert import PARTS, STATS_FILE, Chunk, _remove, part_writer
from streamshard.converters.packing import (
    _BATCH_DOCS, check_document, field_value, load_tokenizer,
)
from streamshard.errors import CorruptionError, InputError
from streamshard.location import resolve

TOKENS = f"{PARTS}/tokens"
_DOC_DTYPE = np.dtype("<u8")  # a document's length with its eod


def _bin(chunk: int) -> str:
    return f"{TOKENS}/chunk-{chunk:06d}.bin"


def _meta(chunk: int) -> str:
    return f"{TOKENS}/chunk-{chunk:06d}.json"


@functools.lru_cache(maxsize=4)
def _tokenizer(path: str) -> Any:
    return load_tokenizer(path)


# -- round 1: tokenize a chunk ------------------------------------------------------------------

@dataclass(frozen=True)
class TokenJob:
    """Tokenize one chunk (picklable: sent to worker processes)."""

    chunk: Chunk
    dest: str
    format: str
    options: dict
    spec: Any  # a streamshard.convert_packing.PackSpec (it imports this module)
    skip_errors: bool
    storage_options: dict = field(default_factory=dict)


def tokenize_chunk(job: TokenJob, report: Callable[[int, int], None]) -> dict:
    """Write the chunk's token stream and document lengths, then its sidecar; return the
    sidecar. Bad records raise or are counted (``--skip-errors``) like any conversion; on an
    error nothing of this chunk is left behind."""
    import streamshard.converters as converters

    spec, cfg = job.spec, job.spec.config
    conv = converters.get(job.format)
    loc = resolve(job.dest, job.storage_options)
    fs, root = loc.fs, loc.root
    ctx = converters.CountingContext(job.skip_errors, report)
    tok = _tokenizer(spec.tokenizer) if spec.tokenizer else None
    cpu0 = time.process_time()
    docs: list[np.ndarray] = []
    batch: list[tuple[str, str]] = []

    def take(ids: Any, where: str) -> None:
        try:
            docs.append(check_document(ids, cfg.dtype, where))
        except InputError as exc:
            ctx.bad_record(exc)
            return
        ctx.samples += 1
        if not ctx.samples & 15:
            ctx.tick()

    def flush() -> None:
        encodings = tok.encode_batch([t for t, _ in batch], add_special_tokens=False)
        for enc, (_, where) in zip(encodings, batch):
            take(np.asarray(enc.ids, dtype=np.int64), where)
        batch.clear()

    try:
        for piece in job.chunk.pieces:
            for sample in conv.read(piece, job.options, ctx):
                where = ctx.where()
                try:
                    value = field_value(sample, spec.field)
                except KeyError:
                    ctx.bad_record(InputError(f"{where}: record has no field {spec.field!r}"))
                    continue
                if tok is None:
                    take(value, where)
                elif not isinstance(value, str):
                    ctx.bad_record(InputError(f"{where}: text field must be a string, got "
                                              f"{type(value).__name__}"))
                else:
                    batch.append((value, where))
                    if len(batch) >= _BATCH_DOCS:
                        flush()
        if batch:
            flush()
        lengths = np.fromiter((d.size + 1 for d in docs), dtype=_DOC_DTYPE, count=len(docs))
        stream = np.empty(int(lengths.sum()), dtype=np.dtype(cfg.dtype).newbyteorder("<"))
        ends = np.cumsum(lengths)
        for d, end in zip(docs, ends.tolist()):
            stream[end - d.size - 1:end - 1] = d
        stream[ends - 1] = cfg.eod_id
        data = stream.tobytes() + lengths.tobytes()
        put_atomic(f"{root}/{_bin(job.chunk.index)}", data, fs=fs, fsync=False)
        meta = {"chunk": job.chunk.index, "tokens": int(stream.size), "documents": len(docs),
                "bytes": len(data), "xxh64": xxhash.xxh64(data).hexdigest(),
                "skipped": ctx.skipped, "examples": ctx.examples,
                "input_bytes": job.chunk.nbytes,
                "cpu_seconds": round(time.process_time() - cpu0, 6)}
        atomic_write_json(f"{root}/{_meta(job.chunk.index)}", meta, fs=fs)
    except BaseException:
        for rel in (_meta(job.chunk.index), _bin(job.chunk.index)):
            _remove(fs, f"{root}/{rel}")
        raise
    ctx.tick(force=True)
    return {**meta, "samples": meta["documents"]}


def _valid_meta(meta: Any, chunk: int) -> bool:
    """A sidecar as :func:`tokenize_chunk` writes it (sizes checked before any use)."""
    if not isinstance(meta, dict) or meta.get("chunk") != chunk:
        return False
    counts = ("tokens", "documents", "bytes", "skipped", "input_bytes")
    return (all(type(meta.get(k)) is int and meta[k] >= 0 for k in counts)
            and isinstance(meta.get("xxh64"), str) and isinstance(meta.get("examples"), list)
            and meta["documents"] <= meta["tokens"])


# -- round 2: pack a chunk -----------------------------------------------------------------------

@dataclass(frozen=True)
class PackJob:
    """Write the sequences that start in one chunk (picklable).

    ``start``: global position of the chunk's first token; ``total``: tokens of the corpus;
    ``sources``: ``(chunk, start, sidecar)`` of the chunks whose tokens those sequences hold."""

    chunk: Chunk
    dest: str
    spec: Any  # a streamshard.convert_packing.PackSpec (it imports this module)
    writer: dict
    start: int
    tokens: int
    total: int
    sources: tuple[tuple[int, int, dict], ...]
    tokenized: dict
    storage_options: dict = field(default_factory=dict)


def _load(fs: Any, root: str, chunk: int, meta: dict, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """A chunk's ``(token stream, document lengths)``, size and xxh64 checked."""
    path = f"{root}/{_bin(chunk)}"
    data = fs.cat_file(path)
    itemsize = np.dtype(dtype).itemsize
    if (len(data) != meta["bytes"] or meta["tokens"] * itemsize + meta["documents"] * 8 != len(data)
            or xxhash.xxh64(data).hexdigest() != meta["xxh64"]):
        raise CorruptionError(f"{path}: token file does not match its sidecar (size "
                              f"{len(data)}, expected {meta['bytes']}); rerun the conversion with "
                              f"--no-resume")
    cut = meta["tokens"] * itemsize
    tokens = np.frombuffer(data, dtype=np.dtype(dtype).newbyteorder("<"), count=meta["tokens"])
    return tokens, np.frombuffer(data, dtype=_DOC_DTYPE, offset=cut)


def pack_chunk(job: PackJob, report: Callable[[int, int], None]) -> dict:
    """Write the chunk's part dataset and its stats; on any error remove the part."""
    cfg = job.spec.config
    n = cfg.seq_len
    loc = resolve(job.dest, job.storage_options)
    fs, root = loc.fs, loc.root
    cpu0 = time.process_time()
    first = -(-job.start // n)                     # sequences whose first token is in the chunk
    stop = -(-(job.start + job.tokens) // n)
    a = first * n  # the tokens those sequences hold: global positions [a, b)
    b = max(a, min(stop * n, job.total))
    pieces, starts = [], []
    for chunk, begin, meta in job.sources:
        tokens, lengths = _load(fs, root, chunk, meta, cfg.dtype)
        lo, hi = max(a, begin), min(b, begin + tokens.size)
        pieces.append(tokens[lo - begin:hi - begin])
        ends = np.cumsum(lengths, dtype=np.int64)
        doc = begin + ends - lengths.astype(np.int64)
        starts.append(doc[(doc >= lo) & (doc < hi)])
    stream = np.concatenate(pieces) if pieces else np.zeros(0, cfg.dtype)
    if stream.size != b - a:
        raise CorruptionError(f"{root}/{job.chunk.part}: packing found {stream.size} tokens for "
                              f"[{a}, {b}), expected {b - a}; rerun with --no-resume")
    padded = (stop - first) * n - stream.size
    rows = np.full((stop - first) * n, cfg.pad, dtype=cfg.dtype)
    rows[:stream.size] = stream
    rows = rows.reshape(-1, n)
    offsets = (np.concatenate(starts) - a) if starts else np.zeros(0, np.int64)
    cuts = np.searchsorted(offsets, np.arange(stop - first + 1) * n)
    with part_writer(job.chunk, job.dest, job.spec.columns(), job.writer, job.storage_options,
                     fs, root) as writer:
        for r in range(stop - first):
            sample: dict[str, Any] = {"tokens": rows[r],
                                      "length": n if r < stop - first - 1 else n - padded}
            if cfg.doc_boundaries:
                sample["doc_starts"] = (offsets[cuts[r]:cuts[r + 1]] - r * n).astype(np.uint32)
            writer.write(sample)
        t = job.tokenized
        stats = {"chunk": job.chunk.index, "samples": stop - first, "skipped": t["skipped"],
                 "examples": t["examples"], "input_bytes": t["input_bytes"],
                 "stream_tokens": job.tokens,
                 "counters": {"documents": t["documents"],
                              "tokens": t["tokens"] - t["documents"],
                              "padded_tokens": padded},
                 "cpu_seconds": round(time.process_time() - cpu0, 6)}
        atomic_write_json(f"{root}/{job.chunk.part}/{STATS_FILE}", stats, fs=fs)
    return stats
