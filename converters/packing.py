"""Tokenization and packing for LLM pretraining: documents -> fixed-length token sequences.

The token stream is every document's tokens followed by one end-of-document token (``eod_id``),
documents in input order. It is cut into consecutive sequences of ``seq_len`` tokens, across
document, input-file and output-shard boundaries. Samples::

    tokens      DTYPE[seq_len]   uint16 when every id (vocabulary, eod, pad) fits, else uint32
    length      uint32           real tokens in the sequence: seq_len, except for the last one
    doc_starts  uint32[]         (--doc-boundaries) offsets in `tokens` where a document starts

The final partial sequence is kept, never dropped: it is padded to ``seq_len`` with ``pad_id``
(default: ``eod_id``) and its ``length`` says how many tokens are real, so every sample has the
same shape. Concatenating ``tokens[:length]`` over all samples gives back the exact stream, and
with ``doc_starts`` the document boundaries are exact even when ``eod_id`` also occurs inside a
document (an empty document starts at its own eod token).

Documents come from any registered input format (jsonl, text, parquet, hf, ...) read in order:
``text_field`` (tokenized with a local Hugging Face ``tokenizer.json`` through the optional
``tokenizers`` package) or ``token_field`` (pre-tokenized ids). Packing is inherently sequential
(each sequence's start depends on every token before it), so :func:`pack_corpus` runs in one
process; tokenization uses the ``tokenizers`` library's own thread pool (``encode_batch``).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

from streamshard.errors import ConfigError, InputError, missing_dependency
from streamshard.writer import DEFAULT_BLOCK_SIZE, DEFAULT_COMPRESSION_LEVEL, DEFAULT_SHARD_SIZE

# End-of-document tokens looked up in a tokenizer's vocabulary when --eod-id is not given.
EOD_TOKENS = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eot_id|>")
_BATCH_DOCS = 512  # documents per encode_batch call: enough to keep the Rust threads busy


@dataclass(frozen=True)
class PackingConfig:
    """How documents become sequences; validated on construction."""

    seq_len: int
    eod_id: int
    pad_id: int | None = None  # None -> eod_id
    doc_boundaries: bool = False
    dtype: str = "uint32"

    def __post_init__(self) -> None:
        if not isinstance(self.seq_len, int) or self.seq_len <= 0:
            raise ConfigError(f"seq_len must be a positive int, got {self.seq_len!r}")
        if self.dtype not in ("uint16", "uint32"):
            raise ConfigError(f"dtype must be uint16 or uint32, got {self.dtype!r}")
        top = np.iinfo(self.dtype).max
        for name in ("eod_id", "pad_id"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int) and 0 <= value <= top):
                raise ConfigError(f"{name} must be an int in [0, {top}] for {self.dtype}, "
                                  f"got {value!r}")

    @property
    def pad(self) -> int:
        return self.eod_id if self.pad_id is None else self.pad_id

    def columns(self) -> dict[str, str]:
        cols = {"tokens": f"{self.dtype}[{self.seq_len}]", "length": "uint32"}
        if self.doc_boundaries:
            cols["doc_starts"] = "uint32[]"
        return cols


@dataclass
class PackStats:
    """What a packer has seen and produced (counted by the packer itself)."""

    documents: int = 0
    tokens: int = 0          # document tokens, without eod
    sequences: int = 0
    padded_tokens: int = 0   # pad tokens in the last sequence
    skipped: int = 0
    seconds: float = 0.0
    examples: list = field(default_factory=list)


class Packer:
    """Incremental packer: ``feed(doc)`` yields the sequences that became complete; ``finish()``
    yields the padded last one. Not thread-safe; one per output stream."""

    def __init__(self, config: PackingConfig):
        self.config = config
        self.stats = PackStats()
        self._buf = np.empty(config.seq_len, dtype=config.dtype)
        self._fill = 0
        self._starts: list[int] = []
        self._top = np.iinfo(config.dtype).max

    def feed(self, doc: Sequence[int] | np.ndarray, where: str = "?") -> Iterator[dict]:
        """Append one document and its eod; ``InputError`` (naming ``where``) for ids that do
        not fit the dtype. Nothing is appended when it raises."""
        arr = np.asarray(doc)
        if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
            raise InputError(f"{where}: tokens must be a 1-D integer sequence, got "
                             f"{arr.dtype} with shape {arr.shape}")
        if arr.size and (int(arr.min()) < 0 or int(arr.max()) > self._top):
            raise InputError(f"{where}: token ids must lie in [0, {self._top}] for "
                             f"{self.config.dtype}; got min {int(arr.min())}, max {int(arr.max())}")
        self.stats.documents += 1
        self.stats.tokens += int(arr.size)
        stream = np.concatenate([arr.astype(self.config.dtype, copy=False),
                                 np.array([self.config.eod_id], self.config.dtype)])
        self._starts.append(self._fill)
        pos = 0
        n = self.config.seq_len
        while pos < stream.size:
            take = min(n - self._fill, stream.size - pos)
            self._buf[self._fill:self._fill + take] = stream[pos:pos + take]
            self._fill += take
            pos += take
            if self._fill == n:
                yield self._emit(n)

    def finish(self) -> Iterator[dict]:
        """The last, partial sequence (padded), if any tokens are left."""
        if self._fill:
            real = self._fill
            self._buf[real:] = self.config.pad
            self.stats.padded_tokens += self.config.seq_len - real
            yield self._emit(real)

    def _emit(self, length: int) -> dict:
        sample: dict[str, Any] = {"tokens": self._buf.copy(), "length": length}
        if self.config.doc_boundaries:
            sample["doc_starts"] = np.asarray(self._starts, dtype=np.uint32)
        self._fill = 0
        self._starts = []
        self.stats.sequences += 1
        return sample


def pack(docs: Iterable[Sequence[int] | np.ndarray], config: PackingConfig) -> Iterator[dict]:
    """Every sequence of ``docs`` (in memory; a convenience over :class:`Packer`)."""
    packer = Packer(config)
    for i, doc in enumerate(docs):
        yield from packer.feed(doc, f"document {i}")
    yield from packer.finish()


def unpack(samples: Iterable[Mapping[str, Any]]) -> tuple[np.ndarray, list[int]]:
    """``(stream, document start positions)`` recovered from packed samples (needs
    ``doc_starts``); the inverse used by tests and by anyone auditing a packed dataset."""
    parts, starts, offset = [], [], 0
    for s in samples:
        length = int(s["length"])
        parts.append(np.asarray(s["tokens"])[:length])
        starts.extend(offset + int(p) for p in s.get("doc_starts", ()))
        offset += length
    return (np.concatenate(parts) if parts else np.zeros(0, np.uint32)), starts


# -- tokenizer ---------------------------------------------------------------------------------

def load_tokenizer(path: str):
    """A ``tokenizers.Tokenizer`` from a local ``tokenizer.json`` (file or its directory)."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise missing_dependency("tokenizers", "tokenizers", "--tokenizer") from None
    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(path):
        raise ConfigError(f"--tokenizer {path}: no such file (expected a Hugging Face "
                          f"tokenizer.json)")
    try:
        return Tokenizer.from_file(path)
    except Exception as exc:  # tokenizers raises a bare Exception for malformed files
        raise ConfigError(f"--tokenizer {path}: not a readable tokenizer.json: {exc}") from None


