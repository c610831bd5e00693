"""Recovery benchmark (issue 5): effective training time under faults vs the same run without.

    python benchmarks/bench_recovery.py [--steps 1000] [--nproc 1] [--json out.json]

Runs ``examples/train_gpt.py`` twice under real ``torchrun --max-restarts``: once clean, once with
a fault plan of one SIGKILL, one hang and one loss spike (3 poisoned batches: persistent, so a
rollback) per 1,000 steps, spread over the run. Both runs train the same model on the same data.

Figures (all measured in this run):

- wall: seconds from launching torchrun to its exit (restarts, watchdog waits, checkpoint
  loads/saves and re-done steps included).
- effective fraction: sum of the durations of the steps that count (the last execution of each
  training step whose update was applied) / wall. Work lost to a kill, a hang or a rollback and
  the time spent restarting is what separates the two runs.
- effective fraction after launch: the same with the one-time launch (torchrun start, imports,
  dataset open: ``startup_s``, until the first step begins) taken out of the wall time; both runs
  pay it once, and on a tiny CPU model it dwarfs the steps.
- relative goodput: clean wall / faulted wall (same useful work in both).
- fault cost, measured directly in the faulted run: restart latencies (process death to the next
  start, checkpoint load included) + hang detection (hang fired to watchdog exit) + steps executed
  but discarded (re-done after a kill/hang, rolled back by a spike). ``effective_vs_faults`` =
  1 - fault cost / faulted wall: the share of the faulted run not lost to the faults. On a shared
  machine the step speed of two runs can differ by 1.5x, which makes the wall ratio above noise;
  this figure does not depend on the clean run.
- correctness: the faulted run's consumed sample ids, step by step, equal an uninterrupted
  StreamingDataLoader's with the skips and reseeds the journal recorded: no sample consumed
  twice, none lost except the skipped batches.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "train_gpt.py"
sys.path.insert(0, str(ROOT))


def fault_plan(steps: int, nproc: int) -> str:
    """One kill, one hang, one spike per 1,000 steps, at 31%, 62%, 87% of each 1,000-step block:
    off the checkpoint grid, so a kill or hang loses the steps since the last checkpoint as a
    random fault would (on average half a checkpoint interval)."""
    items = []
    for block in range(max(1, steps // 1000)):
        base, span = block * 1000, min(1000, steps - block * 1000)
        victim = block % nproc
        kill, hang, spike = (base + int(f * span) for f in (0.31, 0.62, 0.87))
        items += [f"kill@{kill}:rank{victim}", f"hang@{hang}:rank{victim}", f"spike@{spike}-{spike + 2}"]
    return ",".join(items)


def run(out: Path, args, faults: str) -> tuple[float, float]:
    """Run torchrun; returns (wall seconds, unix time of the launch)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
           "--max-restarts=3", "--monitor-interval=0.1", str(EXAMPLE), "--data", args.data, "--out", str(out),
           "--steps", str(args.steps), "--global-batch", str(args.global_batch), "--seq", str(args.seq),
           "--d-model", str(args.d_model), "--layers", str(args.layers), "--ckpt-every", str(args.ckpt_every),
           "--rollback-margin", "5", "--skip-before", "0", "--wd-floor", str(args.wd_floor), "--keep", "3"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), STREAMSHARD_FAULTS=faults)
    t0, launched = time.monotonic(), time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    wall = time.monotonic() - t0
    if proc.returncode != 0:
        sys.exit(f"torchrun failed (rc={proc.returncode}) for faults={faults!r}:\n{proc.stderr[-4000:]}")
    return wall, launched


def first_step_start(out: Path) -> float:
    with open(out / "consumed-rank0.jsonl") as f:
        rec = json.loads(f.readline())
    return rec["t"] - rec["dur"]


def effective(out: Path) -> tuple[dict[int, list[int]], float, int]:
    """(step -> sorted global batch ids, seconds of counted steps, executed step lines) from the logs."""
    last: dict[int, dict] = {}
    executed = 0
    per_rank = sorted(out.glob("consumed-rank*.jsonl"))
    ids: dict[int, list[int]] = {}
    for f in per_rank:
        mine: dict[int, dict] = {}
        for line in f.read_text().splitlines():
            rec = json.loads(line)
            mine[rec["step"]] = rec
            executed += f is per_rank[0]
        for s, rec in mine.items():
            ids[s] = sorted(ids.get(s, []) + rec["ids"])
            if f is per_rank[0]:
                last[s] = rec
    counted = sum(r["dur"] for r in last.values() if r["update"])
    return dict(sorted(ids.items())), counted, executed


