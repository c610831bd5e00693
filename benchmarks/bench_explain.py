"""``explain`` on a 10^9-sample index (issue 16): time to answer "which samples are in step N"
from a loader state alone, for steps anywhere in the run. Only index.json exists (61,036 shards x
16,384 samples, as in bench_startup.py): explain must never touch a shard (``--no-keys``).

    python benchmarks/bench_explain.py [--shards 61036] [--per-shard 16384] [--repeats 5]

Measures, in one run:
- baseline: a subprocess that imports streamshard's CLI and exits (interpreter + imports);
- ``streamshard explain ROOT --state S --steps N --no-keys --json`` end to end as a subprocess, for
  steps in epochs 0, 3 and 40 (the state holds skips, reseeds and 64 quarantined ids, one of them
  in the step explained, so the fill rule runs);
- in-process: opening the index + rebuilding the sequence from the state, then ``samples_at`` alone.
Reports median and spread (min..max) of the repeats, the machine load, and the CPU time
(user + sys) of each subprocess: on a shared box the wall time is mostly waiting for a core, the
CPU time is what an idle machine would take. Target: < 1 s per answer.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
from bench_startup import write_index  # noqa: E402

G = 1024


def make_state(root: str, steps: list[int]) -> dict:
    from streamshard import StreamingDataLoader, StreamingDataset, World

    ds = StreamingDataset(root, global_batch_size=G, world=World(0, 1), seed=1)
    loader = StreamingDataLoader(ds)
    loader.skip(1000, 1200)
    loader.reseed_from(5000, 3)
    seq = loader._sequence()
    victims = [(0, int(seq.global_batch(s)[1][7]), 0) for s in steps]
    loader.quarantine(victims + [(0, 17 * k + 5, 0) for k in range(64 - len(victims))])
    state = loader.state_dict()
    state["step"] = steps[0]
    state["epoch"] = steps[0] // ds.steps_per_epoch
    return state


def _child_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def stats(xs: list[float]) -> str:
    return f"median {statistics.median(xs) * 1000:.0f} ms (min {min(xs) * 1000:.0f}, max {max(xs) * 1000:.0f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=61_036)
    parser.add_argument("--per-shard", type=int, default=16_384)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    from streamshard.explain import samples_at, sequence_from_state
    from streamshard.reader import open_dataset

    with tempfile.TemporaryDirectory() as root:
        write_index(root, args.shards, args.per_shard)
        per_epoch = args.shards * args.per_shard // G
        steps = [12_345, 3 * per_epoch + 777, 40 * per_epoch + per_epoch - 1]
        state = make_state(root, steps)
        state_path = os.path.join(root, "state.json")
        with open(state_path, "w") as f:
            json.dump(state, f)
        load = os.getloadavg()
        base = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            subprocess.run([sys.executable, "-c", "import streamshard.cli"], check=True)
            base.append(time.perf_counter() - t)
        cli = {s: [] for s in steps}
        cpu = {s: [] for s in steps}
        for _ in range(args.repeats):
            for s in steps:
                c = _child_cpu()
                t = time.perf_counter()
                out = subprocess.run([sys.executable, "-m", "streamshard.cli", "explain", root, "--state",
                                      state_path, "--steps", str(s), "--no-keys", "--json"],
                                     check=True, capture_output=True, text=True).stdout
                cli[s].append(time.perf_counter() - t)
                cpu[s].append(_child_cpu() - c)
                row = json.loads(out)
                assert len(row["samples"]) == G and row["samples"][7]["filled"], s
        opened, answer = [], []
        for _ in range(args.repeats):
            t = time.perf_counter()
            seq, _ = sequence_from_state(state, [open_dataset(root)])
            opened.append(time.perf_counter() - t)
            ds = [open_dataset(root)]
            for s in steps:
                t = time.perf_counter()
                samples_at(seq, ds, s, world_size=8, keys=False)
                answer.append(time.perf_counter() - t)
        print(f"index: {args.shards:,} shards, {args.shards * args.per_shard:,} samples, G={G}, "
              f"{per_epoch:,} steps/epoch; ledgers: 1 skip, 1 reseed, 64 quarantined")
        print(f"load average at start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} ({os.cpu_count()} cpus)")
        print(f"baseline (python + import streamshard.cli): {stats(base)}")
        for s in steps:
            print(f"explain --steps {s:>11,} (epoch {s // per_epoch:>2}) end to end: wall {stats(cli[s])}, "
                  f"cpu {stats(cpu[s])}; target < 1 s; wall ratio to baseline "
                  f"{statistics.median(cli[s]) / statistics.median(base):.2f}")
        print(f"in process: open index + sequence from state {stats(opened)}; samples_at one step "
              f"(1024 samples, ranks at world 8, fill) {stats(answer)}")


if __name__ == "__main__":
    main()
