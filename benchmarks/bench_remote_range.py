"""Whole-shard downloads vs per-block range reads from S3 (issue 4: choose by measurement).

    python benchmarks/bench_remote_range.py [--shards 8] [--samples-per-shard 1024]

Starts moto's S3 server on 127.0.0.1, uploads a zstd dataset (4 KiB token samples, 64 KiB
blocks) and measures, through s3fs:
- whole-shard GET: MB/s, and the implied remote cost per sample of an epoch (every sample of a
  downloaded shard is read once per epoch);
- one block by range GET (what a shuffled read needs per sample when its block is not cached):
  latency per request with 1 and 4 threads, and the implied cost per sample.
The cache's default (whole shards) follows from the ratio printed at the end.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from streamshard import ShardWriter, open_dataset  # noqa: E402
from streamshard.shardfile import TABLE_ENTRY, TRAILER, parse_table, parse_trailer  # noqa: E402
from tests.remote_servers import S3Server  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--samples-per-shard", type=int, default=1024)
    parser.add_argument("--ranges", type=int, default=300)
    args = parser.parse_args()
    tmp = tempfile.mkdtemp(prefix="bench-range-")
    server = S3Server().start()
    try:
        local = os.path.join(tmp, "ds")
        rng = np.random.default_rng(0)
        n = args.shards * args.samples_per_shard
        with ShardWriter(local, columns={"tokens": "uint16[2048]"}, block_size="64KiB",
                         shard_size=f"{args.samples_per_shard * 4096 // 1000 * 1000}B") as w:
            for _ in range(n):
                w.write({"tokens": (rng.zipf(1.2, 2048) % 50000).astype(np.uint16)})
        ds = open_dataset(local)
        fs = server.fs()
        server.make_bucket("rangebench")
        fs.put(local + "/", "rangebench/ds/", recursive=True)
        shards = ds.index.shards
        stored = sum(s.bytes for s in shards)

        t = time.perf_counter()
        for s in shards:
            fs.cat_file(f"rangebench/ds/{s.file}")
        whole_s = time.perf_counter() - t
        per_sample_whole = whole_s / n

        blocks = []  # (file, start, end) of every block, from the shards' own tables
        for s in shards:
            with open(os.path.join(local, s.file), "rb") as f:
                data = f.read()
            trailer = parse_trailer(data[-TRAILER.size:], len(data), s.file)
            start = trailer.table_offset
            table = parse_table(data[start:start + trailer.num_blocks * TABLE_ENTRY.size],
                                trailer, s.file)
            for off, size in zip(table["offset"].tolist(), table["stored"].tolist()):
                blocks.append((s.file, off, off + size))
        picks = random.Random(0).choices(blocks, k=args.ranges)

        def get(block):
            fs.cat_file(f"rangebench/ds/{block[0]}", start=block[1], end=block[2])

        lat = {}
        for threads in (1, 4):
            t = time.perf_counter()
            with ThreadPoolExecutor(threads) as ex:
                list(ex.map(get, picks))
            lat[threads] = (time.perf_counter() - t) / len(picks)
        samples_per_block = n / len(blocks)
        print(f"dataset: {n:,} samples of 4 KiB in {len(shards)} shards, {stored / 1e6:.1f} MB stored, "
              f"{len(blocks)} blocks ({samples_per_block:.1f} samples/block)")
        print(f"whole-shard GET: {stored / whole_s / 1e6:.0f} MB/s -> {per_sample_whole * 1e6:.1f} us of "
              f"transfer per sample per epoch")
        for threads, seconds in lat.items():
            print(f"block range GET, {threads} thread(s): {seconds * 1e3:.2f} ms per request -> "
                  f"{seconds * 1e6:.0f} us per shuffled sample (uncached block)")
        print(f"shuffled epoch, range mode vs whole shards: {lat[4] / per_sample_whole:.0f}x more remote "
              f"time per sample with 4 threads; range mode only wins when an epoch reads under "
              f"{per_sample_whole / lat[4] * 100:.1f}% of a shard's samples")
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
