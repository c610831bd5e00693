"""Which rank reads which positions of a global batch: lanes owned by nodes (docs/SAMPLER.md).

The global batch of a step is fixed by the sequence (epoch positions ``[j*G, (j+1)*G)``); only
its split among ranks is free, and this module fixes it so that a node reads about its share of
the shards at any world size:

1. **Rank sizes.** ``q = G // D`` samples per rank, one more for ``G % D`` ranks chosen round-robin
   over nodes (ranks ordered by ``(local index, node)``), so rank sizes differ by at most one and
   node totals by at most one.
2. **Lane ownership.** Position ``p`` belongs to lane ``p mod L`` (the order's lane). Lanes are
   grouped into ``C`` chunks of ``u`` adjacent lanes (a contiguous run of the shuffled shard
   space). Chunks are owned by nodes by *balanced stealing*: with one node it owns every chunk;
   going from ``m - 1`` to ``m`` nodes, node ``m - 1`` takes ``C // m`` chunks, each donor giving
   its highest-numbered chunks, the ``C % m`` fullest old nodes (ties: lower index) keeping
   ``C // m + 1``. Owner counts differ by at most one, and removing the last node only hands its
   chunks to the others: every surviving node keeps every chunk it owned.
3. **Line.** Nodes are put in an order in which the excess carried from over-quota owners always
   covers the next under-quota node's deficit (:meth:`Assignment.node_order`), and lanes are laid
   on a line by (owner in that order, chunk, lane). A step's positions are sorted along the line
   and cut into the nodes' sizes in that order: each node reads one stretch, its own lanes plus a
   piece of a neighbour's (its surplus goes to the next nodes on the line, the fewest that can
   take it). When ``L`` divides ``G`` every step holds ``G/L`` positions of every lane, so the
   stretches, and who feeds whom, are the same every step.
4. **Local ranks.** A node's positions, in line order, are cut into its ranks' sizes in order, so
   a rank reads few lanes. Each rank's positions come in the step's order.

Everything is a pure function of ``(G, L, u, D, K)`` and the step's positions: identical on all
ranks, nothing to store in the state, O(G log G) per step (cached per lane phase).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from math import gcd

import numpy as np

from streamshard.errors import ConfigError
from streamshard.sampler.order import check_int

# Chunks of adjacent lanes per dataset: every non-adjacent chunk a node owns costs it one shard
# shared with a neighbour, so fewer, larger chunks are cheaper; 256 keeps owner counts balanced
# to one chunk in ~128 (docs/SAMPLER.md, "Lanes and nodes").
DEFAULT_CHUNKS = 256


@lru_cache(maxsize=16)
def chunk_owners(num_chunks: int, num_nodes: int) -> tuple[tuple[int, ...], ...]:
    """Chunks owned by each node under balanced stealing (sorted tuples, one per node)."""
    members: list[list[int]] = [list(range(num_chunks))]
    counts = [num_chunks]
    for m in range(2, num_nodes + 1):
        q, r = divmod(num_chunks, m)
        # The r fullest old nodes (ties: lower index) keep q + 1, the others q. Counts are
        # always q or q + 1 (or more) here, so "fullest" is every node above q, lowest first.
        fullest = sorted(range(m - 1), key=lambda k: (-counts[k], k))[:r]
        target = [q] * (m - 1)
        for k in fullest:
            target[k] = q + 1
        taken: list[int] = []
        for k in range(m - 1):
            give = counts[k] - target[k]
            if give > 0:
                taken.extend(members[k][-give:])
                del members[k][-give:]
                counts[k] = target[k]
        members.append(sorted(taken))
        counts.append(len(taken))
    return tuple(tuple(x) for x in members)


def rank_sizes(global_batch_size: int, world_size: int, local_world_size: int) -> np.ndarray:
    """Samples per rank: ``G // D``, plus one for ``G % D`` ranks spread round-robin over nodes."""
    q, extra = divmod(global_batch_size, world_size)
    sizes = np.full(world_size, q, dtype=np.int64)
    ranks = np.arange(world_size)
    # (local index, node) order: the extra samples land on different nodes first.
    spread = np.lexsort((ranks // local_world_size, ranks % local_world_size))
    sizes[spread[:extra]] += 1
    return sizes


@dataclass(frozen=True)
class Assignment:
    """The split of every global batch among ``world_size`` ranks (``local_world_size`` a node).

    Immutable and picklable; ``split`` caches its per-phase patterns in a private dict that is
    only ever replaced whole, so it is safe to share between threads.
    """

    global_batch_size: int
    lanes: int
    world_size: int = 1
    local_world_size: int = 1
    lanes_per_chunk: int | None = None
    _patterns: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_int(self.global_batch_size, "global_batch_size", minimum=1)
        check_int(self.lanes, "lanes", minimum=1)
        check_int(self.world_size, "world_size", minimum=1)
        check_int(self.local_world_size, "local_world_size", minimum=1)
        if self.lanes_per_chunk is not None:
            check_int(self.lanes_per_chunk, "lanes_per_chunk", minimum=1)

    # -- derived layout -------------------------------------------------------------------
    @property
    def num_nodes(self) -> int:
        return -(-self.world_size // self.local_world_size)

    @property
    def chunk(self) -> int:
        """Lanes per chunk, ``u``: ``lanes_per_chunk`` or ``ceil(L / 256)``."""
        if self.lanes_per_chunk is not None:
            return min(self.lanes_per_chunk, self.lanes)
        return -(-self.lanes // DEFAULT_CHUNKS)

    def rank_sizes(self) -> np.ndarray:
        return rank_sizes(self.global_batch_size, self.world_size, self.local_world_size)

    def node_sizes(self) -> np.ndarray:
        """Samples per node per step (a node is ``local_world_size`` consecutive ranks)."""
        nodes = np.arange(self.world_size) // self.local_world_size
        return np.bincount(nodes, weights=self.rank_sizes(), minlength=self.num_nodes).astype(np.int64)

    def node_order(self) -> np.ndarray:
        """Nodes in line order: over- and under-quota owners interleaved (drift below one node's
        excess), so each node's stretch of the line stays on its own lanes."""
        return _node_order(self.lanes, self.chunk, self.num_nodes, self.global_batch_size,
                           tuple(self.node_sizes().tolist()))

    def lane_line(self) -> tuple[np.ndarray, np.ndarray]:
        """(line index of each lane, owner node of each lane): lanes laid out by owner in
        :meth:`node_order`, then by chunk and lane."""
        return _lane_line(self.lanes, self.chunk, tuple(self.node_order().tolist()))

    # -- the split ------------------------------------------------------------------------
    def rank_of(self, positions: np.ndarray) -> np.ndarray:
        """The rank that reads each of a step's ``G`` epoch positions (int64 array)."""
        pos = np.asarray(positions, dtype=np.int64)
        if pos.shape != (self.global_batch_size,):
            raise ConfigError(f"a step has {self.global_batch_size} positions, got shape {pos.shape}")
        line, _ = self.lane_line()
        lane = pos % self.lanes
        sort = np.lexsort((pos, line[lane]))  # along the line; ties (same lane) by position
        nodes = self.node_order()
        node = np.repeat(nodes, self.node_sizes()[nodes])  # each node's stretch of the line
        # Inside a node: line order (stable), cut into its ranks' sizes in rank order.
        by_node = np.argsort(node, kind="stable")
        rank_sorted = np.repeat(np.arange(self.world_size), self.rank_sizes())
        out = np.empty(pos.size, dtype=np.int64)
        out[sort[by_node]] = rank_sorted
        return out

    def split(self, positions: np.ndarray, rank: int) -> np.ndarray:
        """Rank ``rank``'s positions among a step's ``G`` epoch positions, in the step's order
        (ascending, except the wrapped pad step of a ``drop_last=False`` epoch).

        Steps whose positions are ``p0 .. p0+G-1`` share one pattern per lane phase
        ``p0 mod L`` (cached); wrapped pad steps are computed as they come.
        """
        rank = check_int(rank, "rank", minimum=0)
        if rank >= self.world_size:
            raise ConfigError(f"rank must be < world_size={self.world_size}, got {rank}")
        pos = np.asarray(positions, dtype=np.int64)
        g = self.global_batch_size
        contiguous = pos.size == g and g > 0 and pos[-1] - pos[0] == g - 1 and (
            g == 1 or bool((np.diff(pos) == 1).all()))
        if not contiguous:  # a pad step wraps: keep the step's own order
            return pos[self.rank_of(pos) == rank]
        order, bounds = self._pattern(int(pos[0] % self.lanes))
        return pos[0] + order[bounds[rank]:bounds[rank + 1]]

    def split_contiguous(self, first: np.ndarray, rank: int) -> np.ndarray:
        """``split(first[i] + arange(G), rank)`` for every step start ``first[i]`` (int64
        array), as one ``(len(first), rank_sizes()[rank])`` array: a few vectorized operations
        per lane phase instead of a ``split`` call per step."""
        rank = check_int(rank, "rank", minimum=0)
        if rank >= self.world_size:
            raise ConfigError(f"rank must be < world_size={self.world_size}, got {rank}")
        first = np.asarray(first, dtype=np.int64).reshape(-1)
        size = int(self.rank_sizes()[rank])
        out = np.empty((first.size, size), dtype=np.int64)
        phases = first % self.lanes
        for phase in np.unique(phases).tolist():
            order, bounds = self._pattern(phase)
            mine = order[bounds[rank]:bounds[rank + 1]]
            sel = phases == phase
            out[sel] = first[sel, None] + mine  # a rank's share has the same size every step
        return out

    def _pattern(self, phase: int) -> tuple[np.ndarray, np.ndarray]:
        """(step offsets grouped by rank, rank bounds) of steps of lane phase ``phase``; cached."""
        pattern = self._patterns.get(phase)
        if pattern is None:
            g = self.global_batch_size
            ranks = self.rank_of(np.arange(phase, phase + g, dtype=np.int64))
            order = np.argsort(ranks, kind="stable")  # offsets grouped by rank, ascending
            bounds = np.concatenate([[0], np.cumsum(np.bincount(ranks, minlength=self.world_size))])
            pattern = (order, bounds)
            cache = dict(self._patterns) if len(self._patterns) < 64 else {}
            cache[phase] = pattern
            object.__setattr__(self, "_patterns", cache)
        return pattern

    def period(self) -> int:
        """Steps after which the lane phase ``p0 mod L`` repeats: ``L / gcd(G, L)``."""
        return self.lanes // gcd(self.global_batch_size, self.lanes)

    def phases(self, limit: int = 64) -> list[int]:
        """Lane phases ``p0 mod L`` of the steps (all of them when there are at most ``limit``,
        else ``limit`` evenly spaced ones): one when ``L`` divides ``G``."""
        period = self.period()
        step_count = min(period, limit)
        return sorted({(k * (period // step_count) * self.global_batch_size) % self.lanes
                       for k in range(step_count)})

    def lanes_read(self, rank: int) -> int:
        """Distinct lanes rank ``rank`` reads over the steps of :meth:`phases`."""
        seen = set()
        for phase in self.phases():
            pos = self.split(np.arange(phase, phase + self.global_batch_size, dtype=np.int64), rank)
            seen.update((pos % self.lanes).tolist())
        return len(seen)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_patterns"] = {}
        return state

    def __setstate__(self, state: dict) -> None:
        for key, value in state.items():
            object.__setattr__(self, key, value)


@lru_cache(maxsize=16)
def _node_order(lanes: int, chunk: int, num_nodes: int, g: int, quotas: tuple) -> np.ndarray:
    owners = chunk_owners(-(-lanes // chunk), num_nodes)
    lanes_owned = np.array([sum(min(chunk, lanes - c * chunk) for c in node) for node in owners])
    excess = lanes_owned * (g / lanes) - np.asarray(quotas, dtype=np.float64)  # per step
    over = [i for i in range(num_nodes) if excess[i] >= 0]
    under = [i for i in range(num_nodes) if excess[i] < 0]
    order, drift, a, b = [], 0.0, 0, 0
    while a < len(over) or b < len(under):
        # An under-quota node comes next only when the excess carried so far covers all of its
        # deficit: it then reads one neighbour's tail, not pieces from both sides.
        if b < len(under) and (a >= len(over) or drift + excess[under[b]] >= -1e-9):
            node, b = under[b], b + 1
        else:
            node, a = over[a], a + 1
        order.append(node)
        drift += excess[node]
    out = np.array(order, dtype=np.int64)
    out.flags.writeable = False
    return out


@lru_cache(maxsize=16)
def _lane_line(lanes: int, chunk: int, node_order: tuple) -> tuple[np.ndarray, np.ndarray]:
    num_chunks = -(-lanes // chunk)
    owners = chunk_owners(num_chunks, len(node_order))
    chunk_seq = np.array([c for node in node_order for c in owners[node]], dtype=np.int64)
    chunk_owner = np.empty(num_chunks, dtype=np.int64)
    for node, chunks in enumerate(owners):
        chunk_owner[list(chunks)] = node
    lane_seq = (chunk_seq[:, None] * chunk + np.arange(chunk)[None, :]).ravel()
    lane_seq = lane_seq[lane_seq < lanes]
    line = np.empty(lanes, dtype=np.int64)
    line[lane_seq] = np.arange(lanes)
    owner = chunk_owner[np.arange(lanes) // chunk]
    line.flags.writeable = owner.flags.writeable = False
    return line, owner
