"""streamshard side by side with the libraries users would pick instead, on the same data.

    python benchmarks/bench_peers.py [--tokens-mb 400] [--out benchmarks/results]

Two deterministic workloads (``workloads.py``): 2,048-token uint16 samples (Zipf-like) and the
Python standard library's ``.py`` files. For every library (``peers/``): conversion MB/s,
shuffled and sequential epoch throughput with 0 and ``--workers`` DataLoader workers, ``ds[i]``
latency (mean, p99), time from restoring a 50% mid-epoch state to the first batch and whether the
resumed stream equals the uninterrupted one, on-disk size, peak RSS per phase (psutil, process
tree). Each library+workload runs in its own subprocesses (one to convert, one to read) under a
time limit; a missing or failing library is skipped and its error text recorded. Every figure,
baseline included, is measured in this run. Writes a table to stdout, ``peers.json`` and
``peers.png`` to ``--out``; the converted datasets live in a temp dir that is removed.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]  # peers/, workloads.py, and the checkout's package

import workloads  # noqa: E402
from peers import BATCH_SIZE, PEERS, make_peer  # noqa: E402

OURS = ("streamshard-none", "streamshard-zstd")
RESUME_TAIL = 8  # batches compared after the restore point
RESUME_REPEATS = 3  # restores timed (median reported); replays are timed once
MIN_EPOCH_S, MAX_REPEATS = 1.0, 5  # short epochs are repeated, median kept


# -- measurement helpers -------------------------------------------------------------------------
class RssMonitor:
    """Peak RSS of this process plus all its children (DataLoader workers, writer processes),
    sampled every 20 ms by a thread. RSS counts resident pages of mmapped files too."""

    def __init__(self, interval: float = 0.02):
        import psutil

        self._proc, self._interval = psutil.Process(), interval
        self._peak, self._stop = 0, threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _sample(self) -> int:
        total = 0
        for p in [self._proc] + self._proc.children(recursive=True):
            try:
                total += p.memory_info().rss
            except Exception:  # a worker that just exited
                pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, self._sample())
            time.sleep(self._interval)

    def reset(self) -> None:
        self._peak = self._sample()

    def close(self) -> None:
        self._stop.set()

    def peak_mb(self) -> float:
        return round(max(self._peak, self._sample()) / 1e6, 1)


def _column(batch):
    if isinstance(batch, dict):
        return batch[next(k for k in sorted(batch) if not k.startswith("__"))]
    return batch


def batch_stats(batch) -> tuple[int, int]:
    """(samples, payload bytes) of a collated batch: a dict of one stacked column, or of one
    list of variable-length values (``peers.list_collate``)."""
    v = _column(batch)
    if isinstance(v, (list, tuple)):
        return len(v), sum(len(x) if isinstance(x, (bytes, str)) else int(np.asarray(x).nbytes)
                           for x in v)
    a = np.asarray(v)
    return len(a), int(a.nbytes)


def consume(batch) -> None:
    """What a training step does with a batch of token ids (``--consume``): ids as int64, every
    one read (a sum), the same for every library. Lists of variable-size values are left alone."""
    v = _column(batch)
    if isinstance(v, (list, tuple)):
        return
    import torch

    t = v if isinstance(v, torch.Tensor) else torch.as_tensor(np.asarray(v))
    t.to(torch.int64).sum()


def digest(batch) -> str:
    h = hashlib.blake2b(digest_size=12)
    v = _column(batch)
    for x in (v if isinstance(v, (list, tuple)) else [v]):
        h.update(x if isinstance(x, bytes) else np.ascontiguousarray(np.asarray(x)).tobytes())
    return h.hexdigest()


def take(it, k: int) -> list:
    out = []
    for _ in range(k):
        out.append(next(it))
    return out


# -- phases (run inside the per-library subprocess) -----------------------------------------------
def phase_convert(peer, wl, dest) -> dict:
    t0 = time.perf_counter()
    peer.convert(wl, dest)
    secs = time.perf_counter() - t0
    disk = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(dest) for f in fs)
    return {"seconds": round(secs, 3), "mb_s": round(wl.raw_bytes / 1e6 / secs, 1),
            "disk_bytes": disk, "disk_vs_raw": round(disk / wl.raw_bytes, 3)}


def _one_epoch(peer, wl, dest, *, shuffle, workers, seed, eat: bool = False
               ) -> tuple[int, int, float, float]:
    t0 = time.perf_counter()
    loader = peer.loader(wl, dest, shuffle=shuffle, workers=workers, seed=seed)
    t1 = time.perf_counter()
    samples = nbytes = 0
    for batch in loader:
        n, b = batch_stats(batch)
        samples, nbytes = samples + n, nbytes + b
        if eat:
            consume(batch)
    secs = time.perf_counter() - t1
    del loader
    return samples, nbytes, secs, t1 - t0


def phase_epoch(peer, wl, dest, *, shuffle, workers, seed, min_s=MIN_EPOCH_S,
                eat: bool = False) -> dict:
    """One full epoch from a fresh loader (worker start-up included). Epochs shorter than
    ``min_s`` are repeated with fresh loaders (at most MAX_REPEATS) and the median is kept."""
    runs = []
    while not runs or (sum(r[2] for r in runs) < min_s and len(runs) < MAX_REPEATS):
        runs.append(_one_epoch(peer, wl, dest, shuffle=shuffle, workers=workers, seed=seed,
                               eat=eat))
    samples, nbytes, secs, build = sorted(runs, key=lambda r: r[2])[len(runs) // 2]
    return {"samples": samples, "seconds": round(secs, 4), "build_s": round(build, 3),
            "samples_s": round(samples / secs, 1), "mb_s": round(nbytes / 1e6 / secs, 1),
            "repeats": len(runs), "all_seconds": [round(r[2], 4) for r in runs]}


def phase_random(peer, wl, dest, *, reads, seed) -> dict:
    """``reads`` random ``ds[i]`` on a fresh handle ("cold": includes opening shards/chunks on
    first touch), then ``reads`` more at other random ids ("warm", the headline figure)."""
    t0 = time.perf_counter()
    get = peer.getitem(wl, dest)
    if get is None:
        return {"skipped": f"{peer.name} has no random access (ds[i])"}
    open_s = time.perf_counter() - t0
    rng = np.random.default_rng(seed + 1)
    out = {"reads": reads, "open_s": round(open_s, 4)}
    clock = time.perf_counter_ns
    for label in ("cold", "warm"):
        idx = rng.integers(0, wl.num_samples, size=reads).tolist()
        lat = np.empty(len(idx))
        for j, i in enumerate(idx):
            t = clock()
            get(i)
            lat[j] = clock() - t
        pre = "" if label == "warm" else "cold_"
        out[f"{pre}mean_us"] = round(lat.mean() / 1e3, 2)
        out[f"{pre}p99_us"] = round(float(np.percentile(lat, 99)) / 1e3, 2)
        out[f"{pre}max_us"] = round(lat.max() / 1e3, 1)
    return out


def phase_resume(peer, wl, dest, *, workers, seed, collect=True) -> dict:
    """Consume half an epoch (shuffled), save, take the next RESUME_TAIL batches as reference;
    then a fresh loader restores (state / seek / replay) and is timed to its first batch."""
    steps = wl.num_samples // BATCH_SIZE
    k = steps // 2
    m = max(1, min(RESUME_TAIL, steps - k))
    kind = peer.resume_kind
    a = peer.loader(wl, dest, shuffle=True, workers=workers, seed=seed)
    it = iter(a)
    take(it, k)
    state = peer.state_dict(a) if kind == "state" else None
    ref = [digest(b) for b in take(it, m)]
    del it, a
    # A replay costs half an epoch, so it is timed once; a restore is timed RESUME_REPEATS times.
    times, equal = [], True
    for _ in range(1 if kind == "replay" else RESUME_REPEATS):
        if collect:  # MosaicML refuses a second live dataset on the same directory
            gc.collect()
        t0 = time.perf_counter()
        if kind == "seek":
            b = peer.seek_loader(wl, dest, start_batch=k, shuffle=True, workers=workers, seed=seed)
            it = iter(b)
        else:
            b = peer.loader(wl, dest, shuffle=True, workers=workers, seed=seed)
            if kind == "state":
                peer.load_state_dict(b, state)
            it = iter(b)
            if kind == "replay":
                for _ in range(k):
                    next(it)
        first = next(it)
        times.append(time.perf_counter() - t0)
        got = [digest(first)] + [digest(x) for x in take(it, m - 1)]
        equal = equal and got == ref
        del it, b
    state_bytes = len(json.dumps(state, default=str)) if state is not None else None
    return {"kind": kind, "at_batch": k, "of_batches": steps, "workers": workers,
            "seconds": round(float(np.median(times)), 4), "all_seconds": [round(t, 4) for t in times],
            "equal": equal, "compared_batches": m, "state_json_bytes": state_bytes}


def run_child(spec: dict) -> dict:
    """Run one library's convert or read phases; results are saved after every phase."""
    out = {"phases": {}}

    def save():
        with open(spec["result"], "w") as f:
            json.dump(out, f, indent=1)

    wl = workloads.Workload(**spec["workload"])
    peer = make_peer(spec["lib"])
    try:
        peer.setup()
        out["version"] = peer.version()
        out["notes"] = peer.notes
        out["resume_kind"] = peer.resume_kind
    except Exception as e:  # noqa: BLE001  a missing peer is reported, not fatal
        out["error"] = f"{type(e).__name__}: {e}"
        save()
        return out
    mon = RssMonitor()
    if spec["phase"] == "convert":
        plan = [("convert", lambda: phase_convert(peer, wl, spec["dest"]))]
    else:
        w, seed = spec["workers"], spec["seed"]
        plan = [("random", lambda: phase_random(peer, wl, spec["dest"], reads=spec["reads"], seed=seed))]
        for order, shuffle in (("shuffled", True), ("sequential", False)):
            for nw in (0, w):
                plan.append((f"epoch_{order}_w{nw}", lambda s=shuffle, n=nw: phase_epoch(
                    peer, wl, spec["dest"], shuffle=s, workers=n, seed=seed,
                    min_s=spec.get("min_epoch_s", MIN_EPOCH_S), eat=spec.get("consume", False))))
        plan.append(("resume", lambda: phase_resume(peer, wl, spec["dest"], workers=w, seed=seed,
                                                    collect=spec.get("isolated", True))))
    for name, fn in plan:
        if spec.get("isolated", True):  # ~0.15 s each once torch is loaded; tests skip it
            gc.collect()
        mon.reset()
        try:
            r = fn()
        except Exception as e:  # noqa: BLE001
            r = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]}
        r["peak_rss_mb"] = mon.peak_mb()
        out["phases"][name] = r
        save()
    mon.close()
    return out


