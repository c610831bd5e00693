"""``streamshard benchmark DATASET``: time a shuffled epoch of your own data with your settings.

    streamshard benchmark data/ds --batch-size 32 --workers 4 [--steps N] [--json]

It builds the ``StreamingDataset`` / ``StreamingDataLoader`` your training script would (batch
size per device, workers, seed, shuffle, lanes, window, block cache, remote cache), then reports:
the time to the first batch, one epoch (or ``--steps``) in samples/s and MB/s of raw sample
bytes, and the resume: the state saved at the middle of the run is restored into a fresh loader,
which must serve the batch the run served next (checked) and whose time to that batch is shown.
Wall-clock figures depend on the machine and its load; run it twice and compare like with like.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any, Callable

from streamshard.errors import ConfigError


def add_benchmark(sub: Any) -> None:
    p = sub.add_parser("benchmark", help="time a shuffled epoch and a resume of a dataset with "
                                         "your loader settings (needs torch)")
    p.add_argument("dest", metavar="DATASET", help="dataset path or URL")
    p.add_argument("--batch-size", type=int, default=32, help="samples per batch (default 32)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers (default 0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-shuffle", action="store_true", help="read in dataset order")
    p.add_argument("--steps", type=int, default=None,
                   help="time this many batches instead of a whole epoch")
    p.add_argument("--lanes", type=int, default=None, help="sampler lanes (default: the sampler's)")
    p.add_argument("--window", type=int, default=None, help="shuffle window in shards")
    p.add_argument("--block-cache", default=None, help="decompressed block cache, e.g. 256MiB")
    p.add_argument("--cache-dir", default=None, help="local cache for a remote dataset")
    p.add_argument("--collate", choices=("auto", "default", "none"), default="auto",
                   help="default: stack into tensors as StreamingDataLoader does; none: time "
                        "reading only (lists of samples); auto (default): none when a column is "
                        "a variable-length array (which needs your own collate_fn)")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    p.set_defaults(func=_cmd_benchmark)


def run_benchmark(dest: str, *, batch_size: int = 32, workers: int = 0, seed: int = 0,
                  shuffle: bool = True, steps: int | None = None, lanes: int | None = None,
                  window: int | None = None, block_cache: Any = None, cache_dir: str | None = None,
                  collate: str = "auto", clock: Callable[[], float] = time.perf_counter) -> dict[str, Any]:
    """Run the benchmark; return its figures (seconds from ``clock``)."""
    from streamshard import StreamingDataLoader, StreamingDataset, World
    from streamshard.testing import batch_key

    if not isinstance(workers, int) or workers < 0:
        raise ConfigError(f"workers must be a non-negative int, got {workers!r}")
    if steps is not None and (not isinstance(steps, int) or steps < 1):
        raise ConfigError(f"steps must be a positive int, got {steps!r}")
    opts: dict[str, Any] = {"batch_size": batch_size, "seed": seed, "shuffle": shuffle,
                            "lanes": lanes, "window": window, "world": World(),
                            "cache_dir": cache_dir}
    if block_cache is not None:
        opts["block_cache"] = block_cache
    if collate not in ("auto", "default", "none"):
        raise ConfigError(f"collate must be 'auto', 'default' or 'none', got {collate!r}")
    loader_opts: dict[str, Any] = {"num_workers": workers}

    def make() -> Any:
        return StreamingDataLoader(StreamingDataset(dest, **opts), **loader_opts)

    t0 = clock()
    ds = StreamingDataset(dest, **opts)
    t_open = clock() - t0
    if collate == "auto":
        ragged = any(ct.kind == "array" and (ct.dims is None or None in ct.dims)
                     for ct in ds.datasets[0].schema.columns.values())
        collate = "none" if ragged else "default"
    if collate == "none":
        loader_opts["collate_fn"] = keep_samples
    loader = StreamingDataLoader(ds, **loader_opts)
    total = min(steps, len(loader)) if steps else len(loader)
    if total < 2:
        raise ConfigError(f"{dest}: an epoch of {len(loader)} batches of {batch_size} is too "
                          f"short to time; lower --batch-size")
    mid = total // 2
    saved, expected = None, None
    first_batch = None
    t0 = clock()
    served = 0
    for served, batch in enumerate(loader, 1):
        if served == 1:
            first_batch = clock() - t0
        if served == mid:
            saved = json.loads(json.dumps(loader.state_dict()))
        elif served == mid + 1:
            expected = batch_key(batch)
        if served == total:
            break
    elapsed = clock() - t0
    samples = served * ds.batch_size
    index = ds.datasets[0].index
    raw_per_sample = sum(s.raw_bytes for s in index.shards) / max(index.num_samples, 1)

    resumed = make()
    t0 = clock()
    resumed.load_state_dict(saved)
    got = batch_key(next(iter(resumed)))
    t_resume = clock() - t0
    return {
        "dataset": dest, "samples_in_dataset": index.num_samples,
        "settings": {"batch_size": batch_size, "workers": workers, "seed": seed,
                     "shuffle": shuffle, "lanes": lanes, "window": window,
                     "block_cache": block_cache, "steps": total, "collate": collate},
        "open_seconds": t_open, "first_batch_seconds": first_batch,
        "batches": served, "samples": samples, "seconds": elapsed,
        "samples_per_second": samples / elapsed if elapsed > 0 else None,
        "raw_mb_per_second": samples * raw_per_sample / elapsed / 1e6 if elapsed > 0 else None,
        "resume": {"at_batch": mid, "seconds_to_first_batch": t_resume,
                   "same_batch": got == expected},
        "machine": {"cpus": os.cpu_count(), "load_average": list(os.getloadavg())
                    if hasattr(os, "getloadavg") else None},
    }


def keep_samples(samples: list) -> list:
    """The ``collate_fn`` of ``--collate none``: the device batch as its list of samples."""
    return samples


def _cmd_benchmark(args: argparse.Namespace) -> int:
    r = run_benchmark(args.dest, batch_size=args.batch_size, workers=args.workers,
                      seed=args.seed, shuffle=not args.no_shuffle, steps=args.steps,
                      lanes=args.lanes, window=args.window, block_cache=args.block_cache,
                      cache_dir=args.cache_dir, collate=args.collate)
    if args.json:
        print(json.dumps(r, indent=1))
        return 0 if r["resume"]["same_batch"] else 1
    s = r["settings"]
    order = "shuffled" if s["shuffle"] else "in order"
    load = r["machine"]["load_average"]
    print(f"dataset     {r['dataset']}: {r['samples_in_dataset']:,} samples; batch "
          f"{s['batch_size']}, {s['workers']} workers, {order}, seed {s['seed']}, collate "
          f"{s['collate']}")
    print(f"open        {r['open_seconds']:.3f} s; first batch after {r['first_batch_seconds']:.3f} s")
    print(f"read        {r['batches']:,} batches, {r['samples']:,} samples in {r['seconds']:.2f} s: "
          f"{r['samples_per_second']:,.0f} samples/s, {r['raw_mb_per_second']:.1f} MB/s of raw "
          f"samples")
    same = "same batch as the uninterrupted run" if r["resume"]["same_batch"] else \
        "DIFFERENT batch from the uninterrupted run"
    print(f"resume      at batch {r['resume']['at_batch']:,}: first batch after "
          f"{r['resume']['seconds_to_first_batch']:.3f} s, {same}")
    if load:
        print(f"machine     {r['machine']['cpus']} CPUs, load average {load[0]:.2f}")
    return 0 if r["resume"]["same_batch"] else 1
