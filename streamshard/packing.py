"""Length-aware batching at load time: online packing and token-budget buckets (docs/LOADER.md).

Both are pure functions of a *pack window*: ``group`` documents of each step of a *pool* of
``pool`` consecutive steps, from one lane of the sampler's order when the lanes divide the
windows per step (docs/SAMPLER.md, "Pack windows"). The window's documents are read where the rank reads them anyway (its
workers), packed or bucketed here, and the result is dealt out over the pool's steps. So the
loader state stays the step, a seek re-reads at most one pool, and the global batches do not
depend on the world size or the worker count.

This module is numpy-only (no torch): the configs, the packers and the per-step slicing.

- :class:`Packing`: the window's token arrays cut into rows of exactly ``seq_len`` tokens, with
  what block-diagonal attention needs (``position_ids`` restarting at every document piece,
  ``segment_ids`` 1, 2, ... per row and 0 on padding, ``cu_seqlens``).
- :class:`TokenBudget`: the window's documents sorted by length and cut into buckets whose
  padded size (``count * longest``) stays within ``max_tokens``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from streamshard.errors import ConfigError
from streamshard.sampler.permutation import Permutation, derive_key


def _positive(value: Any, name: str, owner: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{owner}.{name} must be a positive int, got {value!r}")


def _common(cfg: Any, owner: str) -> None:
    if not isinstance(cfg.column, str) or not cfg.column:
        raise ConfigError(f"{owner}.column must be a column name, got {cfg.column!r}")
    _positive(cfg.group, "group", owner)
    _positive(cfg.pool, "pool", owner)
    if isinstance(cfg.pad_id, bool) or not isinstance(cfg.pad_id, int) or cfg.pad_id < 0:
        raise ConfigError(f"{owner}.pad_id must be a non-negative int, got {cfg.pad_id!r}")


@dataclass(frozen=True)
class Packing:
    """Pack variable-length token documents into rows of exactly ``seq_len`` tokens.

    ``column``: a 1-D integer array column (the documents). A window (``group`` documents per
    step of ``pool`` steps) is concatenated in position order and cut into rows; with
    ``split_documents=True`` (default) a document may continue in the next row (every token is
    served exactly once; only the window's last row is padded), with ``False`` documents are
    placed whole by first-fit decreasing (documents longer than ``seq_len`` are cut into
    ``seq_len`` pieces first). Rows are dealt out over the pool's steps, so a rank's batch is a
    variable number of rows (about ``group * pool * mean length / seq_len`` per window per
    pool). ``pad_id`` fills the padding.
    """

    seq_len: int
    column: str = "tokens"
    group: int = 1
    pool: int = 64
    split_documents: bool = True
    pad_id: int = 0

    def __post_init__(self) -> None:
        _positive(self.seq_len, "seq_len", "Packing")
        _common(self, "Packing")
        if not isinstance(self.split_documents, bool):
            raise ConfigError(f"Packing.split_documents must be a bool, got {self.split_documents!r}")

    def state_fields(self) -> dict:
        return {"kind": "packing", "seq_len": self.seq_len, "column": self.column,
                "group": self.group, "pool": self.pool,
                "split_documents": self.split_documents, "pad_id": self.pad_id}


@dataclass(frozen=True)
class TokenBudget:
    """Batches of similar-length documents whose padded size stays within ``max_tokens``.

    A window's documents (``group`` per step of ``pool`` steps) are sorted by length (ties by
    position) and cut greedily: a bucket grows while ``(count + 1) * longest <= max_tokens``.
    Documents longer than ``max_tokens`` are truncated to it (the only tokens ever dropped;
    counted in ``truncated``). The buckets of a window are put in a keyed random order and
    dealt out over the pool's steps, so a rank's step is a list of buckets (micro-batches).
    """

    max_tokens: int
    column: str = "tokens"
    group: int = 1
    pool: int = 64
    pad_id: int = 0

    def __post_init__(self) -> None:
        _positive(self.max_tokens, "max_tokens", "TokenBudget")
        _common(self, "TokenBudget")

    def state_fields(self) -> dict:
        return {"kind": "token_budget", "max_tokens": self.max_tokens, "column": self.column,
                "group": self.group, "pool": self.pool, "pad_id": self.pad_id}


LengthAware = (Packing, TokenBudget)


def check_config(cfg: Any, global_batch_size: int, world_size: int) -> None:
    """Refuse a config that does not fit the batch: ``group`` must divide ``G`` and every rank
    needs at least one window (``G / group >= world_size``)."""
    if not isinstance(cfg, LengthAware):
        raise ConfigError(f"packing must be a Packing or a TokenBudget, got {cfg!r:.80}")
    if global_batch_size % cfg.group:
        raise ConfigError(f"{type(cfg).__name__}.group={cfg.group} must divide "
                          f"global_batch_size={global_batch_size}")
    if global_batch_size // cfg.group < world_size:
        raise ConfigError(
            f"{type(cfg).__name__}: global_batch_size / group = {global_batch_size // cfg.group} "
            f"windows per step, fewer than world_size={world_size}: every rank needs a window "
            "(lower group or raise the batch)")


def deal(count: int, parts: int, part: int) -> tuple[int, int]:
    """Items ``[a, b)`` of ``count`` that part ``part`` of ``parts`` gets (as even as possible,
    in order: ``a = floor(part * count / parts)``)."""
    return part * count // parts, (part + 1) * count // parts


# -- packing ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rows:
    """Packed rows of one window: ``tokens``, ``position_ids``, ``segment_ids`` ([R, L] each)
    and ``starts``: the flat index (in ``R * L``) where each segment begins, padding included
    (rows always start a segment)."""

    tokens: np.ndarray
    position_ids: np.ndarray
    segment_ids: np.ndarray
    starts: np.ndarray

    def __len__(self) -> int:
        return len(self.tokens)

    def take(self, a: int, b: int) -> "Rows":
        length = self.tokens.shape[1]
        lo, hi = np.searchsorted(self.starts, [a * length, b * length])
        return Rows(self.tokens[a:b], self.position_ids[a:b], self.segment_ids[a:b],
                    self.starts[lo:hi] - a * length)


def _pieces(lengths: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Documents longer than ``seq_len`` cut into ``seq_len`` pieces: (doc, start) per piece."""
    counts = np.maximum(1, -(-lengths // seq_len))
    doc = np.repeat(np.arange(len(lengths)), counts)
    first = np.cumsum(counts) - counts
    start = (np.arange(len(doc)) - first[doc]) * seq_len
    keep = start < lengths[doc]  # empty documents give no piece
    return doc[keep], start[keep]


def first_fit_decreasing(sizes: np.ndarray, capacity: int) -> list[list[int]]:
    """Bins (lists of item indices, each summing to ``<= capacity``) by first-fit decreasing;
    ties by index. Every size must be ``<= capacity``."""
    order = np.lexsort((np.arange(len(sizes)), -sizes))
    space = np.empty(0, dtype=np.int64)
    bins: list[list[int]] = []
    for i in order.tolist():
        fits = np.flatnonzero(space >= sizes[i])
        if fits.size:
            b = int(fits[0])
            space[b] -= sizes[i]
            bins[b].append(i)
        else:
            space = np.append(space, capacity - sizes[i])
            bins.append([i])
    return bins


def pack(docs: Sequence[np.ndarray], cfg: Packing) -> Rows:
    """Pack one window's documents (in position order) into rows of ``cfg.seq_len`` tokens."""
    seq_len, pad_id = cfg.seq_len, cfg.pad_id
    docs = [np.asarray(d).reshape(-1) for d in docs]
    lengths = np.array([len(d) for d in docs], dtype=np.int64)
    dtype = np.result_type(*[d.dtype for d in docs]) if docs else np.dtype(np.int64)
    if cfg.split_documents:
        n = int(lengths.sum())
        rows = -(-n // seq_len)
        total = rows * seq_len
        flat = np.concatenate(docs + [np.full(total - n, pad_id, dtype=dtype)]) if docs else \
            np.empty(0, dtype=dtype)
        # Segments begin at every non-empty document and at every row; the padding is one
        # segment at the end (if any).
        doc_starts = (np.cumsum(lengths) - lengths)[lengths > 0]
        starts = np.union1d(doc_starts, np.arange(0, n, seq_len))
        pad_starts = np.array([n] if n < total else [], dtype=np.int64)
        return _rows(flat, starts.astype(np.int64), pad_starts, rows, seq_len)
    doc, start = _pieces(lengths, seq_len)
    size = np.minimum(lengths[doc] - start, seq_len)
    bins = first_fit_decreasing(size, seq_len)
    parts, starts, pad_starts = [], [], []
    for r, b in enumerate(bins):
        offset = r * seq_len
        for piece in sorted(b):  # inside a row, pieces in position order
            d, s0, k = int(doc[piece]), int(start[piece]), int(size[piece])
            parts.append(docs[d][s0:s0 + k])
            starts.append(offset)
            offset += k
        if offset < (r + 1) * seq_len:
            parts.append(np.full((r + 1) * seq_len - offset, pad_id, dtype=dtype))
            pad_starts.append(offset)
    flat = np.concatenate(parts) if parts else np.empty(0, dtype=dtype)
    return _rows(flat, np.array(starts, dtype=np.int64), np.array(pad_starts, dtype=np.int64),
                 len(bins), seq_len)


def _rows(flat: np.ndarray, starts: np.ndarray, pad_starts: np.ndarray, rows: int,
          seq_len: int) -> Rows:
    """Rows from the flat tokens (``rows * seq_len``, padding in place), where the documents'
    segments and the padding segments begin."""
    total = rows * seq_len
    every = np.concatenate([starts, pad_starts])
    is_pad = np.concatenate([np.zeros(len(starts), bool), np.ones(len(pad_starts), bool)])
    order = np.argsort(every, kind="stable")
    every, is_pad = every[order], is_pad[order]
    lengths = np.diff(np.append(every, total))
    # 1, 2, ... per row for documents' segments, 0 for padding.
    row = every // seq_len
    first = np.searchsorted(every, row * seq_len)
    ids = np.where(is_pad, 0, np.arange(len(every)) - first + 1).astype(np.int32)
    position = np.arange(total, dtype=np.int64) - np.repeat(every, lengths)
    segment = np.repeat(ids, lengths)
    return Rows(flat.reshape(rows, seq_len), position.reshape(rows, seq_len),
                segment.reshape(rows, seq_len), every)


def cu_seqlens(segment_ids: np.ndarray) -> np.ndarray:
    """Cumulative segment lengths over a flattened ``[B, L]`` batch of ``segment_ids`` (int32,
    from 0): a segment ends where a row ends or the segment id changes (padding is its own
    segment), as flash-attention's varlen kernels take them. (``packed_batch`` builds the
    same from the packer's segment starts without scanning the tokens.)"""
    b, length = segment_ids.shape
    flat = segment_ids.reshape(-1)
    if flat.size == 0:
        return np.zeros(1, dtype=np.int32)
    idx = np.arange(1, flat.size)
    cut = (idx % length == 0) | (flat[1:] != flat[:-1])
    return np.concatenate([[0], idx[cut], [flat.size]]).astype(np.int32)


def packed_batch(rows: Sequence[Rows], cfg: Packing) -> dict[str, np.ndarray]:
    """A rank batch from the rows of its windows (in window order): ``{column: [B, L],
    position_ids, segment_ids, cu_seqlens, max_seqlen}``."""
    length = cfg.seq_len
    rows = [r for r in rows if len(r)]
    if not rows:
        empty = np.zeros((0, length), np.int64)
        return {cfg.column: empty, "position_ids": empty, "segment_ids": empty.astype(np.int32),
                "cu_seqlens": np.zeros(1, np.int32), "max_seqlen": np.int64(0)}
    offsets = np.cumsum([0] + [r.tokens.size for r in rows])
    cu = np.concatenate([r.starts + o for r, o in zip(rows, offsets[:-1])] + [offsets[-1:]])
    return {cfg.column: np.concatenate([r.tokens for r in rows]),
            "position_ids": np.concatenate([r.position_ids for r in rows]),
            "segment_ids": np.concatenate([r.segment_ids for r in rows]),
            "cu_seqlens": cu.astype(np.int32), "max_seqlen": np.int64(np.diff(cu).max())}


# -- token budget -------------------------------------------------------------------------------
def buckets(lengths: np.ndarray, max_tokens: int) -> list[np.ndarray]:
    """Indices of each bucket: sorted by (length, index), cut greedily so that
    ``count * min(longest, max_tokens) <= max_tokens``."""
    lengths = np.minimum(np.asarray(lengths, dtype=np.int64), max_tokens)
    order = np.lexsort((np.arange(len(lengths)), lengths))
    out, current, longest = [], [], 0
    for i in order.tolist():
        n = max(int(lengths[i]), 1)  # an empty document still takes a row
        if current and (len(current) + 1) * max(longest, n) > max_tokens:
            out.append(np.array(current, dtype=np.int64))
            current, longest = [], 0
        current.append(i)
        longest = max(longest, n)
    if current:
        out.append(np.array(current, dtype=np.int64))
    return out


def bucket_order(count: int, key: int) -> np.ndarray:
    """The order a window's buckets are served in: a keyed permutation, so the pool's steps do
    not go from the shortest documents to the longest."""
    return np.asarray(Permutation(count, key)(np.arange(count, dtype=np.int64)), dtype=np.int64)


def bucket_batches(docs: Sequence[np.ndarray], cfg: TokenBudget, key: int) -> list[dict]:
    """One window's buckets, in serving order: ``{column: [b, l] padded with pad_id, "lengths":
    [b], "index": [b] (the documents' places in the window), "truncated": tokens cut}``."""
    docs = [np.asarray(d).reshape(-1) for d in docs]
    lengths = np.array([len(d) for d in docs], dtype=np.int64)
    cut = buckets(lengths, cfg.max_tokens)
    out = []
    for b in bucket_order(len(cut), key).tolist():
        idx = cut[b]
        kept = np.minimum(lengths[idx], cfg.max_tokens)
        width = int(kept.max()) if len(idx) else 0
        dtype = docs[int(idx[0])].dtype if len(idx) else np.int64
        tokens = np.full((len(idx), width), cfg.pad_id, dtype=dtype)
        for row, (i, n) in enumerate(zip(idx.tolist(), kept.tolist())):
            tokens[row, :n] = docs[i][:n]
        out.append({cfg.column: tokens, "lengths": kept, "index": idx,
                    "truncated": int((lengths[idx] - kept).sum())})
    return out


def window_key(seed: int, epoch: int, pool_start: int, window: int) -> int:
    return derive_key(seed, epoch, "buckets", pool_start, window)


def check_column(datasets: Sequence[Any], column: str) -> None:
    """Every stream must have ``column`` as a 1-D integer array column (the documents)."""
    for ds in datasets:
        ct = ds.schema.columns.get(column)
        dims = getattr(ct, "dims", None)
        if (ct is None or ct.kind != "array" or dims is None or len(dims) != 1
                or np.dtype(ct.dtype).kind not in "iu"):
            have = ", ".join(f"{n}: {c.text}" for n, c in ds.schema.columns.items())
            where = getattr(ds.source, "url", ds.fingerprint)
            raise ConfigError(f"packing column {column!r} must be a 1-D integer array column of "
                              f"{where}; its schema has {have}")
