"""Remote streaming benchmark: an epoch from a loopback S3 server with a cold cache, a warm cache
and from local files; and bytes fetched per simulated node when D nodes read their share.

    python benchmarks/bench_remote.py                 # 150 MB raw, 4 KiB token samples, < 90 s
    python benchmarks/bench_remote.py --mb 40 --nodes 4,3
    python benchmarks/bench_remote.py --mb 60 --repeat 7 --nodes "" --client s3fs,obstore  # issue 12

moto's S3 runs in a separate ``python -m moto.server`` process on 127.0.0.1 (a server in this
process would compete with the reader for the GIL), behind ``tests/latency_proxy.py`` (another
process) that makes it look like a far object store: ``--latency`` first-byte latency per request
and ``--bandwidth`` bytes/s per connection (defaults 20 ms, 50 MB/s). Epochs run through
``StreamingDataset`` in the sampler's order with the loader's own prefetch hints (``--hint epoch``
instead hands the cache the whole epoch's shard order at once). Each repeat uses a fresh cache
per client (``--client s3fs,obstore``: interleaved within the repeat): cold, then warm from that
cache, then local files; cold/warm is a ratio within one repeat, and the median and spread over
``--repeat`` repeats are printed. Each epoch line gives the time the reader waited in
``shard_path`` (downloads it did or waited for), the most GETs in flight at once, and the CPU
seconds of this process, moto and the proxy during the epoch: they share the same cores. ``--backends`` also times a plain
parallel download of every shard through each fsspec backend (s3fs; obstore through fsspec when
installed). Targets: cold/warm >= 0.9 (issue 12); bytes per node <= 1.2x its share when D
divides the lanes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from streamshard import ShardWriter, World  # noqa: E402
from streamshard.dataset import StreamingDataset  # noqa: E402
from streamshard.reader import open_dataset  # noqa: E402
from streamshard.remote import CachedSource  # noqa: E402
from streamshard.sampler.order import EpochOrder  # noqa: E402
from streamshard.sampler.sequence import SampleSequence  # noqa: E402

TOKENS = 2048  # uint16 -> 4 KiB per sample
KEY = SECRET = "bench"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _start(argv: list[str], port: int, what: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit(f"{what} did not start within 30 s")


def start_moto() -> tuple[subprocess.Popen, str]:
    port = free_port()
    return _start([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], port,
                  "moto server")


def start_proxy(upstream: str, latency: float, bandwidth: float) -> tuple[subprocess.Popen, str]:
    port = free_port()
    return _start([sys.executable, "-m", "tests.latency_proxy", "--upstream-port",
                   upstream.rsplit(":", 1)[1], "--port", str(port), "--latency", str(latency),
                   "--bandwidth", str(bandwidth)], port, "latency proxy")


def cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU seconds of this process (all threads) or of child ``pid``."""
    if pid is None:
        t = os.times()
        return t.user + t.system
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"load {one:.1f}/{five:.1f} on {os.cpu_count()} CPUs"


def backend_fs(name: str, endpoint: str):
    """An fsspec filesystem for ``s3://`` on ``endpoint``: ``s3fs`` or ``obstore``."""
    if name == "s3fs":
        import s3fs

        return s3fs.S3FileSystem(key=KEY, secret=SECRET, skip_instance_cache=True,
                                 client_kwargs={"endpoint_url": endpoint, "region_name": "us-east-1"})
    from obstore.fsspec import FsspecStore

    return FsspecStore("s3", endpoint=endpoint, region="us-east-1", access_key_id=KEY,
                       secret_access_key=SECRET, client_options={"allow_http": True},
                       skip_instance_cache=True)


def time_backend(name: str, endpoint: str, files: list[tuple[str, int]], connections: int) -> float:
    """MB/s of ranged GETs of every shard (8 MiB parts), ``connections`` threads."""
    from concurrent.futures import ThreadPoolExecutor

    fs = backend_fs(name, endpoint)
    jobs = [(f, s, min(size, s + (8 << 20))) for f, size in files for s in range(0, size, 8 << 20)]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(connections) as pool:
        got = sum(pool.map(lambda j: len(fs.cat_file(j[0], start=j[1], end=j[2])), jobs))
    seconds = time.perf_counter() - t0
    assert got == sum(size for _, size in files)
    return got / seconds / 1e6


