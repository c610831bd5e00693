"""Quarantine by sample: ids never served, their positions filled by a deterministic rule.

An entry ``(stream, sample_id, from_step)`` says: from absolute step ``from_step`` on, wherever
the sequence would serve ``sample_id`` of ``stream``, it serves a substitute instead. Steps before
``from_step`` are unchanged, so ``explain`` of a past step still shows what was really served, and
adding an entry changes only global batches at steps ``>= from_step`` (proved by a property test).

**Fill rule** (epoch ``e``, ``S`` steps of ``G`` positions, ``E`` positions, ``T = E - S*G`` the
positions ``drop_last`` never serves, 0 without ``drop_last``):

1. The entries *active* in epoch ``e`` (``from_step < (e+1)*S``), in ledger order (by
   ``from_step``, then stream, then id), get slots ``0, 1, 2, ...``.
2. A quarantined sample met at a served position whose step is ``>= from_step`` takes the sample
   at tail position ``S*G + slot``: a sample this epoch would never serve, so exactly-once holds.
3. If that tail sample is itself quarantined and active at this step, it is never served at its
   own (tail) position, so its slot is free: follow it (``slot = its slot``) and repeat. The chain
   cannot cycle (a chain only visits tail samples and starts from a served one) and two chains
   never merge (a tail sample belongs to one slot), so substitutes are distinct.
4. When a slot is ``>= T`` (no tail, or more entries than tail positions), the substitute is the
   first served position at or after ``(slot - T) mod (served positions)`` whose sample is not
   quarantined at this step: a *repeat* of a sample of the same epoch (documented cost: that
   sample is served twice in the epoch). With ``drop_last=True`` and ``T >= #entries`` this
   never happens.

Pad positions of a ``drop_last=False`` epoch (wrapped to ``p % E``) are judged by their wrapped
position's step. In a mixture whose small streams repeat inside one mixture epoch, every repeat
of a quarantined sample takes the same substitute (served as often as the quarantined one would
have been). Everything is a pure function of the ledger and the position: identical on all ranks
and world sizes, O(G log Q) per batch, plus O(Q) sampler calls only for batches that hold a hit.
"""

from __future__ import annotations

from typing import Callable, Iterable

import numpy as np

from streamshard.errors import ConfigError
from streamshard.sampler.order import check_int

Entry = tuple[int, int, int]  # (stream, sample_id, from_step)
_STREAM_SHIFT = 44  # sample ids < 2**44 (1.7e13) and streams < 2**19 fit one int64 code
RawMap = Callable[[int, np.ndarray], tuple[np.ndarray, np.ndarray]]


def normalize_quarantine(entries: Iterable) -> tuple[Entry, ...]:
    """Distinct ``(stream, sample_id)`` entries, the earliest ``from_step`` kept, sorted by
    ``(from_step, stream, sample_id)``: re-adding or merging in any order gives the same value."""
    earliest: dict[tuple[int, int], int] = {}
    for item in entries:
        try:
            stream, sample, from_step = item
        except (TypeError, ValueError):
            raise ConfigError(f"quarantine entry must be (stream, sample_id, from_step), got {item!r}") from None
        stream = check_int(stream, "quarantine stream", minimum=0)
        sample = check_int(sample, "quarantine sample_id", minimum=0)
        from_step = check_int(from_step, "quarantine from_step", minimum=0)
        if stream >= 1 << (63 - _STREAM_SHIFT) or sample >= 1 << _STREAM_SHIFT:
            raise ConfigError(f"quarantine entry ({stream}, {sample}) out of range: stream < 2**19, "
                              f"sample_id < 2**{_STREAM_SHIFT}")
        key = (stream, sample)
        earliest[key] = min(earliest.get(key, from_step), from_step)
    return tuple(sorted(((s, i, f) for (s, i), f in earliest.items()), key=lambda e: (e[2], e[0], e[1])))


def codes(streams: np.ndarray, samples: np.ndarray) -> np.ndarray:
    """One int64 per (stream, sample) pair, for vectorized membership tests."""
    return (np.asarray(streams, dtype=np.int64) << _STREAM_SHIFT) | np.asarray(samples, dtype=np.int64)


