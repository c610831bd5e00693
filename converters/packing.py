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
(each sequence's start depends on every token before it), but it splits in two: documents are
tokenized chunk by chunk in parallel, then each chunk writes the sequences that start in its
tokens once every chunk's token count is known (``streamshard/convert_packing.py``); the dataset
is the same for every worker count and a crashed conversion resumes (docs/CONVERTERS.md). This
module holds the pure parts; the conversion (``PackSpec``, ``make_spec``, ``pack_corpus``) is
``streamshard.convert_packing``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np

from streamshard.errors import ConfigError, InputError, missing_dependency

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


def check_document(doc: Sequence[int] | np.ndarray, dtype: str, where: str) -> np.ndarray:
    """``doc`` as a 1-D array of ``dtype``; ``InputError`` naming ``where`` for anything that
    is not a 1-D integer sequence or holds ids that do not fit ``dtype``."""
    arr = np.asarray(doc)
    if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
        raise InputError(f"{where}: tokens must be a 1-D integer sequence, got "
                         f"{arr.dtype} with shape {arr.shape}")
    top = np.iinfo(dtype).max
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) > top):
        raise InputError(f"{where}: token ids must lie in [0, {top}] for "
                         f"{dtype}; got min {int(arr.min())}, max {int(arr.max())}")
    return arr.astype(dtype, copy=False)


class Packer:
    """Incremental packer: ``feed(doc)`` yields the sequences that became complete; ``finish()``
    yields the padded last one. Not thread-safe; one per output stream."""

    def __init__(self, config: PackingConfig):
        self.config = config
        self.stats = PackStats()
        self._buf = np.empty(config.seq_len, dtype=config.dtype)
        self._fill = 0
        self._starts: list[int] = []

    def feed(self, doc: Sequence[int] | np.ndarray, where: str = "?") -> Iterator[dict]:
        """Append one document and its eod; ``InputError`` (naming ``where``) for ids that do
        not fit the dtype. Nothing is appended when it raises."""
        arr = check_document(doc, self.config.dtype, where)
        self.stats.documents += 1
        self.stats.tokens += int(arr.size)
        stream = np.concatenate([arr, np.array([self.config.eod_id], self.config.dtype)])
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

def tokenizer_file(path: str) -> str:
    """``path`` itself, or ``path/tokenizer.json`` for a directory."""
    return os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path


def load_tokenizer(path: str):
    """A ``tokenizers.Tokenizer`` from a local ``tokenizer.json`` (file or its directory)."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise missing_dependency("tokenizers", "tokenizers", "--tokenizer") from None
    path = tokenizer_file(path)
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


# -- corpus driver (the jobs run by streamshard/convert_packing.py) -----------------------------

def field_value(sample: Mapping[str, Any], name: str) -> Any:
    """``sample[name]``, or ``sample["json"][name]`` for whole-record jsonl input; ``KeyError``
    if neither holds it."""
    if name in sample:
        return sample[name]
    record = sample.get("json")
    if isinstance(record, dict) and name in record:
        return record[name]
    raise KeyError(name)
