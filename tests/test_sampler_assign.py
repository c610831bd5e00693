"""Which rank reads what: properties of the assignment and its locality at scale (simulated)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamshard.capacity import node_shards, plan_capacity
from streamshard.errors import ConfigError
from streamshard.sampler import EpochOrder, SampleSequence
from streamshard.sampler.assign import Assignment, chunk_owners, rank_sizes
from streamshard.sampler.order import default_lanes

SETTINGS = settings(max_examples=40, deadline=None)
# 4,096 shards of 14..18 samples (seeded; a byte-targeted writer varies counts about this much):
# lane and shard boundaries never line up. (With 10..22 the worst node reaches 1.19-1.23,
# docs/SAMPLER.md.)
SHARDS = np.random.default_rng(1).integers(14, 19, 4096)
G = 4096
PER_NODE = 8


@SETTINGS
@given(g=st.integers(1, 64), lanes=st.integers(1, 80), world=st.integers(1, 20),
       local=st.integers(1, 8), start=st.integers(0, 10**6))
def test_ranks_partition_every_step_and_differ_by_at_most_one(g, lanes, world, local, start):
    a = Assignment(g, lanes, world, local)
    pos = np.arange(start, start + g, dtype=np.int64)
    parts = [a.split(pos, r) for r in range(world)]
    sizes = [len(p) for p in parts]
    assert sizes == a.rank_sizes().tolist() and max(sizes) - min(sizes) <= 1
    assert sorted(np.concatenate(parts).tolist()) == pos.tolist()  # disjoint, nothing lost
    owner = a.rank_of(pos)
    for r, part in enumerate(parts):  # cached pattern == direct computation
        assert part.tolist() == pos[owner == r].tolist()
    # node totals differ by at most one too (the +1 ranks go round-robin over nodes)
    full = world // local  # the last node may have fewer ranks
    nodes = np.bincount(np.arange(world) // local, weights=sizes)[:full]
    assert full == 0 or np.ptp(nodes) <= 1


@SETTINGS
@given(sizes=st.lists(st.integers(0, 30), min_size=1, max_size=20).filter(lambda s: sum(s) >= 8),
       g=st.integers(1, 8), lanes=st.none() | st.integers(1, 12), world=st.integers(1, 9),
       local=st.integers(1, 4), epoch=st.integers(0, 5))
def test_exactly_once_and_same_global_batches_at_any_world_size(sizes, g, lanes, world, local, epoch):
    seq = SampleSequence(EpochOrder(sizes, seed=4, lanes=lanes), global_batch_size=g)
    served = []
    for step in range(epoch * seq.steps_per_epoch, (epoch + 1) * seq.steps_per_epoch):
        parts = [seq.batch(step, r, world, local)[1] for r in range(world)]
        merged = np.concatenate(parts)
        assert sorted(merged.tolist()) == sorted(seq.global_batch(step)[1].tolist())
        served += merged.tolist()
    n = sum(sizes)
    assert len(served) == len(set(served)) == n - n % g  # each sample at most once, tail dropped


@SETTINGS
@given(chunks=st.integers(1, 300), nodes=st.integers(2, 60))
def test_ownership_is_balanced_and_survivors_keep_their_chunks(chunks, nodes):
    before, after = chunk_owners(chunks, nodes), chunk_owners(chunks, nodes - 1)
    counts = [len(c) for c in before]
    assert max(counts) - min(counts) <= 1 and sorted(sum(before, ())) == list(range(chunks))
    for node in range(nodes - 1):  # the last node leaves: nobody else loses a chunk
        assert set(before[node]) <= set(after[node])


def test_rank_sizes_and_errors():
    # 10 on 4 ranks, 2 per node: the two +1 ranks are on different nodes
    assert rank_sizes(10, 4, 2).tolist() == [3, 2, 3, 2]
    assert rank_sizes(8, 3, 1).tolist() == [3, 3, 2]
    with pytest.raises(ConfigError, match="lanes must be positive, got 0"):
        Assignment(8, 0, 2)
    with pytest.raises(ConfigError, match="rank must be < world_size=2, got 2"):
        Assignment(8, 4, 2).split(np.arange(8), 2)
    with pytest.raises(ConfigError, match="a step has 8 positions"):
        Assignment(8, 4, 2).rank_of(np.arange(7))


# 1,024 ranks cost ~7 s each on the shared 2-core machine: every rank's batch of every step.
SCALE = pytest.mark.slow(reason="maps one epoch for each of ~1,000 ranks (~7 s)")


@pytest.mark.parametrize("world_size", [1, 8, 64, pytest.param(1024, marks=SCALE),
                                        pytest.param(1016, marks=SCALE)])
def test_loader_assignment_at_scale_reads_about_a_share_per_node(world_size):
    """One epoch through the loader's own rank split (SampleSequence.batch), every rank."""
    order = EpochOrder(SHARDS, seed=7, lanes=default_lanes(SHARDS.size, G))  # the loader's
    seq = SampleSequence(order, global_batch_size=G)
    nodes = -(-world_size // PER_NODE)
    hit = np.zeros((nodes, SHARDS.size), dtype=bool)
    served = []
    for step in range(seq.steps_per_epoch):
        for rank in range(world_size):
            ids = seq.batch(step, rank, world_size, min(PER_NODE, world_size))[1]
            assert len(ids) in (G // world_size, -(-G // world_size))
            hit[rank // PER_NODE, order.shard_of(ids)] = True
            served.append(ids)
    served = np.concatenate(served)
    assert len(served) == len(np.unique(served)) == seq.steps_per_epoch * G  # exactly once
    share = SHARDS.sum() / nodes  # bytes are proportional to samples here
    ratio = (hit * SHARDS).sum(axis=1) / share
    assert ratio.max() <= 1.2, (world_size, ratio.max())
    # the planner's prediction holds every shard the nodes actually read
    predicted = node_shards(SHARDS, world_size=world_size, local_world_size=min(PER_NODE, world_size),
                            global_batch_size=G, seed=7)
    assert not (hit & ~predicted).any()


def test_planner_bound_at_every_world_size_from_8_to_1024():
    worst = []
    for world_size in list(range(8, 1025, 8)) + [1000]:
        plan = plan_capacity(SHARDS, SHARDS * 4096, world_size=world_size, local_world_size=8,
                             global_batch_size=G, seed=7)
        assert plan.rank_batch_max - plan.rank_batch_min <= 1
        worst.append((plan.bytes_per_node_over_share_max, world_size))
    assert max(worst)[0] <= 1.2, max(worst)


@SETTINGS
@given(sizes=st.lists(st.integers(0, 30), min_size=1, max_size=12).filter(lambda s: sum(s) >= 9),
       g=st.integers(1, 9), lanes=st.none() | st.integers(1, 12), world=st.integers(1, 9),
       local=st.integers(1, 4), drop_last=st.booleans(), first=st.integers(0, 40),
       count=st.integers(0, 30))
def test_positions_of_many_steps_equal_one_step_at_a_time(sizes, g, lanes, world, local,
                                                          drop_last, first, count):
    """The batch sampler maps hundreds of steps per call (device_positions_of, vectorized by
    lane phase); it must equal device_positions step by step, the padded step included."""
    seq = SampleSequence(EpochOrder(sizes, seed=4, lanes=lanes), global_batch_size=g,
                         drop_last=drop_last)
    steps = list(range(first, first + count))
    for rank in range(world):
        many = seq.device_positions_of(steps, rank, world, local)
        one = [seq.device_positions(s, rank, world, local) for s in steps]
        assert [p.tolist() for p in many] == [p.tolist() for p in one]