# -- orchestration (parent) ------------------------------------------------------------------------
def spawn(spec: dict, timeout: float, isolate: bool, log: str) -> dict:
    if not isolate:
        return run_child(dict(spec, isolated=False))
    with open(spec["result"] + ".spec", "w") as f:
        json.dump(spec, f)
    t0 = time.perf_counter()
    with open(log, "w") as logf:
        proc = subprocess.Popen([sys.executable, __file__, "--child", spec["result"] + ".spec"],
                                stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)  # the child and its DataLoader workers, nothing else
            proc.wait()
            rc = "timeout"
    res = {"phases": {}}
    if os.path.exists(spec["result"]):
        with open(spec["result"]) as f:
            res = json.load(f)
    if rc != 0:
        with open(log, errors="replace") as f:
            tail = f.read()[-1500:]
        res["error"] = (f"timed out after {timeout:.0f} s" if rc == "timeout" else f"exit code {rc}") \
            + f" (elapsed {time.perf_counter() - t0:.0f} s); log tail: {tail}"
    return res


def machine_info() -> dict:
    import psutil
    import torch

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gb": round(psutil.virtual_memory().total / 1e9, 1),
            "python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
            "platform": platform.platform(), "loadavg_start": os.getloadavg()}


def get(res: dict, *path):
    for p in path:
        if not isinstance(res, dict) or p not in res:
            return None
        res = res[p]
    return res


