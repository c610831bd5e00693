"""sample_rng: per-sample generators, deterministic and independent of world size."""

from __future__ import annotations

import numpy as np

from streamshard.sampler import EpochOrder, SampleSequence, sample_rng


def test_sample_rng_is_deterministic_and_distinct():
    a = sample_rng(1, 2, 0, 12345).random(4)
    assert np.array_equal(a, sample_rng(1, 2, 0, 12345).random(4))
    others = [sample_rng(2, 2, 0, 12345), sample_rng(1, 3, 0, 12345),
              sample_rng(1, 2, 1, 12345), sample_rng(1, 2, 0, 12346)]
    assert all(not np.array_equal(a, g.random(4)) for g in others)


def test_sample_rng_independent_of_world_size():
    seq = SampleSequence(EpochOrder([20] * 6, seed=1), global_batch_size=12)
    draws = {int(x): sample_rng(1, 0, 0, int(x)).integers(1 << 30) for x in seq.global_batch(3)[1]}
    for world in (2, 3, 4):
        for d in range(world):
            for x in seq.batch(3, d, world)[1].tolist():
                assert sample_rng(1, 0, 0, x).integers(1 << 30) == draws[x]