def write_dataset(path: str, mb: int, shard_size: str) -> int:
    rng = np.random.default_rng(0)
    n = mb * 10**6 // (2 * TOKENS)
    # skewed token ids (exponential, capped at vocab 50257) compress ~10% with zstd, roughly like
    # real token streams; numpy's zipf would cost ~20 s for this much data
    with ShardWriter(path, columns={"tokens": f"uint16[{TOKENS}]"}, shard_size=shard_size) as w:
        for start in range(0, n, 1024):
            block = np.minimum(rng.exponential(3000.0, (min(1024, n - start), TOKENS)),
                               50256).astype(np.uint16)
            for row in block:
                w.write({"tokens": row})
    return n


def shard_order(seq: SampleSequence, index, steps, rank=0, world=1) -> list:
    """Shards in the order a device first touches them over ``steps`` (the prefetch hint)."""
    seen: dict[int, None] = {}
    for step in steps:
        for s in index.locate(seq.batch(step, rank, world)[1])[0].tolist():
            seen.setdefault(s, None)
    return [index.shards[s] for s in seen]


def run_epoch(url: str, *, batch: int, lanes: int, cache_dir: str | None, options: dict | None,
              prefetch: bool) -> tuple[float, int, dict]:
    t_open = time.perf_counter()
    ds = StreamingDataset(url, batch_size=batch, seed=0, lanes=lanes, world=World(),
                          cache_dir=cache_dir, storage_options=options)
    t0 = time.perf_counter()  # the epoch; opening (index HEAD/GET, parse) is reported apart
    opened = t0 - t_open
    source = ds.datasets[0].source
    if prefetch and isinstance(source, CachedSource):
        index = ds.datasets[0].index
        source.prefetch(shard_order(ds.sequence, index, range(ds.steps_per_epoch)))
    n = sum(len(b) for b in ds)
    seconds = time.perf_counter() - t0
    stats = source.stats() if isinstance(source, CachedSource) else dict(ds.datasets[0].stats)
    stats["open_seconds"] = round(opened, 3)
    if isinstance(source, CachedSource):
        source.close()
    ds.datasets[0].close()
    return seconds, n, stats


