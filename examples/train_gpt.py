"""A tiny GPT-like model trained on CPU through StreamingDataLoader with every recovery hook on.

    python examples/train_gpt.py --make-data /tmp/tok          # write a token dataset once
    streamshard launch --standalone --nproc-per-node=2 examples/train_gpt.py --data /tmp/tok --out /tmp/run

Under ``streamshard launch`` (or ``torchrun --max-restarts``) a killed or hung worker restarts the
group; every start resumes from the newest verified checkpoint and the journal (``<out>/journal``). Faults come from ``STREAMSHARD_FAULTS`` (see
streamshard/recovery/faultplan.py). Per rank, ``<out>/consumed-rank<r>.jsonl`` gets one line per
training step: ``{"step", "data_step", "ids", "update", "dur", "t"}``; a step re-run after a
restart or rollback appends a new line, so the last line of a step is the one that counts.
With ``--forensics`` a loss spike is re-run (streamshard/recovery/forensics.py): bad samples are
quarantined and the step is trained again (only that attempt is logged), a flaky rank exits 77.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import signal
import socket
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from streamshard import StreamingDataLoader, StreamingDataset, detect_world
from streamshard.recovery import (
    Exit, FakeProbe, GuardConfig, Journal, PersistenceConfig, PolicyConfig, Recovery, Rollback,
    SkipUpdate, SpikeConfig, Watchdog, WatchdogConfig, available_probes, exitcodes, fault_plan_from_env,
)
from streamshard.recovery import inprocess
from streamshard.recovery.checkpoint import CheckpointManager
from streamshard.recovery.classify import exit_on_fault
from streamshard.recovery.faultplan import injected_hang
from streamshard.recovery.goodput import EffectiveTime, job_start
from streamshard.recovery.heartbeat import Heartbeat
from streamshard.recovery.lr import install_lr_scale
from streamshard.recovery.pg import init_process_group
from streamshard.recovery.rngstate import rng_state, set_rng_state
from streamshard.recovery.forensics import ForensicsConfig
from streamshard.recovery.forensics import act as forensics_act
from streamshard.recovery.forensics import investigate_step
from streamshard.recovery.slowdown import StragglerConfig


def make_data(path: str, samples: int, seq: int, vocab: int, poison: frozenset = frozenset()) -> None:
    """Arithmetic token sequences ``(a + k*i) % (vocab - 1)``: learnable, so the loss falls steadily.
    Token ``vocab - 1`` never occurs, so training drives its probability towards 0; a sample in
    ``poison`` is a document of that one token repeated: every target costs a huge loss."""
    from streamshard import ShardWriter

    rng = np.random.default_rng(0)
    with ShardWriter(path, columns={"id": "int64", "tokens": f"uint16[{seq + 1}]"}, shard_size="16KB",
                     block_size="4KiB") as w:
        for i in range(samples):
            a, k = int(rng.integers(vocab - 1)), int(rng.integers(1, 8))
            clean = (a + k * np.arange(seq + 1)) % (vocab - 1)
            tokens = np.full(seq + 1, vocab - 1) if i in poison else clean
            w.write({"id": i, "tokens": tokens.astype(np.uint16)})


class TinyGPT(nn.Module):
    def __init__(self, vocab: int, seq: int, d: int, layers: int):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(seq, d)
        layer = nn.TransformerEncoderLayer(d, nhead=2, dim_feedforward=2 * d, dropout=0.0, batch_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(seq), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.tok(x) + self.pos(torch.arange(x.shape[1]))
        return self.head(self.blocks(h, mask=self.mask, is_causal=True))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--make-data", metavar="DIR", help="write a token dataset to DIR and exit")
    p.add_argument("--samples", type=int, default=20000)
    p.add_argument("--poison", default="", help="with --make-data: comma-separated sample ids to poison")
    p.add_argument("--forensics", action="store_true", help="re-run a spiking step: quarantine bad "
                   "samples (data) or exit 77 (hardware); see streamshard/recovery/forensics.py")
    p.add_argument("--data", help="token dataset directory")
    p.add_argument("--out", help="checkpoints, journal, consumed ids, stack dumps")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=16)
    p.add_argument("--vocab", type=int, default=64)
    p.add_argument("--d-model", type=int, default=32)
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=17)
    p.add_argument("--ckpt-every", type=int, default=10)
    p.add_argument("--keep", type=int, default=3)
    p.add_argument("--rollback-margin", type=int, default=5)
    p.add_argument("--skip-before", type=int, default=0)
    p.add_argument("--spike-window", type=int, default=32)
    p.add_argument("--spike-threshold", type=float, default=8.0)
    p.add_argument("--wd-floor", type=float, default=60.0,
                   help="in-process watchdog floor per phase, seconds (only without `streamshard launch`, "
                        "whose external heartbeat monitor replaces it)")
    p.add_argument("--wd-initial", type=float, default=600.0, help="in-process watchdog timeout before calibration")
    p.add_argument("--sync-ckpt", action="store_true", help="blocking checkpoint saves (default: async)")
    p.add_argument("--straggler-every", type=int, default=5, help="gather busy times every N steps")
    p.add_argument("--kernel-log", help="kernel log file to watch for XIDs (e.g. /var/log/kern.log)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.make_data:
        make_data(args.make_data, args.samples, args.seq, args.vocab,
                  frozenset(int(x) for x in args.poison.split(",") if x))
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    rounds = None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if inprocess.enabled():  # under `streamshard launch --in-process`: survive a peer's death
            rounds = inprocess.Rounds()
            rounds.join()
        else:
            init_process_group()  # a store key space per restart attempt / rendezvous round
    world = detect_world()
    rank = world.rank
    journal = Journal(out / "journal", rank=rank)
    with exit_on_fault(journal):  # CUDA/NCCL/gloo/OOM errors -> 75/77/78 for the launcher
        return train(args, out, world, journal, rounds)


def train(args, out: Path, world, journal: Journal, rounds) -> int:
    rank, W = world.rank, world.world_size
    log = (lambda msg: print(f"[rank{rank}] {msg}", flush=True))
    plan, fired = fault_plan_from_env(os.environ), journal.fired()
    cfg = GuardConfig(
        loss=SpikeConfig(window=args.spike_window, threshold=args.spike_threshold, min_samples=8),
        grad_norm=None,  # gradients are clipped; the loss carries the signal in this example
        persistence=PersistenceConfig(3),
        policy=PolicyConfig(rollback_margin=args.rollback_margin, skip_before=args.skip_before, repeat_window=20),
        straggler=StragglerConfig(window=3, ratio=1.3, min_delta=0.02),
        forensics=ForensicsConfig(enabled=args.forensics),
    )
    def make_ckpt() -> CheckpointManager:  # per process-group round: it owns a gloo subgroup
        return CheckpointManager(str(out / "ckpt"), world=world, keep=args.keep, async_save=not args.sync_ckpt,
                                 valid=lambda r: guard.ledger.is_valid(r), journal=journal if rank == 0 else None)

    ckpt = make_ckpt()
    guard = Recovery(cfg, journal=journal, checkpoints=lambda: ckpt.refs(), writer=rank == 0, world_size=W, log=log)
    if (stop := guard.startup()) is not None:
        log(f"journal holds a terminal decision: {stop.reason}")
        return stop.code
    goodput = EffectiveTime(job_start(journal, time.time()))

    hb = Heartbeat.from_env()  # under `streamshard launch`: watched from outside this process
    watchdog = None
    if hb.path is None:  # plain torchrun: fall back to the in-process watchdog thread
        def on_hang(phase: str, elapsed: float, timeout: float) -> None:
            journal.append("hang", code=exitcodes.HANG, phase=phase, elapsed=elapsed, timeout=timeout,
                           dump=str(dump_path))

        dump_path = out / f"hang-rank{rank}-pid{os.getpid()}.txt"
        wd_cfg = WatchdogConfig(floor={p: args.wd_floor for p in ("data", "step", "checkpoint_save",
                                                                    "checkpoint_load")},
                                initial=args.wd_initial, factor=10.0, min_samples=5, poll=0.1)
        watchdog = Watchdog(wd_cfg, str(dump_path), on_hang=on_hang).start()

    @contextmanager
    def phase(name: str):
        timed = watchdog is not None and name in ("data", "step", "checkpoint_save", "checkpoint_load")
        with hb.phase(name), (watchdog.phase(name) if timed else nullcontext()):
            yield

    fake = FakeProbe()
    probes = [fake, *available_probes(args.kernel_log, log=log)]

    torch.manual_seed(args.seed)
    model = TinyGPT(args.vocab, args.seq, args.d_model, args.layers)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    warmup = 10
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    install_lr_scale(opt, lambda: guard.lr_scale)  # the recovery LR cut, honoured by any scheduler
    ds = StreamingDataset(args.data, global_batch_size=args.global_batch, seed=args.seed, world=world)
    loader = StreamingDataLoader(ds)
    # the state at step 0, for a survivor of an in-process restart when no checkpoint exists yet
    initial = copy.deepcopy((model.state_dict(), opt.state_dict(), sched.state_dict(), loader.state_dict(),
                             rng_state(), guard.state_dict()))

    def restore(max_step: int | None) -> int:
        """Newest verified checkpoint at or before ``max_step`` (damaged ones are quarantined)."""
        with phase("checkpoint_load"):
            got = ckpt.load_latest(max_step=max_step, model=model, optimizer=opt, scheduler=sched, loader=loader)
        if got is None:
            if max_step is not None:
                raise SystemExit(f"no valid checkpoint at or before step {max_step}")
            for obj, state in zip((model, opt, sched, loader), initial[:4]):
                obj.load_state_dict(copy.deepcopy(state))
            set_rng_state(initial[4])
            guard.load_state_dict(initial[5])  # detector windows; the ledger is merged, never lost
            guard.apply_to_loader(loader)
            goodput.discard()
            return 0
        info, extra = got
        guard.load_state_dict(extra["recovery"])
        guard.apply_to_loader(loader)
        goodput.productive_s = float(extra.get("productive_s", 0.0))
        goodput.discard()
        return info.step

    step = 0
    consumed_fd = os.open(out / f"consumed-rank{rank}.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    while True:  # one pass per process-group round (more than one only with in-process restart)
        try:
            step = restore(None)
            attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
            journal.append("start", step=step, world_size=W, pid=os.getpid(), attempt=attempt,
                           round=rounds.round if rounds is not None else None)
            params = list(model.parameters())
            it = iter(loader)
            busy_sum, busy_n = 0.0, 0

            def per_sample_loss(tokens: torch.Tensor) -> torch.Tensor:
                logits = model(tokens[:, :-1])
                return F.cross_entropy(logits.reshape(-1, args.vocab), tokens[:, 1:].reshape(-1),
                                       reduction="none").view(tokens.shape[0], -1).mean(1)

            def rerun(keys) -> list[float]:
                """Forensics: re-read these samples by id (O(1) seek) and re-run them, forward only."""
                rows = [ds.datasets[s][i]["tokens"].astype(np.int64) for s, i in keys]
                tokens = torch.from_numpy(np.stack(rows))
                with torch.no_grad():
                    losses = per_sample_loss(tokens)
                for f in plan.at("spike", data_step, rank=0):  # injected data faults follow the data
                    losses = losses * f.value
                if plan.at("nan", data_step, rank=0):
                    losses = losses * float("nan")
                return losses.tolist()

            def gather(value) -> list:
                if W == 1:
                    return [value]
                out: list = [None] * W
                with phase("collective"):
                    dist.all_gather_object(out, value)
                return out

            def fire_once(kind: str) -> bool:
                for f in plan.at(kind, step, rank):
                    if f.key not in fired:
                        journal.append("fault", key=f.key, step=step)  # fsynced before the fault happens
                        fired.add(f.key)
                        return True
                return False

            def stop(code: int, reason: str):
                log(f"exit {code} ({exitcodes.describe(code)}): {reason}")
                if watchdog is not None:
                    watchdog.stop()
                os._exit(code)

            while step < args.steps:
                t0 = time.perf_counter()
                hb.step = step
                with phase("data"):
                    try:
                        batch = next(it)
                    except StopIteration:
                        it = iter(loader)
                        batch = next(it)
                data_step = loader.last_step
                ids = batch["id"].tolist()
                if fire_once("kill"):
                    os.kill(os.getpid(), signal.SIGKILL)
                if fire_once("corrupt"):  # bit rot in the newest checkpoint, then a crash: the restart must notice
                    ckpt.wait()
                    newest = Path(ckpt.list()[-1].path)
                    victim = sorted(newest.glob("*.distcp"))[0]
                    raw = bytearray(victim.read_bytes())
                    raw[len(raw) // 2] ^= 0x10
                    victim.write_bytes(bytes(raw))
                    os.kill(os.getpid(), signal.SIGKILL)
                if fire_once("xid"):
                    fake.inject_xid(int(next(f.value for f in plan.at("xid", step, rank))))
                with phase("step"):
                    if fire_once("hang"):
                        injected_hang(3600.0, time.sleep)
                    for f in plan.at("slow", step, rank):
                        time.sleep(f.value)
                    tokens = batch["tokens"].long()
                    loss = per_sample_loss(tokens).mean()
                    for f in plan.at("flaky", step, rank):  # a flaky device (fires once): not the data
                        if fire_once("flaky"):
                            loss = loss * f.value
                    for f in plan.at("spike", data_step, rank=0):  # data faults follow the data, not the rank
                        loss = loss * f.value
                    if plan.at("nan", data_step, rank=0):
                        loss = loss * float("nan")
                    opt.zero_grad(set_to_none=False)
                    loss.backward()
                    busy = time.perf_counter() - t0  # before the all-reduce, which equalizes ranks
                    flat = torch.cat([p.grad.reshape(-1) for p in params] + [loss.detach().reshape(1)])
                    if W > 1:
                        with phase("collective"):  # waiting for peers: see heartbeat.collective_grace
                            dist.all_reduce(flat)
                        flat /= W
                    offset = 0
                    for p in params:
                        p.grad.copy_(flat[offset:offset + p.numel()].view_as(p))
                        offset += p.numel()
                    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, 1.0))
                    busy_sum, busy_n = busy_sum + busy, busy_n + 1
                    if W > 1 and (step + 1) % args.straggler_every == 0:  # a collective: inside a watched phase
                        gathered: list = [None] * W
                        with phase("collective"):
                            dist.all_gather_object(gathered, busy_sum / busy_n)
                        guard.observe_ranks(step + 1, [float(x) for x in gathered])
                        busy_sum, busy_n = 0.0, 0
                    action = guard.observe(step, data_step=data_step, loss=float(flat[-1]), grad_norm=grad_norm,
                                           step_time=busy)
                    verdict = None
                    if cfg.forensics.enabled and isinstance(action, SkipUpdate):  # weights: still pre-update
                        decision = investigate_step(
                            guard=guard, loader=loader, data_step=data_step, local_loss=float(loss.detach()),
                            local_count=len(ids), rank=rank, world_size=W, host=socket.gethostname(),
                            rerun=rerun, gather=gather, cfg=cfg.forensics, clock=time.perf_counter)
                        verdict = forensics_act(decision, guard=guard, loader=loader, step=step,
                                                data_step=data_step, cfg=cfg.forensics)
                        log(f"forensics at step {step} (data step {data_step}): {decision.verdict}, rank "
                            f"{decision.suspect}, culprits {list(decision.culprits)}: "
                            f"{decision.evidence.get('reason')}")
                    if not isinstance(action, (SkipUpdate, Rollback, Exit)):
                        opt.step()
                    if not isinstance(action, (Rollback, Exit)) and verdict != "retrain":
                        sched.step()
                if verdict == "retrain":  # culprits quarantined, loader rewound: train this step again
                    continue
                if verdict == "exit":
                    stop(exitcodes.REPLACE_NODE, "forensics: the spike did not reproduce on another rank")
                if isinstance(action, Exit):
                    stop(action.code, action.reason)
                if isinstance(action, Rollback):
                    log(f"rollback to step {action.to_step}, skip data steps {action.skip}, "
                        f"lr x{action.lr_scale}: {action.reason}")
                    step = restore(action.to_step)
                    continue
                dur = time.perf_counter() - t0
                applied = not isinstance(action, SkipUpdate)
                goodput.step(dur, applied)
                rec = {"step": step, "data_step": data_step, "ids": ids, "update": applied,
                       "loss": float(flat[-1]) if math.isfinite(float(flat[-1])) else None, "dur": dur, "t": time.time()}
                os.write(consumed_fd, (json.dumps(rec) + "\n").encode())
                step += 1
                health = guard.observe_health(step, [e for p in probes for e in p.poll()])
                if isinstance(health, Exit):
                    stop(health.code, health.reason)
                if step % args.ckpt_every == 0 and guard.healthy:
                    with phase("checkpoint_save"):
                        goodput.commit()  # the steps so far are in this checkpoint (async: once it finishes)
                        ckpt.save(step, model=model, optimizer=opt, scheduler=sched, loader=loader, data_step=loader.step,
                                  generation=guard.ledger.generation,
                                  extra={"recovery": guard.state_dict(), "productive_s": goodput.productive_s})
                    if rank == 0:
                        g = goodput.record()
                        journal.append("goodput", step=step, sync=False, **g)  # a figure: no fsync in the loop
                        log(f"step {step}: effective training time {100 * g['effective']:.1f}% "
                            f"({g['productive_s']:.1f} s productive of {g['wall_s']:.1f} s wall)")
            break
        except Exception as e:
            if rounds is None or not inprocess.recoverable(e):
                raise
            log(f"peer failure in round {rounds.round} at step {step} ({type(e).__name__}): "
                f"re-forming the group in this process")
            journal.append("inprocess_restart", round=rounds.round, step=step, error=f"{type(e).__name__}: {e}"[:300])
            ckpt.abandon()
            with phase("reform"):
                rounds.reform()  # waits for the respawned rank to join the next round
                ckpt = make_ckpt()
            goodput.discard()
    with phase("checkpoint_save"):
        ckpt.wait()
    if watchdog is not None:
        watchdog.stop()
    if rank == 0:
        journal.append("goodput", step=step, **goodput.record())
    journal.append("done", step=step, counts=guard.counts)
    os.close(consumed_fd)
    if W > 1:
        dist.barrier()
        dist.destroy_process_group()
    return exitcodes.OK


if __name__ == "__main__":
    sys.exit(main())
