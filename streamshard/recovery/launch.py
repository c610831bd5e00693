"""``streamshard launch``: torchrun's elastic agent, acting on the recovery layer's exit codes.

    streamshard launch [torchrun flags] [--journal DIR] train.py [args]

The flags are ``torch.distributed.run``'s own parser (``--nnodes MIN:MAX``, ``--nproc-per-node``,
``--rdzv-backend c10d``, ``--rdzv-endpoint``, ``--max-restarts``, ...); the configuration comes from
``torch.distributed.run.config_from_args`` and the agent is a ``LocalElasticAgent`` subclass that
overrides the agent's documented extension points (``_initialize_workers``, ``_start_workers``,
``_monitor_workers``). Differences from torchrun, all for recovery with default settings:

- exit codes of workers: **75** (and any other failure) restart in place within
  ``--max-restarts`` (default here 3, torchrun's is 0; the budget refills once the workers have
  run 10 minutes without a fault, so it bounds crash loops, not a long job's lifetime); **77** this node must not be used again:
  its agent stops its workers and leaves with 77 without closing the rendezvous, the other agents
  re-rendezvous (``--nnodes MIN:MAX``) with the remaining nodes or a spare; **78** stop every node:
  a ``stop`` key goes into a control store at the rendezvous endpoint, every agent that sees it
  (polled each second) stops its workers and exits 78, the rendezvous is closed, no restarts.
- spares: agents beyond ``MAX`` nodes wait in the c10d rendezvous (torch's redundancy list) and
  join the next round when a node leaves. A departed node is dropped after
  ``keep_alive_interval * keep_alive_max_attempt`` seconds; defaults here 1 s x 3 (torch: 5 x 3),
  ``last_call_timeout`` 5 s (torch: 30 s), unless given in ``--rdzv-conf``.
- a health check (NVML, ``--kernel-log``) before each (re)start: a fatal verdict exits 77 or 78
  instead of starting workers on a bad node.
- an external heartbeat monitor (:mod:`heartbeat`) in the agent process watches every worker; a hung
  worker is stack-dumped and killed, then restarted like a failed one (journaled as ``hang``, 76).
- with ``--journal DIR`` the agent appends ``launch``, ``worker_exit``, ``hang``, ``health`` and
  ``stop`` records to ``DIR/agent<pid>.jsonl`` (the workers' journal directory).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import tempfile
import time
import uuid
from datetime import timedelta

from streamshard.recovery import exitcodes
from streamshard.recovery.heartbeat import ENV_DIR, Hang, HeartbeatConfig, HeartbeatMonitor
from streamshard.recovery.journal import Journal

log = logging.getLogger(__name__)
STOP_KEY = "stop"
ROUND_KEY = "streamshard_round"
ENV_ROUND = "STREAMSHARD_ROUND_ID"
RESTART_WINDOW_S = 600.0  # workers healthy this long since their last (re)start: the budget refills
RDZV_DEFAULTS = {"keep_alive_interval": 1, "keep_alive_max_attempt": 3, "last_call_timeout": 5}


class Terminal(Exception):
    """This agent must stop with ``code`` (77 or 78) instead of restarting."""

    def __init__(self, code: int, reason: str):
        super().__init__(reason)
        self.code, self.reason = code, reason


def build_parser():
    from torch.distributed.run import get_args_parser

    p = get_args_parser()
    p.prog = "streamshard launch"
    p.set_defaults(max_restarts=3)
    g = p.add_argument_group("streamshard recovery")
    g.add_argument("--journal", help="journal directory shared with the workers (agent records go there)")
    g.add_argument("--heartbeat-dir", help="heartbeat files and stack dumps (default: a temp dir)")
    g.add_argument("--no-heartbeat", action="store_true", help="do not watch workers for hangs")
    g.add_argument("--hang-floor", type=float, default=HeartbeatConfig.floor,
                   help="shortest hang timeout once a phase is calibrated, seconds (default 3)")
    g.add_argument("--kernel-log", help="kernel log to scan for XIDs before each (re)start")
    g.add_argument("--in-process", action="store_true",
                   help="in-process restart: a per-rank keeper respawns a dead rank, the others re-form the "
                        "group without restarting (the script uses streamshard.recovery.inprocess)")
    g.add_argument("--exclude-stragglers", action="store_true",
                   help="at a restart, leave (exit 77) if the journal names this node's ranks as persistent "
                        "stragglers (needs --journal)")
    return p


class RestartBudget:
    """``--max-restarts`` per healthy stretch: the budget refills once the workers have run ``window``
    seconds since their last (re)start without a fault, so it bounds crash loops, not a long job's
    lifetime (a week-long job must not die of its 4th transient fault). ``clock`` is injectable."""

    def __init__(self, max_restarts: int, window: float = RESTART_WINDOW_S, clock=time.monotonic):
        if window <= 0:
            raise ValueError(f"restart window must be positive, got {window}")
        self.max_restarts, self.window, self._clock = max_restarts, window, clock
        self._since = clock()

    def started(self) -> None:
        """The workers were (re)started now."""
        self._since = self._clock()

    def healthy_for(self) -> float:
        return self._clock() - self._since

    def refill(self, remaining: int) -> int | None:
        """The new remaining count if the budget refills now (workers healthy, some spent), else None."""
        if remaining < self.max_restarts and self.healthy_for() > self.window:
            return self.max_restarts
        return None


def persistent_straggler(records, my_ranks) -> str | None:
    """Why this node should leave: the journal's latest straggler verdict names one of ``my_ranks``
    (the global ranks this node ran last round) as persistent; None otherwise."""
    last = None
    for r in records:
        if r.get("event") == "straggler":
            last = r
    if last is None:
        return None
    mine = sorted(set(last.get("persistent", [])) & set(my_ranks))
    if not mine:
        return None
    return (f"rank(s) {mine} persistently slow at step {last.get('step')}: busy "
            f"{[last['per_rank'][r] for r in mine if r < len(last.get('per_rank', []))]} s vs typical "
            f"{last.get('typical')} s")


def _cgroup_oom_kills() -> int:
    """The cgroup v2 ``oom_kill`` counter of this process's cgroup (0 where not readable)."""
    try:
        with open("/proc/self/cgroup") as f:
            rel = f.read().strip().split("::", 1)[-1]
        with open(f"/sys/fs/cgroup{rel}/memory.events") as f:
            for line in f:
                if line.startswith("oom_kill "):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _make_agent_class():
    from torch.distributed.elastic.agent.server.api import RunResult, WorkerState
    from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent

    class StreamshardAgent(LocalElasticAgent):
        """LocalElasticAgent + exit-code verdicts, health check, heartbeat monitor, journal."""

        def __init__(self, *a, journal: Journal | None, hb_dir: str, monitor: HeartbeatMonitor | None,
                     probes: list, control, exclude_slow: bool = False, clock=time.monotonic, **kw):
            super().__init__(*a, **kw)
            self._budget = RestartBudget(self._worker_group.spec.max_restarts, clock=clock)
            self._exclude_slow = exclude_slow
            self._journal, self._hb_dir, self._hb, self._probes = journal, hb_dir, monitor, probes
            self._control = control
            self._hangs: dict[int, Hang] = {}
            self._next_stop_check = 0.0
            self._oom0 = _cgroup_oom_kills()
            if monitor is not None:
                monitor._on_hang = self._on_hang

        def note(self, event: str, **fields) -> None:
            log.info("streamshard launch: %s %s", event, fields)
            if self._journal is not None:
                self._journal.append(event, node=getattr(self._worker_group, "group_rank", None), **fields)

        def _on_hang(self, hang: Hang) -> None:
            self._hangs[int(hang.key)] = hang
            rank = self._worker_group.workers[int(hang.key)].global_rank
            self.note("hang", code=exitcodes.HANG, worker_rank=rank, pid=hang.pid, phase=hang.phase,
                      step=hang.step, elapsed=hang.elapsed, timeout=hang.timeout, dump=hang.dump)

        def _initialize_workers(self, worker_group) -> None:
            self._check_health()
            if self._exclude_slow and self._journal is not None and worker_group.workers:
                why = persistent_straggler(Journal(self._journal.path).records(),
                                           [w.global_rank for w in worker_group.workers])
                if why is not None:
                    raise Terminal(exitcodes.REPLACE_NODE, f"straggler exclusion at restart: {why}")
            super()._initialize_workers(worker_group)

        def _check_health(self) -> None:
            for probe in self._probes:
                for e in probe.poll():
                    c = e.classification
                    self.note("health", source=e.source, kind=e.kind, device=e.device, detail=e.detail,
                              verdict=c.verdict if c else None, reason=c.reason if c else None)
                    if c is not None and c.exit_code in (exitcodes.REPLACE_NODE, exitcodes.DO_NOT_REQUEUE):
                        raise Terminal(c.exit_code, f"health check before start: {e.source} {e.device}: {c.reason}")

        def _start_workers(self, worker_group):
            for name in os.listdir(self._hb_dir):
                if name.endswith(".hb"):
                    os.unlink(os.path.join(self._hb_dir, name))
            self._hangs.clear()
            # one id per rendezvous round, the same on every node (restart counts differ between a
            # restarted node and a spare that just joined): workers name their store keys after it
            store = worker_group.store
            if worker_group.group_rank == 0:
                store.set(ROUND_KEY, uuid.uuid4().hex)
            os.environ[ENV_ROUND] = store.get(ROUND_KEY).decode()
            pids = super()._start_workers(worker_group)
            self._budget.started()
            if self._hb is not None:
                self._hb.unwatch_all()
                for local, pid in pids.items():
                    self._hb.watch(str(local), pid, os.path.join(self._hb_dir, f"local{local}.hb"),
                                   os.path.join(self._hb_dir, f"stacks-local{local}-pid{pid}.txt"))
            self.note("start_workers", pids=list(pids.values()),
                      ranks=[w.global_rank for w in worker_group.workers], world_size=worker_group.workers[0].world_size
                      if worker_group.workers else 0, restart_count=self._worker_group.spec.max_restarts
                      - self._remaining_restarts)
            return pids

        def _stop_requested(self) -> bool:
            now = time.monotonic()
            if self._control is None or now < self._next_stop_check:
                return False
            self._next_stop_check = now + 1.0
            try:
                if self._control.check([STOP_KEY]):
                    self._control.add("stop_ack", 1)
                    return True
            except Exception as e:  # the control store went away: the job is being torn down
                log.warning("control store unreachable (%s)", e)
            return False

        def _stop_within(self, seconds: float) -> bool:
            if self._control is None:
                return False
            for _ in range(int(seconds / 0.2)):  # bounded
                self._next_stop_check = 0.0
                if self._stop_requested():
                    return True
                time.sleep(0.2)
            return False

        def _monitor_workers(self, worker_group):
            result = super()._monitor_workers(worker_group)
            refill = self._budget.refill(self._remaining_restarts) if result.state == WorkerState.HEALTHY else None
            if refill is not None:
                self.note("restart_budget_reset", healthy_s=round(self._budget.healthy_for(), 1),
                          remaining_before=self._remaining_restarts)
                self._remaining_restarts = refill
            if self._stop_requested():
                raise Terminal(exitcodes.DO_NOT_REQUEUE, "another node stopped the job (exit 78)")
            if result.state not in (WorkerState.FAILED, WorkerState.UNHEALTHY):
                return result
            codes = {}
            for rank, f in result.failures.items():
                local = next(w.local_rank for w in worker_group.workers if w.global_rank == rank)
                hang = self._hangs.get(local)
                codes[rank] = exitcodes.HANG if hang is not None else f.exitcode
                self.note("worker_exit", worker_rank=rank, exitcode=f.exitcode, name=exitcodes.describe(codes[rank]),
                          hang=hang is not None)
            if exitcodes.DO_NOT_REQUEUE in codes.values():
                self._stop_everyone(worker_group)
                raise Terminal(exitcodes.DO_NOT_REQUEUE, f"worker exit codes {codes}")
            if exitcodes.REPLACE_NODE in codes.values():
                raise Terminal(exitcodes.REPLACE_NODE, f"worker exit codes {codes}: leave, do not come back")
            if self._stop_within(2.0):  # a peer's 78 often reaches our workers first as a broken collective
                raise Terminal(exitcodes.DO_NOT_REQUEUE, "another node stopped the job (exit 78)")
            if -signal.SIGKILL in codes.values() and _cgroup_oom_kills() > self._oom0:
                raise Terminal(exitcodes.DO_NOT_REQUEUE, "the kernel OOM killer killed a worker (cgroup oom_kill "
                                                         "grew): restarting repeats it")
            return RunResult(state=WorkerState.FAILED, failures=result.failures)

        def _stop_everyone(self, worker_group) -> None:
            if self._control is None:
                return
            try:
                self._control.set(STOP_KEY, str(exitcodes.DO_NOT_REQUEUE))
                others = worker_group.group_world_size - 1
                for _ in range(50):  # bounded (5 s): the store may live in this process
                    if int(self._control.add("stop_ack", 0)) >= others:
                        break
                    time.sleep(0.1)
            except Exception as e:
                log.warning("could not tell the other nodes to stop: %s", e)

    return StreamshardAgent


