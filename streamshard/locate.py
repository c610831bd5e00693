"""Which shard holds global sample ``i``: the one rule, shared by the index and the sampler.

A dataset's shards hold consecutive global ids: shard ``s`` holds ``[starts[s], starts[s+1])``
where ``starts`` is the cumulative sample count (``starts[0] == 0``, length ``S + 1``). Sample
``i`` is in the last shard whose start is ``<= i``, which also steps over empty shards (their
start equals the next one's). ``DatasetIndex.locate`` is the public entry point; the pure sampler
(``EpochOrder.shard_of``) uses the same two functions on its own shard sizes.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def shard_starts(sizes: Sequence[int] | np.ndarray) -> np.ndarray:
    """Cumulative sample counts ``[0, n0, n0+n1, ...]`` (int64, length ``len(sizes) + 1``)."""
    starts = np.zeros(len(sizes) + 1, dtype=np.int64)
    np.cumsum(np.asarray(sizes, dtype=np.int64), out=starts[1:])
    return starts


def locate(starts: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(shard, offset in shard)`` int64 arrays for int64 ``ids`` already checked to lie in
    ``[0, starts[-1])``: one vectorized binary search."""
    shard = np.searchsorted(starts, ids, side="right") - 1
    return shard, ids - starts[shard]