def expected(args, steps: int, journal: Path) -> dict[int, list[int]]:
    from streamshard import StreamingDataLoader, StreamingDataset, World
    from streamshard.recovery.journal import Journal
    from streamshard.testing import take

    ledger = Journal(journal).ledger()
    loader = StreamingDataLoader(StreamingDataset(args.data, global_batch_size=args.global_batch, seed=17,
                                                  world=World()))
    for a, b in ledger.skips:
        loader.skip(a, b)
    for s, salt in ledger.reseeds:
        loader.reseed_from(s, salt)
    return {i: sorted(b["id"].tolist()) for i, b in enumerate(take(loader, steps))}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--nproc", type=int, default=1)
    p.add_argument("--global-batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--ckpt-every", type=int, default=25)
    p.add_argument("--wd-floor", type=float, default=2.0)
    p.add_argument("--data", help="token dataset (default: written to a temp dir)")
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-recovery-"))
    try:
        if args.data is None:
            args.data = str(work / "tok")
            subprocess.run([sys.executable, str(EXAMPLE), "--make-data", args.data, "--seq", str(args.seq),
                            "--samples", str(args.steps * args.global_batch + 2000)], check=True,
                           env=dict(os.environ, PYTHONPATH=str(ROOT)))
        faults = fault_plan(args.steps, args.nproc)
        results = {}
        for name, plan in (("clean", ""), ("faults", faults)):
            wall, launched = run(work / name, args, plan)
            startup = first_step_start(work / name) - launched
            ids, counted, executed = effective(work / name)
            journal = work / name / "journal.jsonl"
            events = [json.loads(line) for line in journal.read_text().splitlines()]
            want = expected(args, args.steps, journal)
            seen = [i for batch in ids.values() for i in batch]
            results[name] = {
                "wall_s": round(wall, 2), "counted_step_s": round(counted, 2),
                "effective_fraction": round(counted / wall, 4), "startup_s": round(startup, 2),
                "effective_fraction_after_launch": round(counted / (wall - startup), 4),
                "steps_executed": executed,
                "restarts": sum(e["event"] == "start" for e in events) // args.nproc - 1,
                "rollbacks": sum(e["event"] == "rollback" for e in events),
                "hangs_caught": sum(e["event"] == "hang" for e in events),
                "skipped_data_steps": sum(b - a for a, b in rollback_skips(events)),
                **breakdown(events, work / name),
                "ids_match_uninterrupted": ids == want,
                "no_sample_twice": len(seen) == len(set(seen)),
            }
        clean, faulted = results["clean"], results["faults"]
        results["relative_goodput"] = round(clean["wall_s"] / faulted["wall_s"], 4)
        fault_cost = (sum(faulted["restart_latency_s"]) + (faulted["hang_detect_s"] or 0.0)
                      + faulted["step_s_executed"] - faulted["counted_step_s"])
        results["fault_cost_s"] = round(fault_cost, 2)
        results["effective_vs_faults"] = round(1 - fault_cost / faulted["wall_s"], 4)
        results["config"] = {**{k: v for k, v in vars(args).items() if k not in ("data", "json")},
                             "fault_plan": faults, "python": platform.python_version(),
                             "cpus": os.cpu_count(), "machine": platform.machine()}
        print(json.dumps(results, indent=2))
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))
        ok = all(results[n]["ids_match_uninterrupted"] and results[n]["no_sample_twice"] for n in ("clean", "faults"))
        return 0 if ok else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


def breakdown(events: list[dict], out: Path) -> dict:
    """Where the non-step time went, from the journal (rank 0's clock) and the step log."""
    starts = [e["time"] for e in events if e["event"] == "start" and e["rank"] == 0]
    faults = {e["key"].split("@")[0]: e["time"] for e in events if e["event"] == "fault"}
    hangs = [e["time"] for e in events if e["event"] == "hang"]
    # a restart costs from the moment the process died (kill fired / watchdog fired) to its next start
    deaths = sorted([faults["kill"]] if "kill" in faults else []) + sorted(hangs)
    restart = [round(min(s for s in starts if s > d) - d, 2) for d in deaths if any(s > d for s in starts)]
    executed = sum(json.loads(line)["dur"] for line in (out / "consumed-rank0.jsonl").read_text().splitlines())
    return {
        "restart_latency_s": restart,
        "hang_detect_s": round(hangs[0] - faults["hang"], 2) if hangs and "hang" in faults else None,
        "checkpoint_save_s": round(sum(e["seconds"] for e in events if e["event"] == "checkpoint"), 2),
        "checkpoints": sum(e["event"] == "checkpoint" for e in events),
        "step_s_executed": round(executed, 2),
    }


def rollback_skips(events: list[dict]) -> list[tuple[int, int]]:
    return [tuple(e["skip"]) for e in events if e["event"] == "rollback"]


if __name__ == "__main__":
    sys.exit(main())
