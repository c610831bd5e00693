"""Conversion throughput on token data: streamshard vs MosaicML's MDSWriter and LitData's optimize.

The same input for every writer: ``--mb`` MB (default 200) of Zipf-distributed uint16 token ids
(vocabulary 50,257, like GPT-2), cut into samples of 2048 tokens (4 KiB). Every writer compresses
with zstd (level 3 where the writer lets us choose: streamshard and MDS; LitData's own default
level otherwise) and runs on the same machine, one after the other:

- ``streamshard 1 proc``: ``ShardWriter`` in this process (one core, single-threaded zstd);
- ``streamshard driver --workers N``: ``streamshard.convert.convert`` with the ``tokens``
  converter on the same tokens saved as ``.npy`` (N = 1 and 2: the scaling figure);
- ``MDSWriter``: ``streaming.MDSWriter`` (in this process, one core), ``ndarray:uint16:2048``;
- ``LitData optimize``: ``litdata.optimize`` with ``num_workers=1`` (one worker process).

MB/s is input MB (10^6 bytes of tokens) per wall-clock second, input already in the page cache,
output to a temporary directory on the same disk. Same core count: every run except
``--workers 2`` is pinned to ONE core with ``os.sched_setaffinity`` (MDSWriter's ``zstd`` package
compresses with as many threads as the machine has cores; pinned, they share that one core);
``--workers 2`` gets two cores. The machine may be shared, so CPU seconds (this process and its
children, user + system) are printed too: MB per CPU-second is the contention-proof per-core
figure; wall-clock MB/s is what scaling needs. Ratios are printed with the targets (streamshard
>= 2x MDSWriter at the same core count; 2 workers >= 1.7x one worker). Missing optional packages
are skipped with a message. ``python benchmarks/bench_convert_peers.py [--mb 200] [--repeat 1]``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import importlib.metadata
import os
import resource
import shutil
import sys
import tempfile
import time

import numpy as np

SEQ = 2048
VOCAB = 50257
_TOKENS: dict[str, np.ndarray] = {}  # per-process memmap cache for LitData's worker function


def make_tokens(path: str, mb: int, seed: int = 0) -> np.ndarray:
    """``mb`` MB of Zipf-like uint16 tokens (whole samples), saved as ``.npy`` at ``path``."""
    n = (mb * 10**6 // 2) // SEQ * SEQ
    rng = np.random.default_rng(seed)
    ranks = rng.zipf(1.1, n)  # heavy-tailed like natural-language token frequencies
    tokens = ((ranks - 1) % VOCAB).astype(np.uint16)
    np.save(path, tokens)
    return np.load(path, mmap_mode="r")


def bench_streamshard(tokens: np.ndarray, out: str) -> float:
    from streamshard import ShardWriter

    t0 = time.perf_counter()
    with ShardWriter(out, columns={"tokens": f"uint16[{SEQ}]"}, shard_size="64MB",
                     compression="zstd", compression_level=3) as w:
        for i in range(0, tokens.size, SEQ):
            w.write({"tokens": tokens[i:i + SEQ]})
    return time.perf_counter() - t0


def bench_driver(npy: str, out: str, workers: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds): the driver measures its workers' CPU itself, since they
    are forkserver children, not children of this process."""
    from streamshard.convert import convert

    t0 = time.perf_counter()
    summary = convert([npy], out, format="tokens", options={"seq_len": SEQ}, workers=workers,
                      chunk_size="16MB", shard_size="64MB", compression="zstd",
                      compression_level=3)
    return time.perf_counter() - t0, summary.cpu_seconds


@functools.lru_cache(maxsize=None)
def _mds_writer():
    """MDSWriter; falls back to importing it without ``streaming/__init__`` (whose vision
    modules need a torchvision build matching torch, absent on CPU-only machines)."""
    import importlib.util
    import types

    try:
        from streaming import MDSWriter

        return MDSWriter
    except ImportError as exc:
        if importlib.util.find_spec("streaming") is None:
            raise
        reason = exc
    except RuntimeError as exc:
        reason = exc
    spec = importlib.util.find_spec("streaming")
    root = list(spec.submodule_search_locations)[0]
    for name, sub in (("streaming", ""), ("streaming.base", "base")):
        if name not in sys.modules:
            module = types.ModuleType(name)
            module.__path__ = [os.path.join(root, sub) if sub else root]
            sys.modules[name] = module
    print(f"  (MDSWriter imported directly: 'import streaming' failed: {reason!r:.80})")
    from streaming.base.format.mds.writer import MDSWriter

    return MDSWriter


def bench_mds(tokens: np.ndarray, out: str) -> float:
    writer = _mds_writer()  # imported by _run before timing; cached in sys.modules
    t0 = time.perf_counter()
    with writer(out=out, columns={"tokens": f"ndarray:uint16:{SEQ}"}, compression="zstd:3",
                size_limit=1 << 26) as w:
        for i in range(0, tokens.size, SEQ):
            w.write({"tokens": np.asarray(tokens[i:i + SEQ])})
    return time.perf_counter() - t0


def _litdata_sample(item: tuple[str, int]) -> dict:
    path, i = item
    if path not in _TOKENS:
        _TOKENS[path] = np.load(path, mmap_mode="r")
    return {"tokens": np.asarray(_TOKENS[path][i * SEQ:(i + 1) * SEQ])}


