"""Megatron-LM / NeMo indexed datasets (``PREFIX.bin`` + ``PREFIX.idx``) -> streamshard samples.

Layout read here (megatron/core/datasets/indexed_dataset.py, ``_IndexWriter.write`` and
``_IndexReader.__init__``, megatron-core 0.16; NeMo writes the same "MMIDIDX" files)::

    .idx  b"MMIDIDX\\x00\\x00"            9 bytes magic
          u64 version                     must be 1
          u8  dtype code                  1 uint8, 2 int8, 3 int16, 4 int32, 5 int64,
                                          6 float64, 7 float32, 8 uint16
          u64 sequence_count  (S)
          u64 document_count  (D)         number of entries in document_indices (docs + 1)
          i32 sequence_lengths[S]         tokens per sequence
          i64 sequence_pointers[S]        byte offset of each sequence in .bin
          i64 document_indices[D]         sequence index where each document starts, then S
          i8  sequence_modes[S]           only in multimodal datasets (detected by size)
    .bin  the token values of every sequence, back to back, in the dtype above

One streamshard sample per sequence, in order: ``{"tokens": DTYPE[]}``; every sequence is kept
(also empty ones). ``--doc-ids`` adds ``document: int64`` (the document the sequence
belongs to), so document boundaries are recoverable; a multimodal index adds ``mode: int8``.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from streamshard.converters import Option, Piece, ReadContext, register
from streamshard.errors import ConfigError, InputError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
DTYPES = {1: "uint8", 2: "int8", 3: "int16", 4: "int32", 5: "int64",
          6: "float64", 7: "float32", 8: "uint16"}
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequence count, document count


@dataclass(frozen=True)
class MegatronIndex:
    """The parsed ``.idx`` of one indexed dataset (arrays are read-only views of the file)."""

    prefix: str
    dtype: str
    lengths: np.ndarray      # int32[S]
    pointers: np.ndarray     # int64[S]
    doc_indices: np.ndarray  # int64[D]
    modes: np.ndarray | None  # int8[S] or None

    @property
    def num_sequences(self) -> int:
        return int(self.lengths.shape[0])

    @property
    def num_documents(self) -> int:
        return max(int(self.doc_indices.shape[0]) - 1, 0)


def prefix_of(path: str) -> str:
    """``data/x.bin``, ``data/x.idx`` or ``data/x`` -> ``data/x``."""
    root, ext = os.path.splitext(path)
    return root if ext in (".bin", ".idx") else path


def read_index(prefix: str) -> MegatronIndex:
    """Parse and cross-check ``PREFIX.idx`` against ``PREFIX.bin``; raises ``InputError``."""
    idx_path, bin_path = prefix + ".idx", prefix + ".bin"
    for path in (idx_path, bin_path):
        if not os.path.isfile(path):
            raise InputError(f"{path}: missing; a Megatron indexed dataset needs both "
                             f"{prefix}.idx and {prefix}.bin")
    raw = np.memmap(idx_path, dtype=np.uint8, mode="r") if os.path.getsize(idx_path) else b""
    if len(raw) < _HEADER.size:
        raise InputError(f"{idx_path}: {len(raw)} bytes is too short for a Megatron index header "
                         f"({_HEADER.size} bytes). Is this a Megatron .idx file?")
    magic, version, code, seqs, docs = _HEADER.unpack(bytes(raw[:_HEADER.size]))
    if magic != MAGIC:
        raise InputError(f"{idx_path}: bad magic {magic!r}, expected {MAGIC!r}. Only the mmap "
                         f"('MMIDIDX') Megatron/NeMo indexed format is supported")
    if version != VERSION:
        raise InputError(f"{idx_path}: index version {version} is not supported "
                         f"(this reader supports version {VERSION})")
    if code not in DTYPES:
        raise InputError(f"{idx_path}: unknown dtype code {code} (known: {sorted(DTYPES)})")
    body = _HEADER.size + seqs * 4 + seqs * 8 + docs * 8
    extra = len(raw) - body
    if extra not in (0, seqs):
        raise InputError(f"{idx_path}: size {len(raw)} does not match {seqs} sequences and {docs} "
                         f"document indices (expected {body} or {body + seqs} bytes)")
    off = _HEADER.size
    lengths = np.frombuffer(raw, np.int32, seqs, off)
    pointers = np.frombuffer(raw, np.int64, seqs, off + seqs * 4)
    doc_indices = np.frombuffer(raw, np.int64, docs, off + seqs * 12)
    modes = np.frombuffer(raw, np.int8, seqs, body) if extra and seqs else None
    index = MegatronIndex(prefix, DTYPES[code], lengths, pointers, doc_indices, modes)
    _check(index, idx_path, os.path.getsize(bin_path))
    return index


def _check(index: MegatronIndex, idx_path: str, bin_size: int) -> None:
    itemsize = np.dtype(index.dtype).itemsize
    if index.num_sequences:
        bad = np.flatnonzero(index.lengths < 0)
        if bad.size:
            raise InputError(f"{idx_path}: sequence {int(bad[0])} has negative length")
        ends = index.pointers + index.lengths.astype(np.int64) * itemsize
        bad = np.flatnonzero((index.pointers < 0) | (ends > bin_size))
        if bad.size:
            i = int(bad[0])
            raise InputError(f"{idx_path}: sequence {i} spans bytes [{int(index.pointers[i])}, "
                             f"{int(ends[i])}) beyond {index.prefix}.bin ({bin_size} bytes)")
    docs = index.doc_indices
    if docs.size and (docs[0] != 0 or docs[-1] != index.num_sequences
                      or np.any(np.diff(docs) < 0)):
        raise InputError(f"{idx_path}: document indices must rise from 0 to the sequence count "
                         f"{index.num_sequences}; got first {int(docs[0])}, last {int(docs[-1])}")


def columns(index: MegatronIndex, *, documents: bool = False) -> dict[str, str]:
    """The streamshard columns for one dataset's samples."""
    cols = {"tokens": f"{index.dtype}[]"}
    if documents:
        cols["document"] = "int64"
    if index.modes is not None:
        cols["mode"] = "int8"
    return cols


