"""Opening a remote dataset: time of ``open_dataset("s3://...")`` over a 100,000-shard index on a
loopback moto S3 server, with a cold cache (the index is downloaded) and a warm one (the cached
copy is checked against the remote version token), and how often the index is parsed: "after"
is ``Dataset(CachedSource(url))`` as ``open_dataset`` does it (``load_index``, one parse),
"before" the same source seen through its ``read_index`` bytes only, as ``Dataset`` read it
before (parsed by the source to check it, then again by ``Dataset``).

    python benchmarks/bench_remote_open.py [--shards 100000] [--repeat 7]

moto's S3 runs in a separate ``python -m moto.server`` process. Only ``index.json`` is uploaded:
opening never touches a shard. Each repeat opens once with a fresh cache directory (cold) and
once more with the same one (warm), before and after interleaved; printed: the median and
range over ``--repeat`` repeats, the median after/before ratio per repeat, the CPU time of this
process per open (which the load of a shared machine inflates less than wall time), the
``DatasetIndex.from_bytes`` calls per open (counted by a wrapper), one parse timed alone, and
the machine load.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.bench_remote import KEY, SECRET, load, start_moto  # noqa: E402
from benchmarks.bench_startup import write_index  # noqa: E402
from streamshard.index import INDEX_FILE, DatasetIndex  # noqa: E402
from streamshard.reader import Dataset  # noqa: E402
from streamshard.remote import CachedSource  # noqa: E402


class _BytesOnly:
    """A source as ``Dataset`` saw ``CachedSource`` before ``load_index``: it reads the index
    bytes (``CachedSource`` parses them to check them) and ``Dataset`` parses them again."""

    def __init__(self, source: CachedSource):
        self._source = source
        self.url = source.url

    def read_index(self) -> bytes:
        return self._source.read_index()

    def __getattr__(self, name: str):
        if name == "load_index":
            raise AttributeError(name)
        return getattr(self._source, name)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shards", type=int, default=100_000)
    p.add_argument("--repeat", type=int, default=7)
    args = p.parse_args(argv)
    tmp = tempfile.mkdtemp(prefix="bench-open-")
    proc, endpoint = start_moto()
    try:
        import boto3
        import s3fs

        opts = {"key": KEY, "secret": SECRET, "skip_instance_cache": True,
                "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}
        fs = s3fs.S3FileSystem(**opts)
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                     aws_access_key_id=KEY, aws_secret_access_key=SECRET).create_bucket(Bucket="bench")
        size = write_index(tmp, args.shards, 16_384)
        fs.put_file(os.path.join(tmp, INDEX_FILE), f"bench/ds/{INDEX_FILE}")
        data = open(os.path.join(tmp, INDEX_FILE), "rb").read()
        t0 = time.perf_counter()
        DatasetIndex.from_bytes(data, INDEX_FILE)
        parse = time.perf_counter() - t0

        parses = [0]
        original = DatasetIndex.from_bytes.__func__

        def counting(cls, *a, **kw):
            parses[0] += 1
            return original(cls, *a, **kw)

        DatasetIndex.from_bytes = classmethod(counting)
        times: dict[tuple[str, str], list[float]] = {}
        counts: dict[tuple[str, str], int] = {}
        cpu: dict[tuple[str, str], list[float]] = {}  # this process only (moto runs apart)
        for r in range(args.repeat):
            for path in ("before", "after"):  # interleaved: a load change hits both alike
                cache = os.path.join(tmp, f"cache-{path}-{r}")
                for kind in ("cold", "warm"):
                    parses[0] = 0
                    c0, t0 = time.process_time(), time.perf_counter()
                    source = CachedSource("s3://bench/ds", cache_dir=cache, storage_options=opts)
                    ds = Dataset(_BytesOnly(source) if path == "before" else source)
                    times.setdefault((path, kind), []).append(time.perf_counter() - t0)
                    cpu.setdefault((path, kind), []).append(time.process_time() - c0)
                    counts[path, kind] = parses[0]
                    assert ds.num_shards == args.shards
                    ds.close()
        print(f"{args.shards:,}-shard index ({size / 1e6:.1f} MB) on moto; {load()}; "
              f"one parse alone {parse:.3f} s")
        for (path, kind), values in sorted(times.items(), key=lambda kv: kv[0][::-1]):
            print(f"{kind} {path:6}: median {statistics.median(values):.3f} s "
                  f"(min {min(values):.3f}, max {max(values):.3f}, {len(values)} opens), "
                  f"CPU median {statistics.median(cpu[path, kind]):.3f} s; "
                  f"index parsed {counts[path, kind]}x per open")
        for kind in ("cold", "warm"):
            ratios = [a / b for a, b in zip(times["after", kind], times["before", kind])]
            print(f"{kind}: after/before per repeat: median {statistics.median(ratios):.2f} "
                  f"(min {min(ratios):.2f}, max {max(ratios):.2f})")
        print(f"after: {load()}")
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
