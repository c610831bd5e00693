"""Packing inside the conversion driver (``streamshard convert --tokenizer/--token-field``).

A packed sequence may start in one chunk and end in the next, so packing runs the driver's plan
(chunks of input, ``streamshard/convert.py``) in two rounds of the same process pool:

1. **Tokenize** chunk ``i`` (in parallel): its documents in input order, each followed by the
   eod id, go to ``DEST/parts/tokens/chunk-{i:06d}.bin`` (the token stream in the token dtype,
   little-endian, then every document's length with its eod as ``<u8``), then its sidecar
   ``chunk-{i:06d}.json`` (counts, xxh64 of the ``.bin``, skipped records): the sidecar, written
   last and atomically, marks the chunk tokenized.
2. **Pack** chunk ``i`` (in parallel), once every chunk's token count ``n_j`` is known: with
   ``S_i = n_0 + ... + n_{i-1}``, chunk ``i`` owns the global sequences ``k`` whose first token
   ``k * seq_len`` lies in ``[S_i, S_i + n_i)`` and writes them to ``parts/chunk-{i:06d}``
   (its own ``ShardWriter``, as every conversion); the last of them may read up to
   ``seq_len - 1`` tokens of the following chunks' files. The very last sequence is padded.

The jobs are in ``streamshard/packjobs.py``. The samples are exactly those of
:func:`streamshard.converters.packing.pack` over the whole
corpus, and the shards depend on the plan only, never on the worker count. Resume uses the
driver's rules: a chunk with a part index is done, a tokenized chunk is not tokenized again, and
the token files are removed once the final index is written.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from streamshard.convert import Chunk, Workers, _get_json, _remove, convert
from streamshard.converters.packing import (
    EOD_TOKENS, PackingConfig, PackStats, default_eod, load_tokenizer, tokenizer_file,
)
from streamshard.errors import ConfigError
from streamshard.packjobs import (  # noqa: F401 (TOKENS: the token files' folder)
    TOKENS, PackJob, TokenJob, _meta, _valid_meta, _bin, pack_chunk, tokenize_chunk,
)
from streamshard.writer import DEFAULT_BLOCK_SIZE, DEFAULT_COMPRESSION_LEVEL, DEFAULT_SHARD_SIZE

# -- both rounds ---------------------------------------------------------------------------------

class PackRun:
    """The two rounds for the chunks a conversion has left (``done``: chunks with a part)."""

    def __init__(self, spec: PackSpec, chunks: Sequence[Chunk], done: dict[int, dict], *,
                 fs: Any, root: str):
        self.spec, self.chunks, self.done = spec, list(chunks), done
        self.fs, self.root = fs, root
        self.tokenized: dict[int, dict] = {}
        if len(done) < len(self.chunks):
            for c in self.chunks:
                meta = _get_json(fs, f"{root}/{_meta(c.index)}")
                if _valid_meta(meta, c.index) and fs.exists(f"{root}/{_bin(c.index)}"):
                    self.tokenized[c.index] = meta
        # Packing any chunk needs every chunk's token count, and its own and the next chunks'
        # tokens: all of them are tokenized (token files go only once every chunk is packed).
        self.to_tokenize = ([c for c in self.chunks if c.index not in self.tokenized]
                            if len(done) < len(self.chunks) else [])

    @property
    def bytes_to_tokenize(self) -> int:
        return sum(c.nbytes for c in self.to_tokenize)

    def results(self, *, dest: str, format: str, options: dict, writer: dict,
                skip_errors: bool, storage_options: dict, workers: int,
                report: Callable[[int, int], None],
                on_tokens: Callable[[int], None] | None = None) -> Iterator[dict]:
        """Tokenize what is missing, then yield each packed chunk's stats as it completes."""
        jobs = [TokenJob(c, dest, format, options, self.spec, skip_errors, storage_options)
                for c in self.to_tokenize]
        with Workers(workers) as pool:  # one set of processes for both rounds
            yield from self._rounds(pool, jobs, dest, writer, storage_options, report, on_tokens)

    def _rounds(self, pool: Workers, jobs: list, dest: str, writer: dict, storage_options: dict,
                report: Callable[[int, int], None],
                on_tokens: Callable[[int], None] | None) -> Iterator[dict]:
        workers = pool.workers
        cpu: dict[int, float] = {}  # CPU time of worker processes (in-process time is ours)
        pooled = workers > 1 and len(jobs) > 1
        for meta in pool.run(jobs, report, tokenize_chunk):
            meta = {k: v for k, v in meta.items() if k != "samples"}
            self.tokenized[meta["chunk"]] = meta
            cpu[meta["chunk"]] = meta["cpu_seconds"] if pooled else 0.0
            if on_tokens is not None:
                on_tokens(meta["chunk"])
        if len(self.done) == len(self.chunks):
            return
        counts = [self.tokenized[c.index]["tokens"] for c in self.chunks]
        begins = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]).tolist()
        total, n = begins[-1], self.spec.config.seq_len
        packs = []
        for c in self.chunks:
            if c.index in self.done:
                continue
            i = c.index
            a = -(-begins[i] // n) * n
            b = min(-(-begins[i + 1] // n) * n, total)
            sources = tuple((j, begins[j], self.tokenized[j]) for j in range(i, len(counts))
                            if b > a and begins[j] < b and begins[j + 1] > a)
            packs.append(PackJob(c, dest, self.spec, writer, begins[i], counts[i], total,
                                 sources, self.tokenized[i], storage_options))
        pooled = workers > 1 and len(packs) > 1
        for stats in pool.run(packs, lambda s, b: None, pack_chunk):
            yield {**stats, "cpu_seconds": (stats["cpu_seconds"] if pooled else 0.0)
                   + cpu.get(stats["chunk"], 0.0)}

    def cleanup(self) -> None:
        """Remove the token files (after the final index is written)."""
        _remove(self.fs, f"{self.root}/{TOKENS}")


# -- the packing conversion -------------------------------------------------------------------

@dataclass(frozen=True)
class PackSpec:
    """A packing conversion: the sequence layout, the field documents come from and, for text,
    the tokenizer file with its identity (size, xxh64), recorded in the resume marker so a
    tokenizer changed since a crash is refused. Picklable (sent to worker processes)."""

    config: PackingConfig
    field: str
    tokenizer: str | None = None       # absolute path of tokenizer.json; None = pre-tokenized
    tokenizer_id: tuple[int, str] | None = None

    def columns(self) -> dict[str, str]:
        return self.config.columns()

    def marker(self) -> dict[str, Any]:
        """What must not change between a crashed conversion and its resume."""
        c = self.config
        return {"seq_len": c.seq_len, "eod_id": c.eod_id, "pad_id": c.pad,
                "doc_boundaries": c.doc_boundaries, "dtype": c.dtype, "field": self.field,
                "tokenizer": ([self.tokenizer, *self.tokenizer_id] if self.tokenizer else None)}

    def start(self, chunks: Sequence[Chunk], done: dict[int, dict], *, fs: Any,
              root: str) -> "PackRun":
        """The rounds left for ``chunks`` (``done``: chunks with a part), as the driver
        (:func:`streamshard.convert.convert` with ``packing=``) runs them."""
        return PackRun(self, chunks, done, fs=fs, root=root)

    def metadata(self, source_format: str) -> dict[str, Any]:
        c = self.config
        return {"seq_len": c.seq_len, "eod_id": c.eod_id, "pad_id": c.pad,
                "tokenizer": os.path.basename(self.tokenizer) if self.tokenizer else None,
                "field": self.field, "source_format": source_format}


def make_spec(*, seq_len: int, tokenizer: str | None = None, text_field: str = "text",
              token_field: str | None = None, eod_id: int | None = None,
              pad_id: int | None = None, doc_boundaries: bool = False,
              token_dtype_name: str | None = None) -> PackSpec:
    """The :class:`PackSpec` of the command-line options: exactly one of ``tokenizer`` /
    ``token_field``; the eod id defaults to the tokenizer's (:data:`EOD_TOKENS`); the dtype is
    ``uint16`` when the vocabulary, eod and pad ids fit (pre-tokenized input: ``uint32``)."""
    import xxhash

    if (tokenizer is None) == (token_field is None):
        raise ConfigError("packing needs exactly one of --tokenizer PATH or --token-field NAME")
    tok = load_tokenizer(tokenizer) if tokenizer else None
    if eod_id is None:
        eod_id = default_eod(tok) if tok is not None else None
        if eod_id is None:
            raise ConfigError("--eod-id is required: " + (
                f"the tokenizer has none of {', '.join(EOD_TOKENS)}" if tok is not None
                else "pre-tokenized input has no tokenizer to take it from"))
    if token_dtype_name is None:
        vocab = tok.get_vocab_size(with_added_tokens=True) - 1 if tok is not None else 2**32 - 1
        fits16 = max(vocab, eod_id, pad_id or 0) <= np.iinfo(np.uint16).max
        token_dtype_name = "uint16" if fits16 else "uint32"
    config = PackingConfig(seq_len, eod_id, pad_id, doc_boundaries, token_dtype_name)
    if tok is None:
        return PackSpec(config, token_field)  # type: ignore[arg-type]
    path = os.path.abspath(tokenizer_file(tokenizer))  # type: ignore[arg-type]
    with open(path, "rb") as f:
        data = f.read()
    return PackSpec(config, text_field, path, (len(data), xxhash.xxh64(data).hexdigest()))


def pack_corpus(sources: Sequence[str], dest: str, *, format: str, seq_len: int,
                options: Mapping[str, Any] | None = None, tokenizer: str | None = None,
                text_field: str = "text", token_field: str | None = None,
                eod_id: int | None = None, pad_id: int | None = None,
                doc_boundaries: bool = False, token_dtype_name: str | None = None,
                skip_errors: bool = False, shard_size: str | int = DEFAULT_SHARD_SIZE,
                block_size: str | int = DEFAULT_BLOCK_SIZE, compression: str | None = "zstd",
                compression_level: int = DEFAULT_COMPRESSION_LEVEL, overwrite: bool = False,
                workers: int = 1, chunk_size: int | str = "64MB",
                resume: bool | None = None) -> PackStats:
    """Tokenize (or take pre-tokenized) documents from ``sources`` and write packed sequences to
    ``dest`` through the conversion driver (:func:`streamshard.convert.convert` with
    ``packing=``: chunks tokenized in ``workers`` processes, crash-resumable, the dataset
    identical for every ``workers``). Exactly one of ``tokenizer`` / ``token_field``. Returns
    the packing statistics; the dataset's metadata records the packing settings."""
    spec = make_spec(seq_len=seq_len, tokenizer=tokenizer, text_field=text_field,
                     token_field=token_field, eod_id=eod_id, pad_id=pad_id,
                     doc_boundaries=doc_boundaries, token_dtype_name=token_dtype_name)
    s = convert(sources, dest, format=format, options=options, shard_size=shard_size,
                block_size=block_size, compression=compression,
                compression_level=compression_level, workers=workers, chunk_size=chunk_size,
                skip_errors=skip_errors, overwrite=overwrite, resume=resume, packing=spec)
    return stats_of(s)


def stats_of(summary: Any) -> PackStats:
    """The :class:`PackStats` of a packing conversion's ``ConvertSummary``."""
    c = summary.counters
    return PackStats(documents=c.get("documents", 0), tokens=c.get("tokens", 0),
                     sequences=summary.samples, padded_tokens=c.get("padded_tokens", 0),
                     skipped=summary.skipped, seconds=summary.seconds,
                     examples=list(summary.skipped_examples))

