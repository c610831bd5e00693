"""Format benchmark: conversion MB/s, ds[i] latency vs a raw np.memmap, index load time.

    python benchmarks/bench_format.py                      # small defaults, < 60 s
    python benchmarks/bench_format.py --samples 100000 --reads 100000 --index-shards 100000

Token data: 2048 uint16 tokens per sample (4 KiB), Zipf-like so zstd finds what real token
streams offer. Every latency is compared with a baseline measured in the same run on the same
machine; the targets from issue 2 are printed next to the figures, never asserted.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import tracemalloc

import numpy as np

from streamshard import ShardWriter, open_dataset
from streamshard.index import INDEX_FILE, DatasetIndex, ShardInfo
from streamshard.schema import Schema


def make_tokens(samples: int, seq: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # Zipf(1.2) ranks folded into a 50k vocabulary: a few hundred tokens cover most positions,
    # like BPE token streams; zstd reaches ~1.3-1.6x on it (real text tokens: ~1.3-1.5x).
    return ((rng.zipf(1.2, size=samples * seq) - 1) % 50000).astype(np.uint16).reshape(samples, seq)


def convert(dest: str, tokens: np.ndarray, *, compression, args) -> tuple[float, float, object]:
    """-> (wall seconds, CPU seconds of this process, summary). CPU time is what 'per core'
    means on a shared machine: wall time there measures the neighbours as well."""
    c0 = time.process_time()
    t0 = time.perf_counter()
    with ShardWriter(dest, columns={"tokens": f"uint16[{tokens.shape[1]}]"}, overwrite=True,
                     shard_size=args.shard_size, block_size=args.block_size,
                     compression=compression, compression_level=args.level) as w:
        for row in tokens:
            w.write({"tokens": row})
    return time.perf_counter() - t0, time.process_time() - c0, w.summary


def latencies(fn, idx: np.ndarray) -> np.ndarray:
    """Wall ns per call; ``.cpu_mean_ns`` holds the loop's CPU time per call (immune to
    preemption by other processes, includes the ~0.1 us timer overhead like the wall figures)."""
    out = np.empty(len(idx), dtype=np.int64)
    clock = time.perf_counter_ns
    c0 = time.process_time_ns()
    for j, i in enumerate(idx.tolist()):
        t = clock()
        fn(i)
        out[j] = clock() - t
    cpu = (time.process_time_ns() - c0) / len(idx)
    out = out.view(Latencies)
    out.cpu_mean_ns = cpu
    return out


class Latencies(np.ndarray):
    cpu_mean_ns: float = 0.0


def describe(name: str, rounds: list[np.ndarray], base: list[np.ndarray] | None = None) -> str:
    """Best round's mean (the machine is shared: a round hit by preemption is noise, not cost),
    median over all rounds, best round's p99; ratio of best-round means vs the memmap baseline."""
    best = min(rounds, key=lambda r: float(np.mean(r)))
    cpu = min(r.cpu_mean_ns for r in rounds)
    s = (f"  {name:<32} mean {np.mean(best) / 1e3:7.2f} us  cpu {cpu / 1e3:7.2f} us  median "
         f"{np.median(np.concatenate(rounds)) / 1e3:7.2f} us  p99 {np.percentile(best, 99) / 1e3:7.2f} us")
    if base is not None:
        b = min(base, key=lambda r: float(np.mean(r)))
        bcpu = min(r.cpu_mean_ns for r in base)
        s += f"  {np.mean(best) / np.mean(b):5.2f}x memmap (cpu {cpu / bcpu:5.2f}x)"
    return s