def _control_store(config):
    """A client of the c10d rendezvous endpoint's store, under a run-specific prefix (or None)."""
    import torch.distributed as dist

    if config.rdzv_backend != "c10d" or not config.rdzv_endpoint:
        return None
    host, _, port = config.rdzv_endpoint.rpartition(":")
    if not port or int(port) == 0:
        return None
    try:
        base = dist.TCPStore(host or "localhost", int(port), is_master=False, timeout=timedelta(seconds=30))
    except Exception as e:
        log.warning("no control store at %s (%s): exit 78 will not reach other nodes", config.rdzv_endpoint, e)
        return None
    return dist.PrefixStore(f"streamshard.launch.{config.run_id}", base)


def launch(config, entrypoint, args: list, opts) -> int:
    """Run the agent (one node) and return the launcher's exit code."""
    from torch.distributed.elastic import rendezvous as rdzv
    from torch.distributed.elastic.agent.server.api import WorkerSpec
    from torch.distributed.elastic.rendezvous import registry as rdzv_registry
    from torch.distributed.elastic.rendezvous.api import RendezvousClosedError
    from torch.distributed.launcher.api import _get_addr_and_port

    if not config.run_id:
        config.run_id = str(uuid.uuid4().int)
    for k, v in RDZV_DEFAULTS.items():
        config.rdzv_configs.setdefault(k, v)
    if config.max_nodes > 1:
        # torch 2.13 caches the shared worker store's address on non-rank-0 nodes across rounds; when
        # rank 0's node leaves (77) and a spare takes rank 0, the others would dial the departed
        # node's store. Opting out makes every round publish its master address afresh.
        os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    params = rdzv.RendezvousParameters(backend=config.rdzv_backend, endpoint=config.rdzv_endpoint,
                                       run_id=config.run_id, min_nodes=config.min_nodes, max_nodes=config.max_nodes,
                                       local_addr=config.local_addr, **config.rdzv_configs)
    master_addr, master_port = _get_addr_and_port(params)
    hb_dir = opts.heartbeat_dir or tempfile.mkdtemp(prefix=f"streamshard-hb-{os.getpid()}-")
    os.makedirs(hb_dir, exist_ok=True)
    os.environ[ENV_DIR] = hb_dir
    for k, v in (("TORCH_NCCL_TRACE_BUFFER_SIZE", "2000"), ("TORCH_NCCL_DUMP_ON_TIMEOUT", "1"),
                 ("TORCH_FR_DUMP_TEMP_FILE", os.path.join(hb_dir, "nccl_trace_rank_"))):
        os.environ.setdefault(k, v)  # NCCL's flight recorder, dumped by NCCL's own watchdog on a timeout
    journal = Journal(opts.journal, rank=os.getpid(), role="agent") if opts.journal else None
    if opts.journal:
        os.environ["STREAMSHARD_JOURNAL"] = opts.journal
    os.environ["STREAMSHARD_HANG_FLOOR"] = str(opts.hang_floor)
    in_process = getattr(opts, "in_process", False)  # then each rank's keeper watches its heartbeat
    monitor = None if (opts.no_heartbeat or in_process) else HeartbeatMonitor(
        HeartbeatConfig(floor=opts.hang_floor)).start()
    from streamshard.recovery.health import available_probes

    probes = available_probes(opts.kernel_log, log=log.info)
    spec = WorkerSpec(role=config.role, local_world_size=config.nproc_per_node, entrypoint=entrypoint,
                      args=tuple(args), rdzv_handler=rdzv_registry.get_rendezvous_handler(params),
                      max_restarts=config.max_restarts, monitor_interval=config.monitor_interval,
                      master_addr=master_addr, master_port=master_port, local_addr=config.local_addr)
    control = _control_store(config)
    agent = _make_agent_class()(spec=spec, logs_specs=config.logs_specs, start_method=config.start_method,
                                log_line_prefix_template=config.log_line_prefix_template,
                                journal=journal, hb_dir=hb_dir, monitor=monitor, probes=probes, control=control,
                                exclude_slow=opts.exclude_stragglers)
    if journal is not None:
        journal.append("launch", nnodes=[config.min_nodes, config.max_nodes], nproc=config.nproc_per_node,
                       max_restarts=config.max_restarts, pid=os.getpid())
    close_rdzv, code = True, 1
    try:
        result = agent.run()
        if result is None:  # a spare that was never needed: the rendezvous closed under it
            code = exitcodes.OK
        elif result.is_failed():
            code = max((f.exitcode for f in result.failures.values()), default=1)
            code = code if code > 0 else 1
        else:
            code = exitcodes.OK
    except Terminal as t:
        code = t.code
        close_rdzv = t.code == exitcodes.DO_NOT_REQUEUE  # 77: others go on without this node
        agent.note("stop", code=t.code, name=exitcodes.describe(t.code), reason=t.reason)
        print(f"streamshard launch: exit {t.code} ({exitcodes.describe(t.code)}): {t.reason}", file=sys.stderr)
    except RendezvousClosedError:
        code = exitcodes.DO_NOT_REQUEUE  # closed while we wanted to restart: another node stopped the job
        agent.note("stop", code=code, name=exitcodes.describe(code), reason="rendezvous closed by another node")
    finally:
        if monitor is not None:
            monitor.stop()
        if close_rdzv:
            spec.rdzv_handler.shutdown()
    return code


