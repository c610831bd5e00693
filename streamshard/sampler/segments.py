"""Weight segments of a mixture: exact counts per block from a segment's first position, and
per-stream local positions that stay contiguous across segments.

A mixture's weights may change at absolute mixture positions ``Q_1 < Q_2 < ...`` (a reweight
ledger entry or a known schedule; :class:`streamshard.sampler.mixture.MixtureOrder`). Segment
``k`` covers ``[Q_k, Q_{k+1})`` and has its own counts ``c^k`` (block ``M_k = sum(c^k)``): its
block ``b = (P - Q_k) // M_k`` permutes its ``M_k`` slots with its own key, so every block of
``M_k`` positions from ``Q_k`` on holds exactly ``c^k_s`` positions of stream ``s``.

Stream ``s``'s ``n``-th slot in segment ``k`` (``n = b*c^k_s + i``) takes the local position
``holes[n]`` if ``n < len(holes)``, else ``frontier + n - len(holes)``. Segment 0 has no holes
and frontier 0 (``local = n``, the single-segment rule). A segment ends ``t`` slots into a block
(``t = (Q_{k+1} - Q_k) % M_k``); the stream's slots of that block at or after ``t`` are never
served there, so their local positions become the next segment's holes, served first. Hence
every local position of every stream is served exactly once (each stream still serves each of
its samples once per its own epoch), and the tables are a few ints per block cut: O(#segments)
to locate a position, O(1) to seek.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from streamshard.sampler.permutation import derive_key, derive_keys, permute_array, permute_grouped


@dataclass(frozen=True, eq=False)
class Segment:
    """One weight segment: its first position, counts and the tables of its local positions."""

    start: int
    counts: np.ndarray        # slots per block for each stream (int64, sums to ``block``)
    count_starts: np.ndarray  # cumulative counts, len S + 1
    holes: np.ndarray         # flat local positions served first, by stream (int64)
    hole_starts: np.ndarray   # stream s's holes are holes[hole_starts[s]:hole_starts[s+1]]
    frontier: np.ndarray      # first local position past every hole, per stream

    @property
    def block(self) -> int:
        return int(self.count_starts[-1])

    def key_prefix(self, seed: int) -> tuple:
        # Segment 0 keeps the single-segment key (seed, "mix"): a mixture without reweights is
        # the mixture it always was; later segments are keyed by where they start.
        return (seed, "mix") if self.start == 0 else (seed, "mix-segment", self.start)

    def slot_streams(self, seed: int, block: int, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(stream, i) of ``slots`` of block ``block``: the i-th slot of that stream there."""
        key = derive_key(*self.key_prefix(seed), block)
        shuffled = permute_array(slots, np.int64(self.block), np.uint64(key))
        stream = np.searchsorted(self.count_starts, shuffled, side="right") - 1
        return stream, shuffled - self.count_starts[stream]

    def local(self, stream: np.ndarray, n: np.ndarray) -> np.ndarray:
        """Local positions of the ``n``-th slots of ``stream`` in this segment."""
        if not self.holes.size and not self.frontier.any():
            return n  # segment 0 (and any segment with nothing carried over)
        n_holes = self.hole_starts[stream + 1] - self.hole_starts[stream]
        in_holes = n < n_holes
        out = self.frontier[stream] + n - n_holes
        if in_holes.any():
            out[in_holes] = self.holes[self.hole_starts[stream[in_holes]] + n[in_holes]]
        return out


def _table(holes: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    starts = np.concatenate([[0], np.cumsum([len(h) for h in holes])]).astype(np.int64)
    flat = np.concatenate(list(holes)).astype(np.int64) if len(holes) else np.zeros(0, np.int64)
    return flat, starts


def build_segments(seed: int, cuts: Sequence[tuple[int, Sequence[int]]]) -> tuple[Segment, ...]:
    """Segments for ``cuts`` = ``[(0, counts_0), (Q_1, counts_1), ...]`` (starts increasing)."""
    segments: list[Segment] = []
    n_streams = len(cuts[0][1])
    holes = [np.zeros(0, np.int64) for _ in range(n_streams)]
    frontier = np.zeros(n_streams, np.int64)
    for k, (start, counts) in enumerate(cuts):
        counts = np.asarray(counts, dtype=np.int64)
        flat, hole_starts = _table(holes)
        seg = Segment(int(start), counts, np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
                      flat, hole_starts, frontier.copy())
        segments.append(seg)
        if k + 1 == len(cuts):
            break
        full, t = divmod(int(cuts[k + 1][0]) - seg.start, seg.block)
        used_in_cut = [np.zeros(0, np.int64)] * n_streams
        if t:
            stream, i = seg.slot_streams(seed, full, np.arange(t, dtype=np.int64))
            used_in_cut = [np.sort(i[stream == s]) for s in range(n_streams)]
        for s in range(n_streams):
            c = int(counts[s])
            consumed = full * c + (c if t else 0)  # slot numbers n below this are settled
            unused = (full * c + np.setdiff1d(np.arange(c), used_in_cut[s])) if t else \
                np.zeros(0, np.int64)
            h = holes[s]
            mapped = np.empty(len(unused), dtype=np.int64)
            from_holes = unused < len(h)
            mapped[from_holes] = h[unused[from_holes]]
            mapped[~from_holes] = frontier[s] + unused[~from_holes] - len(h)
            holes[s] = np.sort(np.concatenate([mapped, h[consumed:]]).astype(np.int64))
            frontier[s] += max(0, consumed - len(h))
    return tuple(segments)


def locate_local(segments: Sequence[Segment], seed: int,
                 pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(stream, local position) of absolute mixture positions ``pos`` (int64 array)."""
    if len(segments) == 1:  # no change of weights: the single-segment arithmetic, no masks
        return _locate_in(segments[0], seed, pos)
    starts = np.asarray([s.start for s in segments], dtype=np.int64)
    which = np.searchsorted(starts, pos, side="right") - 1
    stream = np.empty(pos.shape, dtype=np.int64)
    local = np.empty(pos.shape, dtype=np.int64)
    for k in np.unique(which).tolist():
        at = which == k
        stream[at], local[at] = _locate_in(segments[k], seed, pos[at])
    return stream, local


def _locate_in(seg: Segment, seed: int, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    blk, slot = np.divmod(pos - seg.start, seg.block)
    blocks, group = np.unique(blk, return_inverse=True)
    keys = derive_keys(seg.key_prefix(seed), blocks)
    shuffled = permute_grouped(slot, seg.block, keys, group.reshape(blk.shape))
    s = np.searchsorted(seg.count_starts, shuffled, side="right") - 1
    n = blk * seg.counts[s] + (shuffled - seg.count_starts[s])
    return s, seg.local(s, n)