class _Epoch:
    """The fill rule's view of one epoch: active entries, their slots, the tail mapping."""

    def __init__(self, entries, epoch: int, steps: int, g: int, e: int, drop_last: bool, raw: RawMap):
        self.first = epoch * steps
        active = [x for x in entries if x[2] < self.first + steps]
        self.slot = {(s << _STREAM_SHIFT) | i: k for k, (s, i, _) in enumerate(active)}
        self.since = {(s << _STREAM_SHIFT) | i: f for s, i, f in active}
        self.epoch, self.g, self.raw = epoch, g, raw
        self.served = min(steps * g, e)  # distinct served positions
        self.tail = e - steps * g if drop_last else 0
        self._tail_codes: np.ndarray | None = None

    def quarantined(self, code: int, step: int) -> bool:
        since = self.since.get(code)
        return since is not None and step >= since

    def tail_code(self, k: int) -> int:
        if self._tail_codes is None:  # one sampler call maps every slot the epoch can use
            n = min(self.tail, len(self.slot))
            pos = self.served + np.arange(n, dtype=np.int64)
            self._tail_codes = codes(*self.raw(self.epoch, pos))
        return int(self._tail_codes[k])

    def substitute(self, code: int, step: int) -> int:
        k = self.slot[code]
        for _ in range(len(self.slot) + 1):  # a chain visits each entry at most once (module doc)
            if k >= self.tail:
                return self._repeat(k - self.tail, step)
            candidate = self.tail_code(k)
            if not self.quarantined(candidate, step):
                return candidate
            k = self.slot[candidate]
        raise AssertionError("quarantine chain did not end")  # unreachable: see the module doc

    def _repeat(self, k: int, step: int) -> int:
        n = len(self.slot) + 1  # among n consecutive served positions at least one is clean
        pos = (k + np.arange(n, dtype=np.int64)) % self.served
        for c in codes(*self.raw(self.epoch, pos)).tolist():
            if not self.quarantined(c, step):
                return c
        raise ConfigError(f"cannot fill a quarantined position of epoch {self.epoch}: "
                          f"all {self.served} served samples are quarantined")


def table_of(entries: tuple[Entry, ...]) -> np.ndarray:
    """The sorted codes of a ledger's ids (built once per sequence: see ``fill``'s ``table``)."""
    return np.sort(np.fromiter(((s << _STREAM_SHIFT) | i for s, i, _ in entries), dtype=np.int64,
                               count=len(entries)))


def fill(entries: tuple[Entry, ...], epoch: int, positions: np.ndarray, streams: np.ndarray,
         samples: np.ndarray, *, steps: int, g: int, e: int, drop_last: bool, raw: RawMap,
         table: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Apply the fill rule to mapped epoch ``positions``; returns ``(streams, samples, filled)``
    where ``filled`` marks the substituted positions. ``raw`` maps epoch positions without
    quarantine (the sequence's own mapping); ``table`` is ``table_of(entries)`` if cached."""
    filled = np.zeros(positions.shape, dtype=bool)
    if not entries or positions.size == 0:
        return streams, samples, filled
    have = codes(streams, samples)
    table = table_of(entries) if table is None else table
    hit = np.isin(have, table) & (positions < min(steps * g, e))
    if not hit.any():
        return streams, samples, filled
    view = _Epoch(entries, epoch, steps, g, e, drop_last, raw)
    streams, samples = streams.copy(), samples.copy()
    for i in np.flatnonzero(hit).tolist():
        step = view.first + int(positions.flat[i]) // g
        code = int(have.flat[i])
        if not view.quarantined(code, step):
            continue  # served before its from_step: history stays as it was
        sub = view.substitute(code, step)
        streams.flat[i], samples.flat[i] = sub >> _STREAM_SHIFT, sub & ((1 << _STREAM_SHIFT) - 1)
        filled.flat[i] = True
    return streams, samples, filled
