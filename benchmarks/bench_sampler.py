"""Sampler throughput and start-up cost on a 10^9-sample index.

Run: ``python benchmarks/bench_sampler.py`` (about 10-25 s on one core). Prints figures next to the
targets of issue 3 and asserts nothing: timings depend on the machine.

- indices/s for the whole position -> sample mapping, per global batch of 1024 (a loop of
  ``SampleSequence.global_batch``) and for one 1M-position array, for an ``EpochOrder`` of
  61,036 shards x 16,384 samples (1.0e9) and a 3-stream ``MixtureOrder`` of such streams;
- wall time and peak RSS (``resource.getrusage`` maxrss, and its growth) to build the order and
  the sequence for 10^9 samples and get the first batch.
"""

from __future__ import annotations

import os
import resource
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from streamshard.sampler import EpochOrder, MixtureOrder, SampleSequence  # noqa: E402

SHARDS, PER_SHARD = 61_036, 16_384  # 1,000,013,824 samples: 64 MiB shards of 4 KiB samples
BATCH = 1024
TARGET_RATE = 1e6            # indices/s per core
TARGET_STARTUP_S, TARGET_RSS_MB = 2.0, 500.0


def maxrss_mb() -> float:
    # ru_maxrss is KiB on Linux, bytes on macOS
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 1e6


def startup() -> tuple[SampleSequence, float]:
    rss0 = maxrss_mb()
    t0 = time.perf_counter()
    order = EpochOrder(np.full(SHARDS, PER_SHARD, dtype=np.int64), seed=17)
    seq = SampleSequence(order, global_batch_size=BATCH)
    first = seq.batch(0, 0, 8)[1]
    seconds = time.perf_counter() - t0
    rss1 = maxrss_mb()
    ok = seconds < TARGET_STARTUP_S and rss1 < TARGET_RSS_MB
    print(f"start-up, N={order.size:,} in {SHARDS:,} shards: {seconds * 1e3:.1f} ms to the first "
          f"batch ({len(first)} ids), peak RSS {rss1:.0f} MB (+{rss1 - rss0:.1f} MB for the "
          f"sampler)  [target < {TARGET_STARTUP_S:.0f} s, < {TARGET_RSS_MB:.0f} MB: "
          f"{'met' if ok else 'MISSED'}]")
    return seq, seconds


def rate_line(name: str, count: int, seconds: float) -> None:
    rate = count / seconds
    verdict = "met" if rate >= TARGET_RATE else "MISSED"
    print(f"  {name:<48} {rate / 1e6:6.2f} M indices/s  ({count:,} in {seconds:.3f} s)  "
          f"[target >= 1.0 M/s/core: {verdict}, x{rate / TARGET_RATE:.1f}]")


def best_of(repeats: int, run) -> float:
    """Fastest of `repeats` timings: the 2 cores are shared, slower runs measure the neighbours."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return min(times)


def bench(name: str, seq: SampleSequence, array_call) -> None:
    print(f"{name}:")
    start = 12_345 * seq.steps_per_epoch // 100_000  # mid-epoch
    seq.global_batch(start)  # warm the per-epoch tables
    steps = 1000
    seconds = best_of(3, lambda: [seq.global_batch(s) for s in range(start, start + steps)])
    rate_line(f"global batches of {BATCH} ({steps:,} steps, best of 3)", steps * BATCH, seconds)
    positions = np.arange(10**6, dtype=np.int64) + 123_456_789
    array_call(positions[:1000])
    seconds = best_of(3, lambda: array_call(positions))
    rate_line("one array of 1M positions (best of 3)", positions.size, seconds)


def main() -> None:
    print(f"python {sys.version.split()[0]}, numpy {np.__version__}, single thread, "
          f"{os.cpu_count()} CPUs visible")
    seq, _ = startup()
    order = seq.order
    bench("EpochOrder (64 lanes, window 65,536)", seq, lambda p: order(0, p))
    streams = [EpochOrder(np.full(SHARDS, PER_SHARD, dtype=np.int64), seed=s) for s in (1, 2, 3)]
    mix = MixtureOrder(streams, [0.5, 0.3, 0.2], seed=4)
    mseq = SampleSequence(mix, global_batch_size=BATCH)
    bench(f"MixtureOrder (3 streams, weights 0.5/0.3/0.2, block {mix.block})", mseq, mix)
    print(f"peak RSS at exit: {maxrss_mb():.0f} MB")


if __name__ == "__main__":
    main()