# metric name -> (path in a library's result, True when higher is better)
def metrics(workers: int) -> dict:
    m = {"convert_mb_s": (("convert", "mb_s"), True)}
    for order in ("shuffled", "sequential"):
        for nw in (0, workers):
            m[f"{order}_w{nw}_samples_s"] = ((f"epoch_{order}_w{nw}", "samples_s"), True)
    m.update({"random_mean_us": (("random", "mean_us"), False),
              "random_p99_us": (("random", "p99_us"), False),
              "resume_s": (("resume", "seconds"), False),
              "disk_bytes": (("convert", "disk_bytes"), False)})
    return m


def ratios(results: dict, workers: int) -> dict:
    """streamshard advantage per metric: > 1 means streamshard is better (faster / smaller)."""
    out = {}
    for ours in OURS:
        for peer in results:
            if peer in OURS:
                continue
            for name, (path, higher) in metrics(workers).items():
                a, b = get(results, ours, "phases", *path), get(results, peer, "phases", *path)
                if a and b:
                    out.setdefault(ours, {}).setdefault(peer, {})[name] = \
                        round(a / b if higher else b / a, 2)
    return out


def fmt(v, nd=0) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    return f"{v:,.{nd}f}"


def table(wl_name: str, results: dict, workers: int) -> str:
    cols = ["library", "conv MB/s", "disk MB", "shuf w0", f"shuf w{workers}", "seq w0",
            f"seq w{workers}", "MB/s shuf w0", "ds[i] us", "p99 us", "cold us", "resume s", "eq", "RSS MB"]
    rows = [cols]
    for lib, r in results.items():
        p = r.get("phases", {})
        if not p:
            rows.append([lib, "skipped: " + (r.get("error") or "?")[:90]])
            continue
        rss = max((v.get("peak_rss_mb", 0) for v in p.values()), default=None)
        resume = p.get("resume", {})
        rk = resume.get("kind", "")
        rows.append([lib, fmt(get(p, "convert", "mb_s")),
                     fmt((get(p, "convert", "disk_bytes") or 0) / 1e6, 1),
                     fmt(get(p, "epoch_shuffled_w0", "samples_s")),
                     fmt(get(p, f"epoch_shuffled_w{workers}", "samples_s")),
                     fmt(get(p, "epoch_sequential_w0", "samples_s")),
                     fmt(get(p, f"epoch_sequential_w{workers}", "samples_s")),
                     fmt(get(p, "epoch_shuffled_w0", "mb_s")),
                     fmt(get(p, "random", "mean_us"), 1), fmt(get(p, "random", "p99_us"), 1),
                     fmt(get(p, "random", "cold_mean_us"), 1),
                     (fmt(resume.get("seconds"), 3) + ("" if rk == "state" else f" ({rk})"))
                     if "seconds" in resume else "-",
                     fmt(resume.get("equal")), fmt(rss)])
    widths = [max(len(str(r[i])) for r in rows if i < len(r)) for i in range(len(cols))]
    lines = [f"== {wl_name}: epoch columns are samples/s (batch {BATCH_SIZE}); ds[i] warm mean/p99, "
             f"cold = first reads on a fresh handle; resume = restore at 50% -> first batch =="]
    for r in rows:
        lines.append("  ".join(str(c).rjust(widths[i]) if i else str(c).ljust(widths[i])
                               for i, c in enumerate(r)))
    return "\n".join(lines)