def bench_index(num_shards: int, workdir: str) -> None:
    schema = Schema({"tokens": "uint16[2048]"})
    shards = [ShardInfo(i, f"part-{i // 1000:05d}/shard-{i % 1000:06d}.sss", 16000 + i % 7,
                        64_000_000 - i, 65_000_000 - i, f"{i * 2654435761 % 2**64:016x}")
              for i in range(num_shards)]
    index = DatasetIndex.build(schema, shards, compression="zstd", compression_level=3,
                               block_size=131072, shard_size=64_000_000)
    d = os.path.join(workdir, "bigindex")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, INDEX_FILE), "wb") as f:
        f.write(index.to_bytes())
    size = os.path.getsize(os.path.join(d, INDEX_FILE))
    times, cpus = [], []
    for _ in range(3):
        c0, t0 = time.process_time(), time.perf_counter()
        ds = open_dataset(d)
        times.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    assert len(ds) == index.num_samples and ds.fingerprint == index.fingerprint
    tracemalloc.start()
    open_dataset(d)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(f"index load, {num_shards:,} shards ({size / 1e6:.1f} MB index.json): "
          f"open_dataset best {min(times) * 1e3:.0f} ms (cpu {min(cpus) * 1e3:.0f} ms), median "
          f"{sorted(times)[1] * 1e3:.0f} ms "
          f"(fingerprint checked); peak Python memory {peak / 1e6:.0f} MB "
          f"[target: well under 1 s]")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--samples", type=int, default=16384, help="samples of 2048 tokens (4 KiB)")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--reads", type=int, default=10000, help="random ds[i] calls per variant")
    p.add_argument("--block-size", default="64KiB")
    p.add_argument("--shard-size", default="64MB")
    p.add_argument("--level", type=int, default=3, help="zstd level")
    p.add_argument("--rounds", type=int, default=3, help="interleaved latency rounds")
    p.add_argument("--index-shards", type=int, default=100_000)
    p.add_argument("--dir", default=None, help="work directory (default: a temp dir, removed)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    workdir = args.dir or tempfile.mkdtemp(prefix="bench-format-")
    try:
        tokens = make_tokens(args.samples, args.seq, args.seed)
        raw_mb = tokens.nbytes / 1e6
        print(f"data: {args.samples:,} samples x {args.seq} uint16 tokens = {raw_mb:.1f} MB; "
              f"block_size {args.block_size}, shard_size {args.shard_size}, zstd level {args.level}")

        # Best of --rounds conversions (same bytes each time: output is deterministic).
        runs = [convert(os.path.join(workdir, "zstd"), tokens, compression="zstd", args=args)
                for _ in range(args.rounds)]
        secs, cpu, summ = min(runs, key=lambda r: r[0])
        print(f"convert zstd:  {raw_mb / min(r[1] for r in runs):7.1f} MB/s of raw input per CPU "
              f"second (wall: {raw_mb / secs:.1f} MB/s), best of {args.rounds}, 1 process, "
              f"{summ.shards} shards, ratio {summ.raw_bytes / summ.stored_bytes:.2f}x "
              f"[target >= 150 MB/s per core]")
        runs = [convert(os.path.join(workdir, "raw"), tokens, compression=None, args=args)
                for _ in range(args.rounds)]
        secs_u, cpu_u, summ_u = min(runs, key=lambda r: r[0])
        print(f"convert none:  {raw_mb / min(r[1] for r in runs):7.1f} MB/s of raw input per CPU "
              f"second (wall: {raw_mb / secs_u:.1f} MB/s), {summ_u.shards} shards")

        flat = os.path.join(workdir, "flat.bin")
        tokens.tofile(flat)
        mm = np.memmap(flat, dtype=np.uint16, mode="r")
        seq = args.seq
        ds_raw = open_dataset(os.path.join(workdir, "raw"))
        # Block cache off: every random read decompresses its block, the cost the target is
        # about. The default 64 MiB cache would hold this whole 67 MB set and measure hits.
        ds_z = open_dataset(os.path.join(workdir, "zstd"), block_cache=0)
        ds_zc = open_dataset(os.path.join(workdir, "zstd"))
        rng = np.random.default_rng(args.seed + 1)
        idx = rng.integers(0, args.samples, size=args.reads)

        for i in range(0, args.samples, 97):  # correctness spot check; also warms the readers
            assert np.array_equal(ds_raw[i]["tokens"], tokens[i])
            assert np.array_equal(ds_z[i]["tokens"], tokens[i])
        variants = {
            "np.memmap np.array(mm[a:b])": lambda i: np.array(mm[i * seq:(i + 1) * seq]),
            "ds[i] uncompressed (mmap)": ds_raw.__getitem__,
            "ds.read(*locate(i)) uncompressed": lambda i: ds_raw.read(*ds_raw.locate(i)),
            "ds[i] zstd": ds_z.__getitem__,
            "ds[i] zstd, block cache hits": ds_zc.__getitem__,
        }
        for f in variants.values():  # warm the page cache and the shard readers
            latencies(f, idx[: max(1, len(idx) // 4)])
        results: dict[str, list[np.ndarray]] = {k: [] for k in variants}
        for _ in range(args.rounds):  # interleaved rounds: background load hits all variants
            for name, f in variants.items():
                results[name].append(latencies(f, idx))
        base = results["np.memmap np.array(mm[a:b])"]
        print(f"random ds[i], {args.reads:,} reads x {args.rounds} rounds, warm page cache:")
        for name, rounds in results.items():
            line = describe(name, rounds, None if rounds is base else base)
            if name == "ds[i] uncompressed (mmap)":
                line += "   [target <= 1.5x (issue 12)]"
            elif name == "ds[i] zstd":
                line += "   [target < 100 us]"
            print(line)
        t0 = time.perf_counter()
        n = sum(1 for _ in ds_z)
        it = time.perf_counter() - t0
        print(f"  sequential iter zstd: {n / it:,.0f} samples/s ({tokens.nbytes / it / 1e6:.0f} MB/s)")

        bench_index(args.index_shards, workdir)
    finally:
        if args.dir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
