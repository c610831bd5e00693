"""Start-up on a 10^9-sample index (issue 3): time and memory from nothing to the first planned
batch of a StreamingDataset over an index of 61,036 shards x 16,384 samples (64 MiB shards of
4 KiB token samples). Only index.json exists: start-up must never touch a shard.

    python benchmarks/bench_startup.py [--shards 61036] [--per-shard 16384]

Runs each measurement in a fresh subprocess so RSS is the loader's own (peak RSS via
resource.getrusage, minus the interpreter + torch baseline measured the same way), --repeat
times (median and range printed with the machine load, os.getloadavg()).
Targets: < 0.5 s (median of 3; issue 12) and < 500 MB RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time


def write_index(root: str, shards: int, per_shard: int) -> int:
    from streamshard.index import INDEX_FILE, DatasetIndex, ShardInfo
    from streamshard.schema import Schema

    infos = [ShardInfo(i, f"shard-{i:06d}.sss", per_shard, 64 * 2**20, 64 * 2**20, f"{i:016x}")
             for i in range(shards)]
    index = DatasetIndex.build(Schema({"tokens": "uint16[2048]"}), infos, compression=None)
    data = index.to_bytes()
    with open(os.path.join(root, INDEX_FILE), "wb") as f:
        f.write(data)
    return len(data)


def child(root: str, mode: str) -> None:
    start = time.perf_counter()
    import torch  # noqa: F401  (the baseline includes torch: every training job has it)

    from streamshard import StreamingDataset, World

    imported = time.perf_counter()
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if mode == "baseline":
        print(json.dumps({"rss_kb": base_rss}))
        return
    ds = StreamingDataset(root, global_batch_size=1024, world=World(3, 8), seed=1)
    key = next(iter(ds.batch_sampler()))  # the first rank batch's sample ids, no shard read
    done = time.perf_counter()
    print(json.dumps({"samples": len(ds.datasets[0]), "shards": ds.datasets[0].num_shards,
                      "first_ids": list(key.sample_ids[:4]), "import_s": imported - start,
                      "startup_s": done - imported,
                      "rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                      "rss_before_kb": base_rss}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=61_036)
    parser.add_argument("--per-shard", type=int, default=16_384)
    parser.add_argument("--repeat", type=int, default=3, help="fresh processes to time")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(*args.child)
    with tempfile.TemporaryDirectory() as root:
        size = write_index(root, args.shards, args.per_shard)
        def measure(mode: str) -> dict:
            out = subprocess.run([sys.executable, __file__, "--child", root, mode], check=True,
                                 capture_output=True, text=True).stdout
            return json.loads(out)

        load = os.getloadavg()[0]
        base = measure("baseline")
        runs = [measure("run") for _ in range(max(1, args.repeat))]
        times = sorted(r["startup_s"] for r in runs)
        run = max(runs, key=lambda r: r["rss_kb"])
        load = max(load, os.getloadavg()[0])
        print(f"index: {args.shards:,} shards, {run['samples']:,} samples, {size / 1e6:.1f} MB of JSON")
        print(f"start-up (open index + sampler + first batch plan): median {times[len(times) // 2]:.3f} s "
              f"(range {times[0]:.3f}-{times[-1]:.3f} s, {len(times)} runs, load {load:.1f} on "
              f"{os.cpu_count()} cores)   target < 0.5 s")
        extra = (run["rss_kb"] - base["rss_kb"]) / 1024
        print(f"peak RSS {run['rss_kb'] / 1024:.0f} MB (python+torch alone {base['rss_kb'] / 1024:.0f} MB; "
              f"streamshard's part {extra:.0f} MB)   target < 500 MB")


if __name__ == "__main__":
    main()
