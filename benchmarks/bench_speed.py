"""Issue 12 benchmark: compressed vs uncompressed shuffled epochs, the batch gather vs memmap,
and shuffle quality of each order option.

    python benchmarks/bench_speed.py [--tokens-mb 400] [--binary-mb 200] [--repeats 3]
                                     [--parts zstd,gather,quality] [--out FILE.json]

Every ratio is between figures of this run, on the same bytes; each figure is the median of
``--repeats`` fresh loaders (spread = min..max), and the load average is printed at start and end.

- ``zstd``: one shuffled epoch at 0 workers (batch 32, defaults otherwise) of the same corpus
  written uncompressed and with zstd, for three order options: ``block`` (block-aware shuffle,
  the default for zstd shards), ``window`` (the order before issue 12, the default for
  uncompressed shards) and ``global`` (one lane, one window: a true permutation). Corpora:
  ``tokens`` (2,048 uint16 Zipf tokens per sample, as bench_peers), ``text`` (the stdlib's .py
  files, bytes) and ``binary`` (100-200 KB samples of a smooth random walk, ~1.5-2x compressible).
  Also block decompressions per epoch / blocks in the dataset (first epoch; and over every
  timed epoch, where a block cache holding much of a small corpus serves later epochs), and the
  *decode bound*: the time to only decompress every block of the zstd dataset once (frames
  already in memory; the reader's own decompressor, one thread), and the best ratio any reader
  could reach with it, ``t_none / (t_none + t_decode)`` (``t_none``: one uncompressed epoch);
  also with the reader's own fetch of each block (read, xxh64, frame check, decompress).
- ``gather``: uint16[1024] tokens, uncompressed, shuffled epoch through ``StreamingDataLoader``
  (int64 tokens by default, and ``token_dtype=None`` = uint16) vs a raw ``np.memmap`` with one
  fancy-index per batch of a random permutation through a plain ``DataLoader(batch_size=None)``
  (uint16, and ``.astype(int64)``), at 0 and 2 workers; each also as samples per CPU-second
  (this process and its reaped workers), a figure less sensitive to a shared machine.
- ``quality``: pure sampler, no I/O, on the tokens shapes: mean distinct shards per global batch,
  Spearman rank correlation of position vs sample id over the epoch, and the fraction of samples
  whose id-neighbour (id + 1) is served in the same global batch; a random permutation
  (``numpy.random.default_rng(0).permutation``) is the reference.
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import workloads  # noqa: E402

from streamshard import ShardWriter, StreamingDataLoader, StreamingDataset, World  # noqa: E402
from streamshard.blockshuffle import block_groups  # noqa: E402
from streamshard.reader import open_dataset  # noqa: E402
from streamshard.sampler import EpochOrder, SampleSequence  # noqa: E402

BATCH = 32
ORDERS = ("block", "window", "global")


def order_kwargs(option: str, n: int) -> dict:
    if option == "block":
        return {"block_shuffle": True}
    if option == "window":
        return {"block_shuffle": False}
    return {"block_shuffle": False, "lanes": 1, "window": n}


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "runs": values}


# -- corpora -----------------------------------------------------------------------------------
def binary_samples(total_mb: float, smooth: bool, seed: int = 3):
    """100-200 KB samples: random bytes (already-compressed media, JPEG-like: zstd stores
    them), or a smooth random walk (raw sensor/image-like: zstd finds ~2x)."""
    rng = np.random.default_rng(seed)
    left = int(total_mb * 1e6)
    while left > 0:
        size = int(rng.integers(100_000, 200_001))
        if smooth:
            steps = rng.integers(-2, 3, size=size).astype(np.int16)
            yield {"data": (np.cumsum(steps) & 0xFF).astype(np.uint8).tobytes()}
        else:
            yield {"data": rng.bytes(size)}
        left -= size


def write(dest: str, columns: dict, samples, compression) -> None:
    with ShardWriter(dest, columns=columns, compression=compression) as w:
        for s in samples:
            w.write(s)


def corpora(work: str, args) -> dict[str, tuple[dict, callable]]:
    tok = workloads.make_tokens(work, args.tokens_mb)
    text = workloads.make_text(work, args.text_files)
    return {
        "tokens": ({"tokens": f"uint16[{workloads.TOKENS_PER_SAMPLE}]"}, tok.iter_samples),
        "text": ({"text": "bytes"}, text.iter_samples),
        "binary": ({"data": "bytes"}, lambda: binary_samples(args.binary_mb, False)),
        "binary-smooth": ({"data": "bytes"}, lambda: binary_samples(args.binary_mb, True)),
    }


# -- epochs ------------------------------------------------------------------------------------
def epoch(path: str, workers: int = 0, **kwargs) -> tuple[float, int, dict]:
    """(samples/s, samples, dataset stats at 0 workers) of shuffled epochs of a fresh loader,
    timed from its first ``iter()`` (worker start-up included, opening the index not: that is
    a start-up figure); epochs shorter than 1 s are repeated (up to 5, same loader, next
    epoch each time) and their total is timed. Stats are those of the first epoch, plus
    ``epochs`` and ``blocks_read_all`` (every timed epoch)."""
    ds = StreamingDataset(path, batch_size=BATCH, seed=17, world=World(), **kwargs)
    extra = {"multiprocessing_context": "fork"} if workers else {}
    loader = StreamingDataLoader(ds, num_workers=workers, **extra)
    n, stats, epochs = 0, None, 0
    t0 = time.perf_counter()
    while epochs < 5:
        epochs += 1
        for batch in loader:
            first = next(iter(batch.values()))
            n += len(first)
        if stats is None:
            stats = dict(ds.datasets[0].stats)
        if time.perf_counter() - t0 >= 1.0:
            break
    rate = n / (time.perf_counter() - t0)
    stats["epochs"] = epochs
    stats["blocks_read_all"] = ds.datasets[0].stats.get("blocks_read", 0)
    return rate, n, stats


def decode_seconds(path: str) -> float:
    """Seconds to decompress every block of a zstd dataset once, one after the other, with the
    reader's own (thread-local) decompressor; the stored frames are read into memory first."""
    from streamshard.shardfile import _decompressor

    ds = open_dataset(path)
    frames = []
    for s in range(ds.num_shards):
        table = ds.shard_reader(s).table
        with open(ds.source.shard_path(ds.index.shards[s]), "rb") as f:
            data = f.read()
        frames += [(data[o:o + n], r) for o, n, r in zip(table["offset"].tolist(),
                                                       table["stored"].tolist(),
                                                       table["raw"].tolist())]
    ds.close()
    dctx = _decompressor()
    t0 = time.perf_counter()
    for frame, raw in frames:
        dctx.decompress(frame, max_output_size=raw)
    return time.perf_counter() - t0