def targets(all_results: dict, workers: int) -> dict:
    """The issue's targets, evaluated (never asserted) for streamshard-none and -zstd."""
    out = {}
    for wl, res in all_results.items():
        for ours in OURS:
            if ours not in res or not res[ours].get("phases"):
                continue
            t = {}
            for peer, r in res.items():
                if peer in OURS or not r.get("phases"):
                    continue
                for key in [k for k in metrics(workers) if k.endswith("samples_s")] + \
                           ["random_mean_us", "resume_s"]:
                    path, higher = metrics(workers)[key]
                    a, b = get(res, ours, "phases", *path), get(r, "phases", *path)
                    if a is None or b is None:
                        continue
                    ratio = a / b if higher else b / a
                    if peer.startswith("memmap"):
                        if key.startswith("shuffled") and ours == "streamshard-none":
                            t[f"{key} >= 0.8x {peer}"] = {"ratio": round(ratio, 2), "met": ratio >= 0.8}
                        continue
                    need = 2.0 if (peer == "mosaicml-streaming" and key.endswith("samples_s")) else 1.0
                    t[f"{key} vs {peer} >= {need:g}x"] = {"ratio": round(ratio, 2), "met": ratio >= need}
            out.setdefault(wl, {})[ours] = t
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tokens-mb", type=float, default=400, help="size of the token workload (MB)")
    p.add_argument("--text-files", type=int, default=None, help="first N stdlib files (default all)")
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    p.add_argument("--libs", default=",".join(PEERS), help=f"comma list of {', '.join(PEERS)}")
    p.add_argument("--workloads", default="tokens,text")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--consume", action="store_true",
                   help="epochs read every token of each batch as int64, as a training step does "
                        "(default: count the batch only, as before)")
    p.add_argument("--reads", type=int, default=2000, help="random ds[i] calls per library")
    p.add_argument("--seed", type=int, default=17)
    p.add_argument("--min-epoch-s", type=float, default=MIN_EPOCH_S,
                   help=f"repeat epochs shorter than this (fresh loader, <= {MAX_REPEATS}), keep the median")
    p.add_argument("--timeout", type=float, default=300, help="seconds per library+workload+step")
    p.add_argument("--tmp", default=None, help="parent of the temp work dir (removed at the end)")
    p.add_argument("--no-isolate", action="store_true", help="run in-process (tests)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        with open(args.child) as f:
            run_child(json.load(f))
        return 0

    libs = [x for x in args.libs.split(",") if x]
    for lib in libs:
        make_peer(lib)  # unknown names fail now, not after minutes of work
    t_start = time.time()
    report = {"command": " ".join([os.path.relpath(__file__)] + (argv if argv is not None else sys.argv[1:])),
              "machine": machine_info(), "batch_size": BATCH_SIZE, "workers": args.workers,
              "seed": args.seed, "reads": args.reads, "min_epoch_s": args.min_epoch_s,
              "consume": args.consume, "workloads": {}, "results": {}}
    work = tempfile.mkdtemp(prefix="bench-peers-", dir=args.tmp)
    try:
        for name in args.workloads.split(","):
            t0 = time.perf_counter()
            wl = workloads.make_tokens(work, args.tokens_mb, args.seed) if name == "tokens" \
                else workloads.make_text(work, args.text_files)
            report["workloads"][name] = dict(workloads.describe(wl),
                                             generate_s=round(time.perf_counter() - t0, 2))
            print(f"workload {name}: {wl.num_samples:,} samples, {wl.raw_bytes / 1e6:.1f} MB", flush=True)
            res = report["results"][name] = {}
            for lib in libs:
                dest = os.path.join(work, f"{name}-{lib}")
                base = {"lib": lib, "workload": wl.to_json(), "dest": dest, "workers": args.workers,
                        "seed": args.seed, "reads": args.reads, "min_epoch_s": args.min_epoch_s,
                        "consume": args.consume}
                t1 = time.perf_counter()
                conv = spawn(dict(base, phase="convert", result=dest + ".convert.json"),
                             args.timeout, not args.no_isolate, dest + ".convert.log")
                r = {k: v for k, v in conv.items() if k != "phases"}
                r["phases"] = dict(conv.get("phases", {}))
                if "error" not in conv and "error" not in r["phases"].get("convert", {"error": 1}):
                    read = spawn(dict(base, phase="read", result=dest + ".read.json"),
                                 args.timeout, not args.no_isolate, dest + ".read.log")
                    r["phases"].update(read.get("phases", {}))
                    if "error" in read:
                        r["error"] = read["error"]
                res[lib] = r
                errs = [f"{k}: {v['error']}" for k, v in r["phases"].items() if "error" in v]
                status = "ok" if not errs and "error" not in r else "PARTIAL/FAILED"
                print(f"  {lib:<20} {status} in {time.perf_counter() - t1:5.1f} s"
                      + "".join(f"\n    ! {e[:300]}" for e in errs + ([r["error"][:600]] if "error" in r else [])),
                      flush=True)
                shutil.rmtree(dest, ignore_errors=True)
            os.remove(wl.data)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report["versions"], report["skipped"] = {}, {}
    for wl, res in report["results"].items():
        for lib, r in res.items():
            if r.get("version"):
                report["versions"][lib] = r["version"]
            if not r.get("phases") or "error" in r:
                report["skipped"][f"{wl}/{lib}"] = r.get("error", "no phase ran")
    report["ratios"] = {wl: ratios(res, args.workers) for wl, res in report["results"].items()}
    report["targets"] = targets(report["results"], args.workers)
    report["machine"]["loadavg_end"] = os.getloadavg()
    report["total_seconds"] = round(time.time() - t_start, 1)
    print()
    for wl, res in report["results"].items():
        print(table(wl, res, args.workers) + "\n")
    m = report["machine"]
    print(f"machine: {m['cpu']}, {m['cores']} cores, {m['ram_gb']} GB, python {m['python']}, "
          f"torch {m['torch']}, load {m['loadavg_start'][0]:.1f} -> {m['loadavg_end'][0]:.1f}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()))
    for k, v in report["skipped"].items():
        print(f"skipped/failed {k}: {v[:300]}")
    print("streamshard advantage (x, > 1 = streamshard better):")
    for wl, rr in report["ratios"].items():
        for ours, peers in rr.items():
            for peer, m in peers.items():
                print(f"  {wl:<6} {ours:<17} vs {peer:<18} " +
                      " ".join(f"{k.replace('_samples_s', '')}={v}" for k, v in m.items()))
    print("targets:")
    for wl, tt in report["targets"].items():
        for ours, t in tt.items():
            missed = [f"{k} ({v['ratio']})" for k, v in t.items() if not v["met"]]
            print(f"  {wl:<6} {ours:<17} met {len(t) - len(missed)}/{len(t)}"
                  + (f"; missed: {', '.join(missed)}" if missed else ""))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "peers.json"), "w") as f:
        json.dump(report, f, indent=1, default=str)
    if not args.no_plot:
        from plot import plot

        plot(report, os.path.join(args.out, "peers.png"))
    print(f"wrote {args.out}/peers.json" + ("" if args.no_plot else " and peers.png") +
          f"; total {report['total_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
