"""Keyed bijections on ``[0, n)`` computed per index, and the 64-bit key derivation they use.

Nothing here ever materializes ``n`` values: a position is mapped by a balanced Feistel network
over the smallest even-bit domain ``>= n`` (at least 2 bits) with cycle walking, so the cost of one
index is O(1) and the memory is O(1). The array kernels (:func:`permute_array`,
:func:`derive_keys`) take a *different* size and key per element, which is what lets
``EpochOrder`` shuffle thousands of windows in one vectorized pass.

Everything is numpy + stdlib, and bit-exact across platforms and Python versions (no ``hash()``,
no float arithmetic on keys).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Union

import numpy as np

from streamshard.errors import ConfigError

M64 = (1 << 64) - 1
# Weyl increment (2^64 / golden ratio) and the murmur3 fmix64 multipliers.
GOLDEN = 0x9E3779B97F4A7C15
_C1 = 0xFF51AFD7ED558CCD
_C2 = 0xC4CEB9FE1A85EC53
# Initial chaining value for derive_key (hex digits of pi), so derive_key() != mix64(0) == 0.
_IV = 0x243F6A8885A308D3
# 6 rounds: Luby-Rackoff needs 4 for a pseudo-random permutation; 2 more buy margin against the
# structure of tiny domains (2-bit halves) at ~1.5x the cost of 4.
ROUNDS = 6
_U64 = np.uint64
# Below this many elements still cycle walking, finish them one by one in Python: a scalar pass
# is ~6 us per element, a numpy pass ~50 us whatever its size.
_SCALAR_TAIL = 16
_ROUND_CONSTANTS = [_U64((GOLDEN * (r + 1)) & M64) for r in range(ROUNDS)]

Scalar = Union[int, str, np.integer]


def mix64(x: int) -> int:
    """murmur3's fmix64 finalizer on a Python int (taken mod 2^64): a bijection of 64-bit words."""
    x &= M64
    x ^= x >> 33
    x = (x * _C1) & M64
    x ^= x >> 33
    x = (x * _C2) & M64
    x ^= x >> 33
    return x


def mix64_array(x: np.ndarray) -> np.ndarray:
    """:func:`mix64` elementwise on a uint64 array (modifies and returns ``x``)."""
    x ^= x >> _U64(33)
    x *= _U64(_C1)  # uint64 array arithmetic wraps mod 2^64, as the scalar version masks
    x ^= x >> _U64(33)
    x *= _U64(_C2)
    x ^= x >> _U64(33)
    return x