def block_seconds(path: str) -> float:
    """Seconds for the reader to fetch every block once (``ShardFileReader.block``: read,
    xxh64, frame check, decompress, header check), no block cache."""
    ds = open_dataset(path, block_cache=0)
    readers = [ds.shard_reader(s) for s in range(ds.num_shards)]
    t0 = time.perf_counter()
    for r in readers:
        for b in range(r.num_blocks):
            r.block(b)
    return time.perf_counter() - t0


def total_blocks(path: str) -> int:
    ds = open_dataset(path)
    return sum(ds.shard_reader(s).num_blocks for s in range(ds.num_shards))


def bench_zstd(work: str, args) -> dict:
    out = {}
    for name, (columns, samples) in corpora(work, args).items():
        if name not in args.corpora.split(","):
            continue
        paths = {}
        for comp in ("none", "zstd"):
            paths[comp] = os.path.join(work, f"{name}-{comp}")
            write(paths[comp], columns, samples(), None if comp == "none" else "zstd")
        n = len(open_dataset(paths["none"]))
        res = {"samples": n, "blocks_zstd": total_blocks(paths["zstd"]),
               "k_zstd": block_groups(open_dataset(paths["zstd"]).index).samples_per_block}
        cases = [(comp, option) for comp in ("none", "zstd") for option in ORDERS
                 if not (option == "global" and comp == "zstd" and args.skip_global_zstd)]
        runs = {case: [] for case in cases}
        blocks = {case: [] for case in cases}
        blocks_all = {case: [] for case in cases}
        decode, fetch = [], []
        for _ in range(args.repeats):  # interleaved, so load drifts hit every case alike
            for comp, option in cases:
                rate, _, stats = epoch(paths[comp], **order_kwargs(option, n))
                runs[comp, option].append(rate)
                blocks[comp, option].append(stats.get("blocks_read", 0))
                blocks_all[comp, option].append(stats["blocks_read_all"] / stats["epochs"])
            decode.append(decode_seconds(paths["zstd"]))
            fetch.append(block_seconds(paths["zstd"]))
        for comp, option in cases:
            r, b = runs[comp, option], blocks[comp, option]
            res[f"{comp}/{option}"] = {"samples_per_s": spread(r), "blocks_read": statistics.median(b)}
            print(f"  {name:13s} {comp:4s} {option:6s} {statistics.median(r):>10,.0f} "
                  f"samples/s [{min(r):,.0f}..{max(r):,.0f}] blocks read "
                  f"{statistics.median(b):,.0f}", flush=True)
        z, u = res["zstd/block"]["samples_per_s"]["median"], res["none/window"]["samples_per_s"]["median"]
        res["ratio_zstd_default_vs_none_default"] = z / u
        res["ratio_zstd_block_vs_none_block"] = (
            z / res["none/block"]["samples_per_s"]["median"])
        res["decompressions_per_block"] = res["zstd/block"]["blocks_read"] / res["blocks_zstd"]
        res["decompressions_per_block_all_epochs"] = (
            statistics.median(blocks_all["zstd", "block"]) / res["blocks_zstd"])
        # The decode bound: an uncompressed epoch plus decompressing every block once.
        t_none = n / u
        res["decode_s"] = spread(decode)
        res["none_epoch_s"] = t_none
        res["best_ratio_decode_bound"] = t_none / (t_none + statistics.median(decode))
        res["block_fetch_s"] = spread(fetch)
        res["best_ratio_fetch_bound"] = t_none / (t_none + statistics.median(fetch))
        print(f"  {name}: zstd(block) / none(window) = {res['ratio_zstd_default_vs_none_default']:.2f}"
              f"; decompressions per block {res['decompressions_per_block']:.3f} (first epoch), "
              f"{res['decompressions_per_block_all_epochs']:.3f} (every timed epoch)", flush=True)
        print(f"  {name}: decode bound: uncompressed epoch {t_none * 1e3:.0f} ms, decompressing "
              f"every block once {statistics.median(decode) * 1e3:.0f} ms "
              f"[{min(decode) * 1e3:.0f}..{max(decode) * 1e3:.0f}] -> best ratio "
              f"{res['best_ratio_decode_bound']:.2f}; with the reader's read and checks "
              f"{statistics.median(fetch) * 1e3:.0f} ms [{min(fetch) * 1e3:.0f}.."
              f"{max(fetch) * 1e3:.0f}] -> {res['best_ratio_fetch_bound']:.2f}", flush=True)
        if res["decompressions_per_block_all_epochs"] < 0.9:
            print(f"  {name}: NOTE later epochs were served from the block cache (the corpus "
                  f"nearly fits it): the ratio is above what one decompression per block per "
                  f"epoch allows; use a corpus several times block_cache for that", flush=True)
        out[name] = res
        for p in paths.values():
            shutil.rmtree(p)
    return out