def default_eod(tokenizer: Any) -> int | None:
    """The id of the first of :data:`EOD_TOKENS` the tokenizer knows, else ``None``."""
    for token in EOD_TOKENS:
        tid = tokenizer.token_to_id(token)
        if tid is not None:
            return int(tid)
    return None


# -- corpus driver -------------------------------------------------------------------------------

class _Context:
    """``converters.ReadContext`` for the packing driver (skip or raise bad records)."""

    def __init__(self, stats: PackStats, skip_errors: bool):
        self.stats, self.skip_errors = stats, skip_errors
        self.locator: Callable[[], str] = lambda: "?"

    def bad_record(self, error: InputError) -> None:
        if not self.skip_errors:
            raise error
        self.stats.skipped += 1
        if len(self.stats.examples) < 5:
            self.stats.examples.append(str(error))

    def count(self, name: str, n: int) -> None:  # converter counters: not in the summary
        return None

    def advance(self, nbytes: int) -> None:  # progress is documents and tokens, not bytes
        return None

    def set_locator(self, locator: Callable[[], str]) -> None:
        self.locator = locator


def _field(sample: Mapping[str, Any], name: str) -> Any:
    """``sample[name]``, or ``sample["json"][name]`` for whole-record jsonl input."""
    if name in sample:
        return sample[name]
    record = sample.get("json")
    if isinstance(record, dict) and name in record:
        return record[name]
    raise KeyError(name)


