"""``streamshard plan``: what each node will download, from the real sampler, before launch.

Only the index is read (shard sample counts and byte sizes), never shard data. For a shuffled
order the figures are exact upper bounds from the lane geometry: a node touches every shard that
overlaps a lane it reads (lane ``l`` is a contiguous run of the epoch's shuffled shard space,
docs/SAMPLER.md), which the rank split (:class:`streamshard.sampler.assign.Assignment`) fixes
for every step of a lane phase. That costs O(#shards + G log G) per epoch, whatever the number of
samples. ``shuffle=False`` has no lanes to reason with: the planner then maps evenly spaced steps
through the order and says so (``"method": "sampled ..."``).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np

from streamshard.errors import ConfigError
from streamshard.sampler import EpochOrder, SampleSequence
from streamshard.sampler.order import check_int, default_lanes
from streamshard.sizes import format_size

# Positions mapped per epoch when the plan has to sample (shuffle=False).
_SAMPLED_POSITIONS = 1 << 21


@dataclass(frozen=True)
class CapacityPlan:
    """Per-epoch download figures of one launch configuration (JSON keys = field names)."""

    world_size: int
    local_world_size: int
    nodes: int
    global_batch_size: int
    lanes: int
    window: int
    epochs: int
    steps_per_epoch: int
    rank_batch_min: int
    rank_batch_max: int
    dataset_bytes: int
    num_shards: int
    shards_per_node_mean: float
    shards_per_node_max: int
    bytes_per_node_mean: float
    bytes_per_node_max: int
    bytes_per_node_over_share_mean: float
    bytes_per_node_over_share_max: float
    cache_working_set_shards_max: int
    cache_working_set_bytes_max: int
    method: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def plan_capacity(shard_samples: Sequence[int], shard_bytes: Sequence[int], *, world_size: int,
                  local_world_size: int, global_batch_size: int, lanes: int | None = None,
                  window: int | None = None, epochs: int = 1, seed: int = 0,
                  shuffle: bool = True, drop_last: bool = True, blocks=None) -> CapacityPlan:
    """Figures for ``world_size`` ranks, ``local_world_size`` per node, over ``epochs`` epochs
    (max over epochs and nodes; means over both). ``lanes=None`` is the loader's default;
    ``blocks`` the block-aware shuffle's ``BlockGroups`` (the loader's default for compressed
    shards, :func:`streamshard.blockshuffle.block_groups`)."""
    samples = np.asarray(shard_samples, dtype=np.int64)
    sizes = np.asarray(shard_bytes, dtype=np.int64)
    if samples.shape != sizes.shape or samples.ndim != 1:
        raise ConfigError(f"shard_samples and shard_bytes must be 1-D of one length, got "
                          f"{samples.shape} and {sizes.shape}")
    g = check_int(global_batch_size, "global_batch_size", minimum=1)
    epochs = check_int(epochs, "epochs", minimum=1)
    lanes = default_lanes(samples.size, g) if lanes is None else lanes
    order = EpochOrder(samples, seed=seed, shuffle=shuffle, lanes=lanes, window=window,
                       blocks=blocks if shuffle else None)
    seq = SampleSequence(order, global_batch_size=g, drop_last=drop_last)
    assignment = seq.assignment(world_size, local_world_size)
    nodes = assignment.num_nodes
    rank_sizes = assignment.rank_sizes()
    shards = np.zeros((epochs, nodes), dtype=np.int64)
    node_bytes = np.zeros((epochs, nodes), dtype=np.float64)
    for epoch in range(epochs):
        if shuffle:
            pairs = _touched_by_lanes(order, assignment, epoch)
            phases = len(assignment.phases())
            method = ("lanes (exact upper bound)" if phases == assignment.period() else
                      f"lanes over {phases} of {assignment.period()} lane phases (sampled)")
        else:
            pairs, steps = _touched_by_sampling(seq, assignment, epoch)
            method = f"sampled {steps} of {seq.steps_per_epoch} steps per epoch"
        node, shard = pairs // order.num_shards, pairs % order.num_shards
        shards[epoch] = np.bincount(node, minlength=nodes)
        node_bytes[epoch] = np.bincount(node, weights=sizes[shard], minlength=nodes)
    share = max(1.0, float(sizes.sum()) / nodes)
    working = _working_set(order, assignment, local_world_size, shuffle, g)
    working = np.minimum(working, shards.max(axis=0))
    biggest = int(sizes.max()) if sizes.size else 0
    return CapacityPlan(
        world_size=world_size, local_world_size=local_world_size, nodes=nodes,
        global_batch_size=g, lanes=order.lanes, window=order.window, epochs=epochs,
        steps_per_epoch=seq.steps_per_epoch,
        rank_batch_min=int(rank_sizes.min()), rank_batch_max=int(rank_sizes.max()),
        dataset_bytes=int(sizes.sum()), num_shards=int(samples.size),
        shards_per_node_mean=round(float(shards.mean()), 3),
        shards_per_node_max=int(shards.max()),
        bytes_per_node_mean=round(float(node_bytes.mean()), 1),
        bytes_per_node_max=int(round(node_bytes.max())),
        bytes_per_node_over_share_mean=round(float(node_bytes.mean()) / share, 4),
        bytes_per_node_over_share_max=round(float(node_bytes.max()) / share, 4),
        cache_working_set_shards_max=int(working.max()),
        cache_working_set_bytes_max=int(working.max()) * biggest,
        method=method,
    )


def node_shards(shard_samples: Sequence[int], *, world_size: int, local_world_size: int,
                global_batch_size: int, lanes: int | None = None, window: int | None = None,
                seed: int = 0, epoch: int = 0, blocks=None) -> np.ndarray:
    """(nodes, shards) bool: the shards each node may touch in ``epoch`` (shuffled order), the
    prediction the plan's figures are computed from."""
    g = check_int(global_batch_size, "global_batch_size", minimum=1)
    samples = np.asarray(shard_samples, dtype=np.int64)
    order = EpochOrder(samples, seed=seed, lanes=default_lanes(samples.size, g) if lanes is None
                       else lanes, window=window, blocks=blocks)
    assignment = SampleSequence(order, global_batch_size=g).assignment(world_size, local_world_size)
    pairs = _touched_by_lanes(order, assignment, epoch)
    hit = np.zeros((assignment.num_nodes, order.num_shards), dtype=bool)
    hit[pairs // order.num_shards, pairs % order.num_shards] = True
    return hit


def _node_lanes(assignment) -> tuple[np.ndarray, np.ndarray]:
    """(node, lane) pairs some rank of the node reads, over every lane phase."""
    g, lanes, k = assignment.global_batch_size, assignment.lanes, assignment.local_world_size
    pairs = []
    for phase in assignment.phases():
        pos = np.arange(phase, phase + g, dtype=np.int64)
        pairs.append((assignment.rank_of(pos) // k) * lanes + pos % lanes)
    unique = np.unique(np.concatenate(pairs))
    return unique // lanes, unique % lanes


def _touched_by_lanes(order: EpochOrder, assignment, epoch: int) -> np.ndarray:
    """Sorted unique ``node * #shards + shard`` of the non-empty shards each node may touch."""
    node, lane = _node_lanes(assignment)
    first, last = order.lane_slot_ranges(epoch)
    slot_to_shard, _ = order.epoch_tables(epoch)
    spans = np.maximum(last[lane] - first[lane] + 1, 0)
    slots = np.repeat(first[lane], spans) + (np.arange(spans.sum()) - np.repeat(
        np.cumsum(spans) - spans, spans))
    shard = slot_to_shard[slots]
    keep = order.shard_sizes[shard] > 0
    return np.unique(np.repeat(node, spans)[keep] * order.num_shards + shard[keep])


def _touched_by_sampling(seq: SampleSequence, assignment, epoch: int) -> tuple[np.ndarray, int]:
    order, k = seq.order, assignment.local_world_size
    steps = max(1, min(seq.steps_per_epoch, _SAMPLED_POSITIONS // seq.global_batch_size))
    pairs = []
    for j in np.linspace(0, seq.steps_per_epoch - 1, steps).astype(np.int64).tolist():
        pos = seq.step_positions(epoch * seq.steps_per_epoch + j)
        node = assignment.rank_of(pos) // k
        pairs.append(node * order.num_shards + order.shard_of(seq.map_positions(epoch, pos)[1]))
    return np.unique(np.concatenate(pairs)), steps


def _working_set(order: EpochOrder, assignment, k: int, shuffle: bool, g: int) -> np.ndarray:
    """Shards a node's cache must hold at once: lanes it reads x (window's shards + 1)."""
    node, _ = _node_lanes(assignment)
    lanes = np.bincount(node, minlength=assignment.num_nodes)
    if not shuffle:
        return np.full(assignment.num_nodes, order.shards_touched_by_run(g) + 1, dtype=np.int64)
    return lanes * (order.shards_per_lane_at_once() + 1)


# -- CLI ------------------------------------------------------------------------------------

def add_parser(sub: Any) -> None:
    p = sub.add_parser("plan", help="per-node downloads and cache needs of a launch, before launch",
                       description="Figures from the real sampler and rank split; reads only "
                                   "the dataset's index, never shard data.")
    p.add_argument("dataset", metavar="DATASET", help="dataset directory or fsspec URL")
    p.add_argument("--world-size", type=int, required=True, help="ranks in the job")
    p.add_argument("--local-world-size", type=int, required=True, help="ranks per node")
    p.add_argument("--global-batch-size", type=int, required=True)
    p.add_argument("--lanes", type=int, default=None, help="default: the loader's")
    p.add_argument("--window", type=int, default=None, help="default: the loader's")
    p.add_argument("--epochs", type=int, default=1, help="epochs to plan (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-shuffle", action="store_true", help="plan shuffle=False")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")


def run(args: argparse.Namespace) -> int:
    from streamshard.blockshuffle import block_groups
    from streamshard.reader import open_dataset

    with open_dataset(args.dataset) as ds:
        shards = ds.index.shards
        # The loader's default order: block-aware for compressed shards (docs/SAMPLER.md).
        blocks = block_groups(ds.index) if ds.index.compression is not None else None
    report = plan_capacity([s.samples for s in shards], [s.bytes for s in shards], blocks=blocks,
                           world_size=args.world_size, local_world_size=args.local_world_size,
                           global_batch_size=args.global_batch_size, lanes=args.lanes,
                           window=args.window, epochs=args.epochs, seed=args.seed,
                           shuffle=not args.no_shuffle)
    if args.json:
        sys.stdout.write(json.dumps(report.to_json(), sort_keys=True) + "\n")
        return 0
    r = report
    lines = [
        f"{r.world_size} ranks = {r.nodes} nodes x {r.local_world_size}, G={r.global_batch_size}, "
        f"lanes={r.lanes}, window={r.window}, {r.steps_per_epoch} steps per epoch",
        f"rank batch: {r.rank_batch_min}..{r.rank_batch_max} samples",
        f"per node per epoch: {r.shards_per_node_mean:.1f} shards mean, {r.shards_per_node_max} max "
        f"of {r.num_shards}; {format_size(int(r.bytes_per_node_mean))} mean, "
        f"{format_size(r.bytes_per_node_max)} max",
        f"bytes per node / fair share: {r.bytes_per_node_over_share_mean:.3f} mean, "
        f"{r.bytes_per_node_over_share_max:.3f} max",
        f"cache working set per node: {r.cache_working_set_shards_max} shards, "
        f"{format_size(r.cache_working_set_bytes_max)} (cache_limit must be at least this)",
        f"method: {r.method}",
    ]
    sys.stdout.write("\n".join(lines) + "\n")
    return 0
