"""NumpyBatchIterator (no torch) against StreamingDataLoader (0 workers) on the same data.

    python benchmarks/bench_numpy_loader.py [--samples 20000] [--batch 32] [--repeats 3]

Workload: fixed-length uint16[1024] token samples, written uncompressed and zstd. Each figure is
one shuffled epoch, samples/s, median and spread (min-max) of ``--repeats`` runs measured in this
run, interleaved (numpy, torch, numpy, torch, ...) so that load changes hit both alike. The ratio
is numpy / torch on the same dataset, batch size and seed; both serve identical batches (checked).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time

import numpy as np

from streamshard import NumpyBatchIterator, ShardWriter, StreamingDataLoader, StreamingDataset, World


def write(path: str, n: int, compression: str | None) -> None:
    rng = np.random.default_rng(0)
    with ShardWriter(path, columns={"tokens": "uint16[1024]", "id": "int64"},
                     compression=compression) as w:
        for i in range(n):
            w.write({"tokens": (rng.zipf(1.2, 1024) % 50_000).astype(np.uint16), "id": i})


def epoch(make) -> tuple[float, int, list[int]]:
    loader = make()
    t0 = time.perf_counter()
    samples, first_ids = 0, None
    for batch in loader:
        ids = np.asarray(batch["id"])
        samples += len(ids)
        if first_ids is None:
            first_ids = ids.tolist()
    return time.perf_counter() - t0, samples, first_ids


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--samples", type=int, default=20_000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    root = tempfile.mkdtemp(prefix="bench-numpy-")
    try:
        print(f"{args.samples:,} samples of uint16[1024], batch {args.batch}, {args.repeats} "
              f"repeats, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
        for compression in (None, "zstd"):
            path = os.path.join(root, compression or "raw")
            write(path, args.samples, compression)
            kw = dict(batch_size=args.batch, seed=1, world=World())
            runs = {"numpy": [], "torch": []}
            firsts = {}
            for _ in range(args.repeats):
                for name, make in (("numpy", lambda: NumpyBatchIterator(path, **kw)),
                                   ("torch", lambda: StreamingDataLoader(
                                       StreamingDataset(path, **kw)))):
                    seconds, samples, first = epoch(make)
                    runs[name].append(samples / seconds)
                    firsts[name] = first
            assert firsts["numpy"] == firsts["torch"], "the two loaders served different batches"
            med = {k: statistics.median(v) for k, v in runs.items()}
            for name, rates in runs.items():
                print(f"  {compression or 'uncompressed':>12} {name:>5}: {med[name]:>10,.0f} "
                      f"samples/s (min {min(rates):,.0f}, max {max(rates):,.0f})")
            print(f"  {compression or 'uncompressed':>12} ratio numpy/torch: "
                  f"{med['numpy'] / med['torch']:.2f}")
        print(f"load average after: {os.getloadavg()[0]:.2f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