def node_share(url: str, options: dict, root: str, *, nodes: int, lanes: int, batch: int) -> list:
    """Each of ``nodes`` simulated nodes (1 device each, own cache dir) reads its strided share."""
    out = []
    for rank in range(nodes):
        src = CachedSource(url, cache_dir=os.path.join(root, f"node{nodes}-{rank}"),
                           storage_options=options)
        ds = open_dataset(url, source=src)
        index = ds.index
        order = EpochOrder([s.samples for s in index.shards], seed=0, lanes=lanes)
        seq = SampleSequence(order, global_batch_size=batch * nodes)
        src.prefetch(shard_order(seq, index, range(seq.steps_per_epoch), rank, nodes))
        for step in range(seq.steps_per_epoch):
            for sid in seq.batch(step, rank, nodes)[1].tolist():
                ds.read(*ds.locate(sid))
        stats = src.stats()
        share = sum(s.bytes for s in index.shards) / nodes
        out.append({"rank": rank, "bytes_fetched": stats["bytes_fetched"],
                    "share": round(share), "ratio": round(stats["bytes_fetched"] / share, 3)})
        src.close()
        ds.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=int, default=150, help="dataset size in MB of raw tokens")
    ap.add_argument("--shard-size", default="1MB", help="many shards per lane, like a real corpus")
    ap.add_argument("--lanes", type=int, default=8)
    ap.add_argument("--batch", type=int, default=32, help="per-device batch size")
    ap.add_argument("--nodes", default="4", help="comma-separated node counts, e.g. 4,3")
    ap.add_argument("--repeat", type=int, default=3, help="repeats of cold, warm and local")
    ap.add_argument("--latency", type=float, default=0.02, help="first-byte latency, s (0: no proxy)")
    ap.add_argument("--bandwidth", type=float, default=50e6, help="bytes/s per connection")
    ap.add_argument("--hint", choices=("loader", "epoch"), default="loader",
                    help="prefetch hints: the loader's own, or the whole epoch at once")
    ap.add_argument("--client", default="s3fs",
                    help="storage_options backends of the cold/warm epochs, comma-separated "
                         "(s3fs,obstore: interleaved within each repeat)")
    ap.add_argument("--backends", default="s3fs,obstore",
                    help="fsspec backends to time on the same server ('' to skip)")
    args = ap.parse_args()

    work = tempfile.mkdtemp(prefix="bench-remote-")
    proc, upstream = start_moto()
    proxy = None
    endpoint = upstream
    if args.latency > 0 or args.bandwidth > 0:
        proxy, endpoint = start_proxy(upstream, args.latency, args.bandwidth)
        print(f"server: moto at {upstream} behind a proxy at {endpoint}: {args.latency * 1e3:.0f} ms "
              f"first byte, {args.bandwidth / 1e6:.0f} MB/s per connection")
    try:
        t = time.perf_counter()
        local = os.path.join(work, "ds")
        n = write_dataset(local, args.mb, args.shard_size)
        index = open_dataset(local).index
        stored = sum(s.bytes for s in index.shards)
        print(f"dataset: {n} samples x {2 * TOKENS} B, {len(index.shards)} shards, "
              f"{stored / 1e6:.1f} MB stored, written in {time.perf_counter() - t:.1f}s")
        import boto3
        import s3fs

        options = {"key": KEY, "secret": SECRET,
                   "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}
        boto3.client("s3", endpoint_url=upstream, region_name="us-east-1", aws_access_key_id=KEY,
                     aws_secret_access_key=SECRET).create_bucket(Bucket="bench")
        t = time.perf_counter()
        s3fs.S3FileSystem(**{**options, "client_kwargs": {"endpoint_url": upstream,
                                                          "region_name": "us-east-1"}}).put(
            local + "/", "bench/ds/", recursive=True)
        print(f"uploaded to {endpoint} in {time.perf_counter() - t:.1f}s")
        url, raw_mb = "s3://bench/ds", n * 2 * TOKENS / 1e6
        clients = [c for c in args.client.split(",") if c]
        base_options = options
        options = {**options, "backend": clients[0]}
        print(f"clients: {', '.join(clients)} (interleaved within each repeat)")

        backend_mb_s: dict[str, float] = {}  # the server's ceiling per client, no reader
        for name in [b for b in args.backends.split(",") if b]:
            try:
                rates = [time_backend(name, endpoint, [(f"bench/ds/{sh.file}", sh.bytes)
                                                        for sh in index.shards], 16)
                         for _ in range(args.repeat)]
            except ImportError as exc:
                print(f"backend {name}: not installed ({exc})")
                continue
            backend_mb_s[name] = statistics.median(rates)
            print(f"backend {name:8s}: ranged GETs of every shard, 16 connections: median "
                  f"{statistics.median(rates):,.0f} MB/s (min {min(rates):,.0f}, max {max(rates):,.0f}) "
                  f"[{load()}]")

        rows: list[dict[str, float]] = []
        pids = {"client": None, "moto": proc.pid, "proxy": proxy.pid if proxy else None}
        for rep in range(args.repeat):
            row = {}
            runs = []
            for client in clients:
                cache = os.path.join(work, f"cache{rep}-{client}")  # cold: a fresh cache each repeat
                opts = {**base_options, "backend": client}
                runs += [(f"{client}:cold", url, dict(cache_dir=cache, options=opts)),
                         (f"{client}:warm", url, dict(cache_dir=cache, options=opts))]
            runs.append(("local", local, dict(cache_dir=None, options=None)))
            for name, where, kw in runs:
                cpu0 = {k: cpu_seconds(pid) for k, pid in pids.items() if k == "client" or pid}
                seconds, count, stats = run_epoch(where, batch=args.batch, lanes=args.lanes,
                                                  prefetch=args.hint == "epoch" and where == url, **kw)
                cpu = {k: cpu_seconds(pids[k]) - v for k, v in cpu0.items()}
                row[name] = count / seconds
                row["samples"] = count
                row[f"{name}_cpu"] = cpu["client"]
                row[f"{name}_server_cpu"] = cpu.get("moto", 0.0) + cpu.get("proxy", 0.0)
                waited = (f", reader waited {stats['read_wait_seconds']:.2f}s, peak "
                          f"{stats['peak_connections']} GETs" if "read_wait_seconds" in stats else "")
                print(f"{name:12s} epoch {rep}: {count} samples in {seconds:.2f}s = "
                      f"{count / seconds:,.0f} samples/s, {raw_mb / seconds:,.0f} MB/s (raw){waited}; "
                      f"CPU s {', '.join(f'{k} {v:.2f}' for k, v in cpu.items())} [{load()}]")
                if rep == args.repeat - 1 and name != "local":
                    print(f"      stats: {json.dumps(stats)}")
            rows.append(row)
        for name in [f"{c}:{w}" for c in clients for w in ("cold", "warm")] + ["local"]:
            rates = [r[name] for r in rows]
            print(f"{name:12s}: median {statistics.median(rates):,.0f} samples/s "
                  f"(min {min(rates):,.0f}, max {max(rates):,.0f})")
        for client in clients:
            ratios = [r[f"{client}:cold"] / r[f"{client}:warm"] for r in rows]
            print(f"{client}: cold/warm = median {statistics.median(ratios):.2f} (min "
                  f"{min(ratios):.2f}, max {max(ratios):.2f}, {len(ratios)} repeats; target >= "
                  f"0.90), warm/local = median "
                  f"{statistics.median(r[f'{client}:warm'] / r['local'] for r in rows):.2f}; client "
                  f"CPU s per epoch: cold median "
                  f"{statistics.median(r[f'{client}:cold_cpu'] for r in rows):.2f}, warm median "
                  f"{statistics.median(r[f'{client}:warm_cpu'] for r in rows):.2f}; moto + proxy "
                  f"CPU s per cold epoch: median "
                  f"{statistics.median(r[f'{client}:cold_server_cpu'] for r in rows):.2f} (same "
                  f"{os.cpu_count()} CPUs) [{load()}]")
            if client in backend_mb_s:
                # What the server allows: a cold epoch moves every stored byte through it, at
                # about the rate a plain parallel download reaches (measured above, a short
                # burst: an estimate, not a strict bound), while the warm one reads the disk.
                warm_s = statistics.median(r["samples"] / r[f"{client}:warm"] for r in rows)
                need = stored / warm_s / 1e6
                print(f"{client}: what the server allows: a cold epoch at warm speed needs "
                      f"{need:,.0f} MB/s of stored bytes; plain ranged GETs reached "
                      f"{backend_mb_s[client]:,.0f} MB/s -> cold/warm of about "
                      f"{min(1.0, backend_mb_s[client] / need):.2f} at that rate")

        for nodes in [int(x) for x in args.nodes.split(",") if x]:
            t = time.perf_counter()
            rows = node_share(url, options, work, nodes=nodes, lanes=args.lanes, batch=args.batch)
            worst = max(r["ratio"] for r in rows)
            divides = args.lanes % nodes == 0
            print(f"{nodes} nodes x 1 device, {args.lanes} lanes ({'divides' if divides else 'does not divide'}): "
                  f"bytes fetched / share per node = {[r['ratio'] for r in rows]}, worst {worst:.3f}"
                  f"{' (target <= 1.2)' if divides else ''}  [{time.perf_counter() - t:.1f}s]")
    finally:
        if proxy is not None:
            proxy.kill()
            proxy.wait(timeout=10)
        proc.kill()
        proc.wait(timeout=10)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