# -- gather vs memmap --------------------------------------------------------------------------
class MemmapBatches(torch.utils.data.IterableDataset):
    """One fancy-index read per batch of a random permutation, round-robin over workers."""

    def __init__(self, path: str, n: int, items: int, to_int64: bool):
        self.path, self.n, self.items, self.to_int64 = path, n, items, to_int64

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        w, nw = (0, 1) if info is None else (info.id, info.num_workers)
        mm = np.memmap(self.path, dtype=np.uint16, mode="r", shape=(self.n, self.items))
        order = np.random.default_rng(17).permutation(self.n)
        for step in range(w, self.n // BATCH, nw):
            rows = mm[order[step * BATCH:(step + 1) * BATCH]]
            yield {"tokens": torch.from_numpy(rows.astype(np.int64) if self.to_int64 else rows)}


def memmap_epoch(path: str, n: int, items: int, workers: int, to_int64: bool) -> float:
    t0 = time.perf_counter()
    extra = {"multiprocessing_context": "fork"} if workers else {}
    loader = torch.utils.data.DataLoader(MemmapBatches(path, n, items, to_int64),
                                         batch_size=None, num_workers=workers, **extra)
    count = sum(len(b["tokens"]) for b in loader)
    return count / (time.perf_counter() - t0)


def cpu_seconds() -> float:
    """CPU time of this process and its reaped children (DataLoader workers, once joined)."""
    import resource

    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + kids.ru_utime + kids.ru_stime


def timed(fn) -> tuple[float, float]:
    """``(samples/s of wall time as fn reports it, samples per CPU-second)`` for ``fn()``
    returning ``(samples/s, samples)``: the second is less sensitive to other processes sharing
    the machine (it includes loader construction and worker start-up, as the wall time does)."""
    c0 = cpu_seconds()
    rate, samples = fn()
    return rate, samples / (cpu_seconds() - c0)


def bench_gather(work: str, args) -> dict:
    items = 1024
    n = int(args.gather_mb * 1e6) // (2 * items)
    rng = np.random.default_rng(5)
    tokens = ((rng.zipf(1.2, size=(n, items)) - 1) % 50_000).astype("<u2")
    flat = os.path.join(work, "gather.bin")
    tokens.tofile(flat)
    ds_path = os.path.join(work, "gather-none")
    with ShardWriter(ds_path, columns={"tokens": f"uint16[{items}]"}, compression=None) as w:
        for row in tokens:
            w.write({"tokens": row})
    del tokens
    res = {"samples": n}
    for workers in (0, 2):
        usable = n // BATCH * BATCH
        cases = {
            "memmap_uint16": lambda: (memmap_epoch(flat, n, items, workers, False), usable),
            "memmap_int64": lambda: (memmap_epoch(flat, n, items, workers, True), usable),
            "streamshard_int64": lambda: epoch(ds_path, workers)[:2],
            "streamshard_uint16": lambda: epoch(ds_path, workers, token_dtype=None)[:2],
        }
        runs = {k: [] for k in cases}
        cpu_runs = {k: [] for k in cases}
        for _ in range(args.repeats):  # interleaved, so load drifts hit every case alike
            for k, fn in cases.items():
                rate, cpu_rate = timed(fn)
                runs[k].append(rate)
                cpu_runs[k].append(cpu_rate)
        for k, v in runs.items():
            res[f"w{workers}/{k}"] = spread(v)
            res[f"w{workers}/{k}/per_cpu_second"] = spread(cpu_runs[k])
            print(f"  gather w{workers} {k:20s} {statistics.median(v):>12,.0f} samples/s "
                  f"[{min(v):,.0f}..{max(v):,.0f}]; "
                  f"{statistics.median(cpu_runs[k]):>10,.0f} per CPU-second", flush=True)
        cpu_med = {k: statistics.median(v) for k, v in cpu_runs.items()}
        res[f"w{workers}/cpu_ratio_int64_vs_memmap_uint16"] = (
            cpu_med["streamshard_int64"] / cpu_med["memmap_uint16"])
        print(f"  gather w{workers}: per CPU-second, streamshard int64 / memmap uint16 = "
              f"{res[f'w{workers}/cpu_ratio_int64_vs_memmap_uint16']:.2f}", flush=True)
        med = {k: statistics.median(v) for k, v in runs.items()}
        res[f"w{workers}/ratio_int64_vs_memmap_uint16"] = med["streamshard_int64"] / med["memmap_uint16"]
        res[f"w{workers}/ratio_int64_vs_memmap_int64"] = med["streamshard_int64"] / med["memmap_int64"]
        res[f"w{workers}/ratio_uint16_vs_memmap_uint16"] = med["streamshard_uint16"] / med["memmap_uint16"]
        print(f"  gather w{workers}: streamshard int64 / memmap uint16 = "
              f"{res[f'w{workers}/ratio_int64_vs_memmap_uint16']:.2f}, int64 / memmap int64 = "
              f"{res[f'w{workers}/ratio_int64_vs_memmap_int64']:.2f}, uint16 / uint16 = "
              f"{res[f'w{workers}/ratio_uint16_vs_memmap_uint16']:.2f}", flush=True)
    return res


# -- shuffle quality ---------------------------------------------------------------------------
def quality_of(ids: np.ndarray, shard_starts: np.ndarray) -> dict:
    n = len(ids)
    steps = n // BATCH
    shards = np.searchsorted(shard_starts, ids, side="right") - 1
    per_batch = shards[: steps * BATCH].reshape(steps, BATCH)
    distinct = np.mean([len(np.unique(r)) for r in per_batch])
    pos = np.arange(n, dtype=np.float64)
    rank = np.empty(n)
    rank[ids] = pos  # position of each id; Spearman of a permutation = Pearson of the ranks
    rho = float(np.corrcoef(pos, ids.astype(np.float64))[0, 1])
    batch_of = rank // BATCH
    neighbour = float(np.mean(batch_of[:-1] == batch_of[1:]))
    return {"distinct_shards_per_batch": float(distinct), "spearman": rho,
            "neighbour_same_batch": neighbour}


def bench_quality(args) -> dict:
    n = workloads.token_samples(args.tokens_mb)
    out = {}
    for label, shard_samples in (("tokens, 64 MB shards", 15_600),
                                 ("tokens, 1 MB shards", 240)):
        sizes = [shard_samples] * (n // shard_samples) + ([n % shard_samples] if n % shard_samples else [])
        starts = np.concatenate([[0], np.cumsum(sizes)])
        k = 15  # 64 KiB blocks of 4,104-byte rows
        res = {"shards": len(sizes), "samples": n}
        from streamshard.sampler import BlockGroups
        options = {
            "block": EpochOrder(sizes, seed=17, blocks=BlockGroups(k)),
            "window": EpochOrder(sizes, seed=17),
            "global": EpochOrder(sizes, seed=17, lanes=1, window=n),
        }
        for name, order in options.items():
            SampleSequence(order, global_batch_size=BATCH)  # the same definition the loader uses
            res[name] = quality_of(order(0, np.arange(n)), starts)
        res["random"] = quality_of(np.random.default_rng(0).permutation(n), starts)
        for name in (*options, "random"):
            q = res[name]
            print(f"  {label:22s} {name:7s} shards/batch {q['distinct_shards_per_batch']:6.2f}  "
                  f"spearman {q['spearman']:+.4f}  id-neighbour in batch "
                  f"{q['neighbour_same_batch']:.4f}", flush=True)
        out[label] = res
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens-mb", type=float, default=400)
    p.add_argument("--binary-mb", type=float, default=200)
    p.add_argument("--gather-mb", type=float, default=400)
    p.add_argument("--text-files", type=int, default=None)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--parts", default="quality,gather,zstd")
    p.add_argument("--corpora", default="tokens,text,binary,binary-smooth")
    p.add_argument("--skip-global-zstd", action="store_true",
                   help="skip the slowest case (zstd read in a true global shuffle)")
    p.add_argument("--out", default=None)
    p.add_argument("--tmp", default=None)
    args = p.parse_args()
    result = {"args": vars(args), "load_start": os.getloadavg(), "cpus": os.cpu_count(),
              "python": platform.python_version(), "torch": torch.__version__,
              "numpy": np.__version__, "started": time.strftime("%Y-%m-%d %H:%M:%S UTC",
                                                                time.gmtime())}
    print(f"load average at start: {result['load_start']}", flush=True)
    work = tempfile.mkdtemp(prefix="bench-speed-", dir=args.tmp)
    try:
        parts = args.parts.split(",")
        if "quality" in parts:
            result["quality"] = bench_quality(args)
        if "gather" in parts:
            result["gather"] = bench_gather(work, args)
        if "zstd" in parts:
            result["zstd"] = bench_zstd(work, args)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["load_end"] = os.getloadavg()
    print(f"load average at end: {result['load_end']}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
