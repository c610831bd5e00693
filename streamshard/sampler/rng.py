"""Per-sample random generators for user transforms, independent of world size and workers.

The generator of a sample is a pure function of ``(seed, epoch, stream, sample_id)``: whichever
rank, worker or resume serves the sample, its augmentation draws are the same.
"""

from __future__ import annotations

import numpy as np

from streamshard.sampler.permutation import derive_key


def sample_rng(seed: int, epoch: int, stream: int, sample_id: int) -> np.random.Generator:
    """A fresh ``Generator(Philox)`` keyed by the 128 bits ``derive_key(..., "rng-hi/lo")``.

    Philox is a counter-based generator: the key alone fixes the stream of draws, so two samples
    never share a state and creating one costs microseconds (no seeding pass).
    """
    parts = (int(seed), int(epoch), int(stream), int(sample_id))
    key = (derive_key(*parts, "rng-hi") << 64) | derive_key(*parts, "rng-lo")
    return np.random.Generator(np.random.Philox(key=key))