def tag(text: str) -> int:
    """A stable 64-bit integer for a purpose tag such as ``"window"`` (blake2b, not ``hash()``)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


def _as_word(value: Scalar) -> int:
    if isinstance(value, str):
        return tag(value)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ConfigError(f"key parts must be int or str, got {type(value).__name__} {value!r}")
    return int(value) & M64  # negative ints wrap two's-complement, like int64 -> uint64


def _chain(h: int, value: int) -> int:
    return mix64(((h ^ value) + GOLDEN) & M64)


def derive_key(*parts: Scalar) -> int:
    """64-bit key from a sequence of ints (taken mod 2^64) and str tags; order-sensitive.

    ``derive_key(seed, epoch, "window", lane, w)`` is the same integer on every platform.
    """
    h = _IV
    for part in parts:
        h = _chain(h, _as_word(part))
    return mix64(h ^ len(parts))


def derive_keys(prefix: tuple, *arrays: np.ndarray) -> np.ndarray:
    """Vectorized ``derive_key(*prefix, a0[i], a1[i], ...)`` for integer arrays ``a0, a1, ...``.

    Returns a uint64 array of the broadcast shape; element i equals the scalar derive_key.
    """
    h = _IV
    for part in prefix:
        h = _chain(h, _as_word(part))
    out = None
    for arr in arrays:
        word = np.asarray(arr).astype(np.uint64)  # int64 -> uint64 wraps like `& M64`
        out = np.full(word.shape, h, dtype=np.uint64) if out is None else out
        out ^= word
        out += _U64(GOLDEN)
        mix64_array(out)
    if out is None:
        return np.asarray(mix64(h ^ len(prefix)), dtype=np.uint64)
    out ^= _U64(len(prefix) + len(arrays))
    return mix64_array(out)


def _bit_length(v: np.ndarray) -> np.ndarray:
    """Exact bit length of non-negative int64 values (frexp, corrected for float rounding)."""
    bits = np.frexp(v.astype(np.float64))[1].astype(np.int64)
    u = v.astype(np.uint64)
    bits[(bits < 64) & ((np.uint64(1) << np.minimum(bits, 63).astype(np.uint64)) <= u)] += 1
    too_big = (bits > 0) & ((np.uint64(1) << np.maximum(bits - 1, 0).astype(np.uint64)) > u)
    bits[too_big] -= 1
    return bits


def _half_bits(n: np.ndarray) -> np.ndarray:
    """Half width of the smallest even-bit domain >= n with at least 2 bits, as uint64."""
    bits = _bit_length(np.maximum(n - 1, 0))
    return np.maximum((bits + 1) // 2, 1).astype(np.uint64)


def _feistel(x: np.ndarray, half, keys, inverse: bool) -> np.ndarray:
    """One pass of the balanced Feistel network over 2*half bits (per element half and key)."""
    mask = (_U64(1) << half) - _U64(1)
    left = x >> half
    right = x & mask
    rounds = range(ROUNDS - 1, -1, -1) if inverse else range(ROUNDS)
    for r in rounds:
        if inverse:  # (L', R') = (R, L ^ F(R))  =>  (L, R) = (R' ^ F(L'), L')
            f = mix64_array(left ^ (keys + _ROUND_CONSTANTS[r])) & mask
            left, right = right ^ f, left
        else:
            f = mix64_array(right ^ (keys + _ROUND_CONSTANTS[r])) & mask
            left, right = right, left ^ f
    return (left << half) | right


def _feistel_int(x: int, half: int, key: int, inverse: bool) -> int:
    """:func:`_feistel` for one element with Python ints (bit-identical)."""
    mask = (1 << half) - 1
    left, right = x >> half, x & mask
    for r in (range(ROUNDS - 1, -1, -1) if inverse else range(ROUNDS)):
        k = (key + int(_ROUND_CONSTANTS[r])) & M64
        if inverse:
            left, right = right ^ (mix64(left ^ k) & mask), left
        else:
            left, right = right, left ^ (mix64(right ^ k) & mask)
    return (left << half) | right


def permute_array(x, n, keys, *, inverse: bool = False) -> np.ndarray:
    """Vectorized keyed permutation: element i is ``Permutation(n[i], keys[i])(x[i])``.

    ``x``, ``n`` (int64, ``0 <= x < n``) and ``keys`` (uint64) broadcast together; the caller
    validates ranges. Cycle walking re-applies the network only to the elements still out of
    range: the domain is < 4n, so each pass keeps at least 1/4 of them in expectation.
    """
    x, n, keys = np.broadcast_arrays(np.asarray(x, np.int64), np.asarray(n, np.int64),
                                     np.asarray(keys, np.uint64))
    out = x.astype(np.uint64)  # a copy: broadcast views are read-only
    active = np.flatnonzero(n > 1)  # n <= 1 is the identity (x can only be 0)
    if active.size == 0:
        return out.astype(np.int64)
    flat_out = out.reshape(-1)
    n_a = n.reshape(-1)[active].astype(np.uint64)
    half_a = _half_bits(n.reshape(-1)[active])
    keys_a = keys.reshape(-1)[active]
    y = _feistel(flat_out[active], half_a, keys_a, inverse)
    pending = np.flatnonzero(y >= n_a)
    while pending.size > _SCALAR_TAIL:
        y[pending] = _feistel(y[pending], half_a[pending], keys_a[pending], inverse)
        pending = pending[y[pending] >= n_a[pending]]
    for i in pending.tolist():  # the last few walkers: a numpy pass costs ~80 calls of ~1 us
        value, size, half, key = int(y[i]), int(n_a[i]), int(half_a[i]), int(keys_a[i])
        while value >= size:
            value = _feistel_int(value, half, key, inverse)
        y[i] = value
    flat_out[active] = y
    return out.astype(np.int64)


def permute_grouped(x: np.ndarray, n: int, group_keys: np.ndarray,
                    group: np.ndarray) -> np.ndarray:
    """``permute_array(x, n, group_keys[group])`` for many elements sharing a few keys.

    When the domain is small next to the request (a mixture block of ~100 slots), the network is
    evaluated once on the whole domain of each key and cycle walking becomes table lookups, so a
    batch costs one Feistel pass instead of ~15 passes over ever fewer walkers.
    """
    half = int(_half_bits(np.asarray([n]))[0])
    domain = 1 << (2 * half)
    # Walking 1024 slots of a 100-slot block (domain 256) takes ~15 call-bound passes; one pass
    # over a table of up to 8x the request measured 3-5x faster. 2^24 entries bounds the memory.
    table_size = group_keys.size * domain
    if n <= 1 or table_size > 8 * x.size or table_size > 1 << 24:
        return permute_array(x, n, group_keys[group])
    table = _feistel(np.tile(np.arange(domain, dtype=np.uint64), group_keys.size),
                     np.uint64(half), np.repeat(group_keys.astype(np.uint64), domain), False)
    table = table.astype(np.int64)
    base = group.astype(np.int64) * domain
    y = table[base + x]
    pending = np.flatnonzero(y >= n)
    while pending.size:
        y[pending] = table[base[pending] + y[pending]]
        pending = pending[y[pending] >= n]
    return y


def check_positions(values, n: int, what: str) -> tuple[np.ndarray, bool]:
    """Validate ints / integer arrays in ``[0, n)``; returns (int64 array, was_scalar)."""
    scalar = np.ndim(values) == 0
    arr = np.asarray(values)
    if arr.dtype.kind not in "iu" or arr.dtype == np.bool_:
        if not (arr.dtype == object and all(isinstance(v, int) for v in arr.reshape(-1))):
            raise ConfigError(f"{what} must be integers, got dtype {arr.dtype}")
    if arr.size:
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi >= n:
            bad = lo if lo < 0 else hi
            raise IndexError(f"{what} {bad} out of range [0, {n})")
    return arr.astype(np.int64), scalar


@dataclass(frozen=True)
class Permutation:
    """Keyed bijection on ``[0, n)``: ``perm(x)`` and ``perm.inverse(y)`` for ints or arrays.

    Pure value (picklable, hashable, stable repr). ``n == 0`` is empty, ``n == 1`` the identity.
    Arrays come back as int64 of the same shape, ints as ints; out-of-range input raises
    ``IndexError`` naming the value and ``n``.
    """

    n: int
    key: int

    def __post_init__(self) -> None:
        if isinstance(self.n, bool) or not isinstance(self.n, (int, np.integer)) or self.n < 0:
            raise ConfigError(f"n must be a non-negative int, got {self.n!r}")
        if isinstance(self.key, bool) or not isinstance(self.key, (int, np.integer)):
            raise ConfigError(f"key must be an int, got {self.key!r}")
        object.__setattr__(self, "n", int(self.n))
        object.__setattr__(self, "key", int(self.key) & M64)

    def __call__(self, x):
        return self._apply(x, inverse=False)

    def inverse(self, y):
        """The inverse bijection: ``perm.inverse(perm(x)) == x``."""
        return self._apply(y, inverse=True)

    def _apply(self, values, inverse: bool):
        arr, scalar = check_positions(values, self.n, "permutation input")
        out = permute_array(arr, self.n, self.key, inverse=inverse)
        return int(out) if scalar else out
