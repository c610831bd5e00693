"""Loader benchmark (issue 3): epoch throughput and resume latency against a raw memmap.

    python benchmarks/bench_loader.py [--samples 50000] [--batch 32] [--workers 0 2]

Workload: fixed-length token samples (2,048 uint16 = 4 KiB, Zipf-like), written once as a flat
file (the memmap baseline) and as streamshard datasets (uncompressed and zstd). Every figure is
measured in this run; ratios are streamshard / memmap on the same bytes, same batch size, same
worker count. Pages are warmed before timing (the target is about CPU cost, not the disk).

Baseline ("memmap"): an IterableDataset over np.memmap that serves the same kind of shuffled
global batches (a random permutation, one fancy-index read per batch) through the same
DataLoader, round-robin across workers: the practical limit of a shuffled read in PyTorch.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
import torch.utils.data

from streamshard import ShardWriter, StreamingDataLoader, StreamingDataset, World

SEQ = 2048


def make_tokens(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # Zipf-like token ids folded into the uint16 vocabulary, like real BPE frequencies.
    return (rng.zipf(1.2, size=(n, SEQ)) % 50_000).astype(np.uint16)


class MemmapBatches(torch.utils.data.IterableDataset):
    """Shuffled batches straight from a flat memmap file (the baseline)."""

    def __init__(self, path: str, n: int, batch: int, shuffle: bool, seed: int = 0):
        self.path, self.n, self.batch, self.shuffle, self.seed = path, n, batch, shuffle, seed

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        w, nw = (0, 1) if info is None else (info.id, info.num_workers)
        mm = np.memmap(self.path, dtype=np.uint16, mode="r", shape=(self.n, SEQ))
        order = np.random.default_rng(self.seed).permutation(self.n) if self.shuffle else np.arange(self.n)
        steps = self.n // self.batch
        for step in range(w, steps, nw):
            idx = order[step * self.batch : (step + 1) * self.batch]
            yield {"tokens": torch.from_numpy(mm[idx])}

    def __len__(self):
        return self.n // self.batch


def warm(path: str) -> None:
    for root, _, files in os.walk(path) if os.path.isdir(path) else [(os.path.dirname(path), None, [os.path.basename(path)])]:
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                while f.read(1 << 24):
                    pass


def epoch_rate(loader) -> tuple[float, int]:
    count = 0
    start = time.perf_counter()
    for batch in loader:
        count += batch["tokens"].shape[0]
    seconds = time.perf_counter() - start
    return count / seconds, count


def stream_loader(path: str, batch: int, workers: int, shuffle: bool) -> StreamingDataLoader:
    ds = StreamingDataset(path, global_batch_size=batch, shuffle=shuffle, seed=1, world=World())
    kw = {"num_workers": workers}
    if workers:
        kw.update(persistent_workers=True, multiprocessing_context="fork", prefetch_factor=4)
    return StreamingDataLoader(ds, **kw)


def memmap_loader(path: str, n: int, batch: int, workers: int, shuffle: bool):
    kw = {"num_workers": workers}
    if workers:
        kw.update(persistent_workers=True, multiprocessing_context="fork", prefetch_factor=4)
    return torch.utils.data.DataLoader(MemmapBatches(path, n, batch, shuffle), batch_size=None, **kw)


def best_of(make, repeats: int) -> float:
    loader = make()
    rates = []
    for _ in range(repeats):
        rate, _ = epoch_rate(loader)
        rates.append(rate)
    return max(rates)


def resume_latency(path: str, batch: int, workers: int, fraction: float, repeats: int) -> float:
    """Seconds from load_state_dict on a fresh loader to the first batch in hand (median)."""
    probe = stream_loader(path, batch, 0, True)
    target = int(probe.steps_per_epoch * fraction)
    state = dict(probe.state_dict(), step=target, epoch=0)
    times = []
    for _ in range(repeats):
        loader = stream_loader(path, batch, workers, True)
        start = time.perf_counter()
        loader.load_state_dict(state)
        next(iter(loader))
        times.append(time.perf_counter() - start)
        assert loader.last_step == target
        del loader
    return statistics.median(times)


def check_cost(path: str, batch: int, repeats: int) -> dict:
    """Cost of the first-touch xxh64 check of uncompressed blocks (docs/FORMAT.md "What is
    checked when"): shuffled epochs in this process (workers=0), each from a fresh loader, with
    the check off, and on with the process's record of checked blocks cleared before each epoch
    (every block is hashed once per epoch: the worst case, a process's first epoch)."""
    from streamshard import blockcheck

    def epoch(verify: bool) -> float:
        blockcheck._checked.clear()
        ds = StreamingDataset(path, global_batch_size=batch, shuffle=True, seed=1, world=World(),
                              verify_blocks=verify)
        return epoch_rate(StreamingDataLoader(ds))[0]

    off, on = [], []
    for _ in range(repeats):  # interleaved, so load changes hit both alike
        off.append(epoch(False))
        on.append(epoch(True))
    return {"off": off, "on": on, "ratio": statistics.median(on) / statistics.median(off)}


def pread_cost(path: str, repeats: int) -> dict:
    """Random ``ds[i]`` on an uncompressed dataset: mmap slices (what the reader does) against
    ``os.pread`` of the same sample bytes (what would survive a shard truncated while mapped)."""
    from bisect import bisect_right

    from streamshard import open_dataset

    ds = open_dataset(path)
    n = len(ds)
    order = [int(i) for i in np.random.default_rng(0).permutation(n)]
    decode, offs = ds.index.schema.decode, ds._offsets
    [ds[i] for i in range(n)]  # open every shard, check every block: measure reads only

    def mmap_pass() -> float:
        t = time.perf_counter()
        for i in order:
            ds[i]
        return n / (time.perf_counter() - t)

    def pread_pass() -> float:
        t = time.perf_counter()
        for i in order:
            s = bisect_right(offs, i) - 1
            r = ds._readers.get(s) or ds._open(s)
            _, start, length = r.span(i - offs[s])
            decode(os.pread(r._fd, length, start), 0, length)
        return n / (time.perf_counter() - t)

    mm, pr = [], []
    for _ in range(repeats):
        mm.append(mmap_pass())
        pr.append(pread_pass())
    return {"mmap": mm, "pread": pr, "ratio": statistics.median(pr) / statistics.median(mm)}


def _spread(xs: list[float]) -> str:
    return f"median {statistics.median(xs):,.0f}/s (min {min(xs):,.0f}, max {max(xs):,.0f}, n={len(xs)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=50_000, help="4 KiB samples (default 50,000 = 205 MB)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", default=None, help="also write the figures here")
    parser.add_argument("--check-cost", action="store_true",
                        help="only measure the first-touch block check and mmap vs pread")
    args = parser.parse_args()
    torch.set_num_threads(1)

    tmp = tempfile.mkdtemp(prefix="bench-loader-")
    try:
        tokens = make_tokens(args.samples)
        flat = os.path.join(tmp, "flat.u16")
        tokens.tofile(flat)
        paths = {}
        for name, compression in (("uncompressed", None), ("zstd", "zstd")):
            paths[name] = os.path.join(tmp, name)
            with ShardWriter(paths[name], columns={"tokens": f"uint16[{SEQ}]"}, compression=compression) as w:
                for row in tokens:
                    w.write({"tokens": row})
        del tokens
        for p in [flat, *paths.values()]:
            warm(p)
        if args.check_cost:
            repeats = max(args.repeats, 5)
            cost = check_cost(paths["uncompressed"], args.batch, repeats)
            print(f"{args.samples} samples x 4 KiB, batch {args.batch}, shuffled epoch, workers=0, "
                  f"load {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
            print(f"  first-touch check off: {_spread(cost['off'])}")
            print(f"  first-touch check on (cold): {_spread(cost['on'])}")
            print(f"  on/off = {cost['ratio']:.3f} (target >= 0.90)")
            pr = pread_cost(paths["uncompressed"], repeats)
            print(f"random ds[i], uncompressed: mmap {_spread(pr['mmap'])}")
            print(f"                            pread {_spread(pr['pread'])}")
            print(f"  pread/mmap = {pr['ratio']:.3f}")
            if args.json:
                with open(args.json, "w") as f:
                    json.dump({"check": cost, "pread": pr, "load": os.getloadavg()}, f, indent=1)
            return
        mb_per_sample = SEQ * 2 / 1e6
        results = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                               "python": sys.version.split()[0], "torch": torch.__version__},
                   "samples": args.samples, "batch": args.batch, "throughput": [], "resume": []}
        print(f"{args.samples} samples x 4 KiB, batch {args.batch}, cores {os.cpu_count()}")
        print(f"{'order':<10}{'workers':>8}{'memmap/s':>12}{'uncomp/s':>12}{'ratio':>8}{'zstd/s':>12}{'ratio':>8}{'uncomp MB/s':>13}")
        for shuffle in (True, False):
            for workers in args.workers:
                base = best_of(lambda: memmap_loader(flat, args.samples, args.batch, workers, shuffle), args.repeats)
                row = {"shuffle": shuffle, "workers": workers, "memmap": base}
                for name, path in paths.items():
                    row[name] = best_of(lambda: stream_loader(path, args.batch, workers, shuffle), args.repeats)
                results["throughput"].append(row)
                print(f"{'shuffled' if shuffle else 'sequential':<10}{workers:>8}{base:>12.0f}"
                      f"{row['uncompressed']:>12.0f}{row['uncompressed'] / base:>8.2f}"
                      f"{row['zstd']:>12.0f}{row['zstd'] / base:>8.2f}{row['uncompressed'] * mb_per_sample:>13.1f}")
        print("\nresume: load_state_dict on a fresh loader -> first batch (median of repeats)")
        for workers in args.workers:
            at1 = resume_latency(paths["zstd"], args.batch, workers, 0.01, 3 + 2 * args.repeats)
            at90 = resume_latency(paths["zstd"], args.batch, workers, 0.90, 3 + 2 * args.repeats)
            results["resume"].append({"workers": workers, "at_1pct_s": at1, "at_90pct_s": at90})
            print(f"  workers={workers}: 1% {at1 * 1e3:7.1f} ms   90% {at90 * 1e3:7.1f} ms   ratio 90/1 {at90 / at1:.2f}")
        print("\ntargets: shuffled uncompressed >= 0.80 x memmap; resume < 100 ms; 90%/1% < 1.5")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