class MegatronConverter:
    """``--format megatron``: inputs are ``PREFIX.idx`` (or ``PREFIX.bin``) files; a directory
    SRC picks up its ``.idx`` files. Pieces are runs of whole sequences."""

    name = "megatron"
    help = "Megatron-LM/NeMo indexed datasets (PREFIX.bin + PREFIX.idx), one sample per sequence"
    options = (
        Option("--doc-ids", "megatron: add a 'document: int64' column (document of each "
               "sequence) so document boundaries are recoverable", is_flag=True, default=False),
    )
    extensions = (".idx",)

    def columns(self, files: Sequence[str], options: Mapping[str, Any]) -> dict[str, str]:
        cols: dict[str, str] | None = None
        seen: dict[str, str] = {}
        for path in files:
            prefix = prefix_of(path)
            if prefix in seen:
                raise ConfigError(f"{path}: the dataset {prefix} is already given as "
                                  f"{seen[prefix]}; pass each dataset once (its .idx)")
            seen[prefix] = path
            these = columns(read_index(prefix), documents=options["doc_ids"])
            if cols is not None and these != cols:
                raise InputError(f"{path}: columns {these} differ from the first input's {cols}")
            cols = these
        if cols is None:
            raise ConfigError("--format megatron: no input (pass PREFIX.idx files or a directory)")
        return cols

    def split(self, path: str, name: str, size: int, chunk_bytes: int,
              options: Mapping[str, Any]) -> list[Piece]:
        index = read_index(prefix_of(path))
        n = index.num_sequences
        if n == 0:
            return [Piece(path, name, 0, 0, size)]
        # cut where the .bin byte offset crosses a multiple of chunk_bytes: deterministic, O(S)
        bucket = index.pointers // max(chunk_bytes, 1)
        bounds = [0, *(np.flatnonzero(np.diff(bucket)) + 1).tolist(), n]
        itemsize = np.dtype(index.dtype).itemsize
        pieces = []
        for a, b in zip(bounds[:-1], bounds[1:]):
            nbytes = int(index.lengths[a:b].sum()) * itemsize
            pieces.append(Piece(path, name, a, b, nbytes))
        return pieces

    def read(self, piece: Piece, options: Mapping[str, Any], ctx: ReadContext) -> Iterator[dict]:
        index = read_index(prefix_of(piece.path))
        itemsize = np.dtype(index.dtype).itemsize
        where = [piece.start]
        ctx.set_locator(lambda: f"{piece.name}: sequence {where[0]}")
        for i, sample in enumerate(read_range(index, piece.start, piece.end,
                                              documents=options["doc_ids"]), piece.start):
            where[0] = i
            yield sample
            ctx.advance(int(index.lengths[i]) * itemsize)


def read_range(index: MegatronIndex, start: int, stop: int, *,
               documents: bool = False) -> Iterator[dict]:
    """Yield sequences ``[start, stop)`` of ``index`` in order (tokens are copies)."""
    bin_path = index.prefix + ".bin"
    size = os.path.getsize(bin_path)
    data = np.memmap(bin_path, dtype=np.uint8, mode="r") if size else np.zeros(0, np.uint8)
    dtype = np.dtype(index.dtype)
    doc = 0
    if documents and index.doc_indices.size:
        # the document holding sequence `start`: the last document start <= start (side="right"
        # skips empty documents, whose start equals the next one's)
        doc = int(np.searchsorted(index.doc_indices, start, side="right")) - 1
    for i in range(start, stop):
        ptr, n = int(index.pointers[i]), int(index.lengths[i])
        sample: dict[str, Any] = {
            "tokens": np.frombuffer(data, dtype, n, ptr).copy() if n else np.zeros(0, dtype)}
        if documents:
            while doc + 1 < index.doc_indices.size - 1 and index.doc_indices[doc + 1] <= i:
                doc += 1
            sample["document"] = doc
        if index.modes is not None:
            sample["mode"] = int(index.modes[i])
        yield sample


register("megatron", MegatronConverter())