def _import_litdata():
    from litdata import optimize

    return optimize


def bench_litdata(npy: str, n_samples: int, out: str, workers: int = 1) -> float:
    from litdata import optimize

    t0 = time.perf_counter()
    optimize(fn=_litdata_sample, inputs=[(npy, i) for i in range(n_samples)], output_dir=out,
             chunk_bytes="64MB", compression="zstd", num_workers=workers, verbose=False,
             mode="overwrite", start_method="fork")
    return time.perf_counter() - t0


@contextlib.contextmanager
def pinned(n_cores: int):
    """Run the block (and processes it starts) on the first ``n_cores`` allowed cores."""
    allowed = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, allowed[:max(1, n_cores)])
    try:
        yield
    finally:
        os.sched_setaffinity(0, allowed)


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and its reaped children."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mb", type=int, default=200, help="input size in MB (default 200)")
    p.add_argument("--repeat", type=int, default=1, help="runs per writer; the best is kept")
    p.add_argument("--dir", default=None, help="scratch directory (default: a temp dir)")
    args = p.parse_args(argv)
    scratch = tempfile.mkdtemp(prefix="bench-peers-", dir=args.dir)
    try:
        return _run(args, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _run(args: argparse.Namespace, scratch: str) -> int:
    print("versions: " + ", ".join(f"{d} {version(d)}" for d in (
        "streamshard", "numpy", "zstandard", "mosaicml-streaming", "zstd", "litdata")))
    print(f"cpus: {os.cpu_count()} (sched affinity {len(os.sched_getaffinity(0))}); "
          f"python {sys.version.split()[0]}; load average {os.getloadavg()[0]:.1f}")
    npy = os.path.join(scratch, "tokens.npy")
    tokens = make_tokens(npy, args.mb)
    mb = tokens.nbytes / 1e6
    n_samples = tokens.size // SEQ
    np.asarray(tokens).sum()  # warm the page cache
    print(f"input: {mb:.1f} MB, {n_samples:,} samples of {SEQ} uint16 tokens (Zipf-like)")

    # imports happen here, outside the timed runs (importing `streaming` alone costs seconds)
    for module in ("streamshard.writer", "streamshard.convert", "streamshard.converters.tokens"):
        importlib.import_module(module)
    for name, load in (("mosaicml-streaming", _mds_writer), ("litdata", _import_litdata)):
        try:
            load()
        except ImportError as exc:
            print(f"{name} not importable ({exc}); its run will be skipped")

    results: dict[str, float] = {}
    per_cpu: dict[str, float] = {}

    def run(name: str, fn, *fn_args, cores: int = 1) -> None:
        best = best_cpu = None
        for k in range(args.repeat):
            out = os.path.join(scratch, f"out-{len(results)}-{k}")
            cpu0 = cpu_seconds()
            try:
                with pinned(cores):
                    outcome = fn(*fn_args, out)
            except ImportError as exc:
                print(f"{name:34s} skipped: {exc}")
                return
            finally:
                shutil.rmtree(out, ignore_errors=True)
            seconds, cpu = outcome if isinstance(outcome, tuple) else (outcome, cpu_seconds() - cpu0)
            best = seconds if best is None else min(best, seconds)
            best_cpu = cpu if best_cpu is None else min(best_cpu, cpu)
        results[name], per_cpu[name] = mb / best, mb / best_cpu
        print(f"{name:34s} {best:6.2f} s {mb / best:7.1f} MB/s | cpu {best_cpu:6.2f} s "
              f"{mb / best_cpu:7.1f} MB/cpu-s  ({cores} core{'s' * (cores > 1)})")

    # in-process writers first: child processes of the later runs must not be reaped (and
    # their CPU time counted) inside another run
    run("streamshard ShardWriter 1 proc", bench_streamshard, tokens)
    run("MDSWriter zstd:3 1 proc", bench_mds, tokens)
    run("LitData optimize zstd 1 worker", lambda o: bench_litdata(npy, n_samples, o, 1))
    run("streamshard driver --workers 1", lambda o: bench_driver(npy, o, 1))
    run("streamshard driver --workers 2", lambda o: bench_driver(npy, o, 2), cores=2)

    def ratio(a: str, b: str, target: float | None, table: dict, unit: str) -> None:
        if a in table and b in table:
            r = table[a] / table[b]
            verdict = "" if target is None else (f"  target >= {target}x: "
                                                 + ("met" if r >= target else "NOT met"))
            print(f"ratio ({unit}) {a} / {b}: {r:.2f}x{verdict}")

    print()
    for table, unit in ((results, "wall"), (per_cpu, "per cpu-s")):
        ratio("streamshard ShardWriter 1 proc", "MDSWriter zstd:3 1 proc", 2.0, table, unit)
        ratio("streamshard driver --workers 1", "MDSWriter zstd:3 1 proc", 2.0, table, unit)
        ratio("streamshard ShardWriter 1 proc", "LitData optimize zstd 1 worker", None, table,
              unit)
    ratio("streamshard driver --workers 2", "streamshard driver --workers 1", 1.7, results,
          "wall")
    return 0


if __name__ == "__main__":
    sys.exit(main())