def exit_now(code: int) -> None:
    """Leave the process with ``code`` once the agent is done: flush, then ``os._exit``, skipping the
    interpreter's teardown of torch's modules (1-4 s of CPU on a 2-core machine, for nothing)."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def main(argv=None, *, exit_process: bool = False) -> int:
    """``streamshard launch``; with ``exit_process`` (the CLI) the process ends here (:func:`exit_now`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    zygote = _early_zygote(argv)
    try:
        code = _main(argv)
    finally:
        if zygote is not None:
            zygote.close()
    if exit_process:
        exit_now(code)
    return code


class _NodeZygote:
    """The node's warm standby for ``--in-process`` (:mod:`zygote`), started before this agent imports
    torch so the two imports overlap; the keepers find it through ``STREAMSHARD_ZYGOTE_SOCKET``."""

    def __init__(self):
        from streamshard.recovery.standby import start_zygote
        from streamshard.recovery.zygote import ENV_SOCKET

        self.dir = tempfile.mkdtemp(prefix="streamshard-zygote-")
        path = os.path.join(self.dir, "sock")
        self.proc = start_zygote(path, None, os.environ)
        os.environ[ENV_SOCKET] = path

    def close(self) -> None:
        import shutil

        from streamshard.recovery.zygote import ENV_SOCKET

        os.environ.pop(ENV_SOCKET, None)
        self.proc.terminate()  # its ranks die with it (PR_SET_PDEATHSIG); the keepers are gone by now
        try:
            self.proc.wait(timeout=5.0)
        except Exception:  # noqa: BLE001 - TimeoutExpired: it is killed below
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def _early_zygote(argv: list[str]) -> _NodeZygote | None:
    """Start the zygote if ``--in-process`` is among the launcher's flags (checked again after parsing:
    a script argument of that name only costs an idle zygote)."""
    from streamshard.recovery.standby import ENV_ZYGOTE

    if "--in-process" not in argv or os.environ.get(ENV_ZYGOTE, "1") == "0":
        return None
    try:
        return _NodeZygote()
    except OSError as e:
        log.warning("no warm standby (%s): ranks start cold", e)
        return None


def _main(argv) -> int:
    from torch.distributed.run import config_from_args, parse_min_max_nnodes

    args = build_parser().parse_args(argv)
    if args.standalone:
        args.rdzv_backend, args.rdzv_endpoint, args.rdzv_id = "c10d", "localhost:0", str(uuid.uuid4())
    elif args.rdzv_backend == "static" and not args.rdzv_endpoint and args.master_port is None:
        if parse_min_max_nnodes(args.nnodes)[1] == 1:
            args.rdzv_backend, args.rdzv_endpoint, args.rdzv_id = "c10d", "localhost:0", str(uuid.uuid4())
    if args.master_port is None:
        args.master_port = 29500
    config, cmd, cmd_args = config_from_args(args)
    if args.in_process:
        if not isinstance(cmd, str) or args.no_python or args.run_path or cmd_args[:1] != ["-u"]:
            build_parser().error("--in-process needs a Python training script (no --no-python / --run-path)")
        cmd_args = ["-u", "-m", "streamshard.recovery.keeper", *cmd_args[1:]]
    return launch(config, cmd, cmd_args, args)
