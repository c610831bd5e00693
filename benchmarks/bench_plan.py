"""`streamshard plan` at scale and the locality it reports (issue 15).

Run: ``python benchmarks/bench_plan.py`` (about 10-30 s on one core). Prints, without asserting
(timings depend on the machine):

- the planner's wall time for 10,000 ranks (8 per node, G = 40,000) over a 10^9-sample index
  (61,036 shards x 16,384 samples): cold (first call in the process, ownership tables built) and
  warm, median and spread of ``--repeat`` runs, and the load average;
- bytes per node / fair share at 8..1,024 ranks in steps of 8 (and 1,000) on 4,096 shards whose
  sample counts vary +-12% (seeded), G = 4,096, default lanes: max and the table rows of
  docs/REMOTE.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from streamshard.capacity import plan_capacity  # noqa: E402
from streamshard.sampler import assign  # noqa: E402


def big_plan() -> float:
    start = time.perf_counter()
    plan_capacity([16_384] * 61_036, [64 << 20] * 61_036, world_size=10_000, local_world_size=8,
                  global_batch_size=40_000)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    cold = []
    for _ in range(args.repeat):
        assign.chunk_owners.cache_clear()
        assign._node_order.cache_clear()
        assign._lane_line.cache_clear()
        cold.append(big_plan())
    warm = [big_plan() for _ in range(args.repeat)]
    load = os.getloadavg()[0]
    print(f"plan, 10,000 ranks, 10^9 samples: cold median {statistics.median(cold):.2f} s "
          f"(min {min(cold):.2f}, max {max(cold):.2f}), warm median {statistics.median(warm):.2f} s "
          f"(min {min(warm):.2f}, max {max(warm):.2f}); load average {load:.1f}")
    sizes = np.random.default_rng(1).integers(14, 19, 4096)
    worst = (0.0, 0)
    rows = {}
    for world in list(range(8, 1025, 8)) + [1000, 2048]:
        p = plan_capacity(sizes, sizes * 4096, world_size=world, local_world_size=8,
                          global_batch_size=4096, seed=7)
        if world <= 1024:
            worst = max(worst, (p.bytes_per_node_over_share_max, world))
        rows[world] = p
    print(f"bytes per node / share, 8..1,024 ranks (step 8, and 1,000): max {worst[0]:.3f} at "
          f"{worst[1]} ranks (target <= 1.2)")
    print("| ranks (nodes) | lanes | max | mean | cache working set per node |")
    for world in (32, 256, 1000, 1016, 1024, 2048):
        p = rows[world]
        print(f"| {world:,} ({p.nodes}) | {p.lanes:,} | {p.bytes_per_node_over_share_max:.3f} | "
              f"{p.bytes_per_node_over_share_mean:.3f} | {p.cache_working_set_shards_max} shards |")


if __name__ == "__main__":
    main()