def iter_documents(sources: Sequence[str], *, format: str, options: Mapping[str, Any] | None,
                   field_name: str, ctx: _Context) -> Iterator[tuple[Any, str]]:
    """``(field value, locator)`` of every input record, in input order."""
    import streamshard.converters as converters

    conv = converters.get(format)
    opts = converters.option_values(conv, dict(options or {}))
    files = converters.discover(sources, conv.extensions)
    conv.columns([p for p, _ in files], opts)  # validates the inputs' layout up front
    for path, name in files:
        for piece in conv.split(path, name, os.path.getsize(path), 64 << 20, opts):
            for sample in conv.read(piece, opts, ctx):
                where = ctx.locator()
                try:
                    yield _field(sample, field_name), where
                except KeyError:
                    ctx.bad_record(InputError(f"{where}: record has no field {field_name!r}"))


def pack_corpus(sources: Sequence[str], dest: str, *, format: str, seq_len: int,
                options: Mapping[str, Any] | None = None, tokenizer: str | None = None,
                text_field: str = "text", token_field: str | None = None,
                eod_id: int | None = None, pad_id: int | None = None,
                doc_boundaries: bool = False, token_dtype_name: str | None = None,
                skip_errors: bool = False, shard_size: str | int = DEFAULT_SHARD_SIZE,
                block_size: str | int = DEFAULT_BLOCK_SIZE, compression: str | None = "zstd",
                compression_level: int = DEFAULT_COMPRESSION_LEVEL, overwrite: bool = False,
                progress: Callable[[PackStats], None] | None = None) -> PackStats:
    """Tokenize (or take pre-tokenized) documents from ``sources`` and write packed sequences to
    ``dest``. Exactly one of ``tokenizer`` / ``token_field``. Returns the packing statistics;
    the dataset's metadata records the packing settings."""
    from streamshard.writer import ShardWriter

    t0 = time.perf_counter()
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
    packer = Packer(config)
    ctx = _Context(packer.stats, skip_errors)
    docs = iter_documents(sources, format=format, options=options,
                          field_name=token_field or text_field, ctx=ctx)
    meta = {"packing": {"seq_len": seq_len, "eod_id": eod_id, "pad_id": config.pad,
                        "tokenizer": os.path.basename(tokenizer) if tokenizer else None,
                        "field": token_field or text_field, "source_format": format}}
    last = time.monotonic()
    with ShardWriter(dest, columns=config.columns(), shard_size=shard_size,
                     block_size=block_size, compression=compression,
                     compression_level=compression_level, overwrite=overwrite,
                     metadata=meta) as writer:
        for ids, where in _token_docs(docs, tok, ctx):
            try:
                for sample in packer.feed(ids, where):
                    writer.write(sample)
            except InputError as exc:
                ctx.bad_record(exc)
            if progress and time.monotonic() - last > 0.5:
                last = time.monotonic()
                progress(packer.stats)
        for sample in packer.finish():
            writer.write(sample)
    packer.stats.seconds = time.perf_counter() - t0
    return packer.stats


def _token_docs(docs: Iterator[tuple[Any, str]], tok: Any,
                ctx: _Context) -> Iterator[tuple[Any, str]]:
    """Token ids per document: pre-tokenized values as they are, text through ``encode_batch``
    in batches of :data:`_BATCH_DOCS` (order kept)."""
    if tok is None:
        yield from docs
        return
    batch: list[tuple[str, str]] = []

    def flush() -> Iterator[tuple[Any, str]]:
        encodings = tok.encode_batch([t for t, _ in batch], add_special_tokens=False)
        for enc, (_, where) in zip(encodings, batch):
            yield np.asarray(enc.ids, dtype=np.int64), where
        batch.clear()

    for text, where in docs:
        if not isinstance(text, str):
            ctx.bad_record(InputError(f"{where}: text field must be a string, got "
                                      f"{type(text).__name__}"))
            continue
        batch.append((text, where))
        if len(batch) >= _BATCH_DOCS:
            yield from flush()
    if batch:
        yield from flush()


# -- command line ----------------------------------------------------------------------------------
