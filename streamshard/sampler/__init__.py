"""The pure sampler: keyed per-index bijections from (seed, epoch, position) to samples.

numpy + stdlib only: no I/O, no torch, no environment reads, no global RNG state, and nothing of
size N (the number of samples) is ever built. See docs/SAMPLER.md for the sequence definition.
"""

from __future__ import annotations

from streamshard.sampler.ledgers import Ledgers
from streamshard.sampler.blockorder import BlockGroups
from streamshard.sampler.mixture import MixtureOrder
from streamshard.sampler.order import EpochOrder
from streamshard.sampler.permutation import Permutation, derive_key
from streamshard.sampler.rng import sample_rng
from streamshard.sampler.sequence import SampleSequence

__all__ = ["BlockGroups", "EpochOrder", "Ledgers", "MixtureOrder", "Permutation", "SampleSequence", "derive_key",
           "sample_rng"]
assert sorted(__all__) == __all__
