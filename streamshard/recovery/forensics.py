"""Spike forensics: re-run the spiking step to tell data from hardware, then act precisely.

When the loss of one step spikes (the ladder's first rung), and forensics is on:

1. **Suspect.** Every rank contributes its local (pre-all-reduce) loss; the rank with the largest
   one is the suspect (it holds the bad data, or its device computed garbage).
2. **Re-run** the suspect's device batch, forward only, with the same weights (the update of the
   spiking step has not been applied, so the live weights are the last good state) and the same
   samples (re-read by id, an O(1) seek): on the suspect rank and, when ``world_size > 1``, on
   another rank (:func:`pick_witness`: the next rank on another host, else the next rank). Both
   re-runs run at the same time: the cost is one forward pass of one device batch, plus two small
   gathers.
3. **Verdict.** A re-run *reproduces* the spike when the global loss rebuilt with it (the other
   ranks' original local losses plus the re-run) is still flagged by the loss detector. Reproduced on
   the other rank (or, alone, on the same rank): **data**. Not reproduced elsewhere: **hardware**
   (the suspect's device); journaled with the rank and host so the launcher can exclude it, and the
   job exits 77 (replace-node) unless configured to only skip the update.
4. **Culprits** (data verdict). From the re-run's per-sample losses, remove the highest-loss samples
   one at a time until the rebuilt global loss is no longer flagged: the removed samples are the
   culprits (one bad document costs one sample). When per-sample losses are not available,
   :func:`bisect_culprits` finds them by halving with a caller-supplied test.
5. **Act.** Quarantine the culprits from the spiking data step on (``loader.quarantine``; their
   positions are filled by the sampler's rule, so the batch stays full), rewind the loader to that
   data step and train it again: no innocent sample is lost and no rollback is needed. If removing
   ``max_culprits`` samples does not cure the batch, forensics gives up and the ladder goes on.

``investigate`` and the helpers are pure (numbers in, decision values out); ``investigate_step``
and ``act`` run one investigation with the collective (``gather``) and the model (``rerun``)
injected as narrow callables, so this module imports no torch: see examples/train_gpt.py.
Off by default (``ForensicsConfig.enabled``): the re-run holds a device batch's activations once more.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

from streamshard.errors import ConfigError
from streamshard.recovery import exitcodes
from streamshard.recovery.detectors import SpikeConfig, spike_score

DATA, HARDWARE, UNDECIDED = "data", "hardware", "undecided"


@dataclass(frozen=True)
class ForensicsConfig:
    enabled: bool = False  # a re-run costs one forward pass of one device batch on two ranks
    max_culprits: int = 8  # more bad samples than this in one device batch: not "a bad document"
    # A culprit's own loss must be at least this multiple of the baseline (the detector's median):
    # a bad document is an outlier by itself, so a borderline batch of merely hard samples (which
    # also "reproduces": the re-run is deterministic) never costs an innocent sample.
    min_culprit_ratio: float = 3.0
    hardware_exit: bool = True  # hardware verdict: exit 77 (replace-node); False: skip the update only
    max_bisect_calls: int = 64  # bound on the halving search's re-runs

    def __post_init__(self) -> None:
        if not self.min_culprit_ratio >= 1.0:
            raise ConfigError(f"min_culprit_ratio must be >= 1, got {self.min_culprit_ratio}")
        if self.max_culprits < 1 or self.max_bisect_calls < 1:
            raise ConfigError(f"max_culprits and max_bisect_calls must be >= 1, got "
                              f"{self.max_culprits} and {self.max_bisect_calls}")


@dataclass(frozen=True)
class Decision:
    """What the investigation found. ``culprits`` are ``(stream, sample_id)`` pairs."""

    verdict: str
    suspect: int
    culprits: tuple[tuple[int, int], ...] = ()
    evidence: dict = field(default_factory=dict, compare=False)

    @property
    def exit_code(self) -> int | None:
        return exitcodes.REPLACE_NODE if self.verdict == HARDWARE else None


def suspect_rank(local_losses: Sequence[float]) -> int:
    """The rank whose local loss is largest (a non-finite one first)."""
    if not local_losses:
        raise ConfigError("suspect_rank needs one local loss per rank, got none")
    return max(range(len(local_losses)), key=lambda r: (not math.isfinite(local_losses[r]), local_losses[r]))


class Flagger:
    """Would the loss detector flag this global loss? Reads the detector's window, never feeds it.
    Like the detector, a window shorter than ``min_samples`` flags only NaN/Inf (then only
    non-finite samples can be culprits: the baseline is NaN)."""

    def __init__(self, window: Iterable[float], cfg: SpikeConfig):
        self.window = [float(x) for x in window]
        self.cfg = cfg
        self.warm = len(self.window) >= cfg.min_samples

    def __call__(self, loss: float) -> bool:
        if not math.isfinite(loss):
            return True
        return self.warm and spike_score(loss, self.window, self.cfg)[0]

    @property
    def baseline(self) -> float:
        vals = sorted(self.window)
        return vals[len(vals) // 2] if self.warm else math.nan


def global_loss(rest_sum: float, rest_count: int, samples: Sequence[float]) -> float:
    """Mean loss over the global batch from the other ranks' sum and one rank's per-sample losses."""
    n = rest_count + len(samples)
    return (rest_sum + sum(samples)) / n if n else math.nan


def investigate(*, flag: Flagger, local_losses: Sequence[float], local_counts: Sequence[int],
                keys: Sequence[tuple[int, int]], same: Sequence[float] | None,
                other: Sequence[float] | None, cfg: ForensicsConfig = ForensicsConfig()) -> Decision:
    """Decide data or hardware for one spiking step (pure).

    ``local_losses[r]`` / ``local_counts[r]``: each rank's original mean loss and sample count;
    ``keys``: the suspect's samples; ``same`` / ``other``: per-sample losses of the suspect's batch
    re-run on the suspect rank and on another rank (``other`` None when ``world_size == 1``).
    """
    suspect = suspect_rank(local_losses)
    rest_sum = sum(l * c for r, (l, c) in enumerate(zip(local_losses, local_counts)) if r != suspect)
    rest_count = sum(c for r, c in enumerate(local_counts) if r != suspect)
    spike = global_loss(rest_sum, rest_count, [local_losses[suspect]] * local_counts[suspect])
    evidence = {"spike_loss": _num(spike), "baseline": _num(flag.baseline), "suspect": suspect,
                "local_losses": [_num(x) for x in local_losses]}
    if not flag(spike):  # e.g. the grad-norm detector fired: forensics judges loss spikes only
        return Decision(UNDECIDED, suspect, (), {**evidence, "reason": "the loss detector does not flag "
                                                 "this step's loss: nothing to re-run"})
    runs = {"same": same, "other": other}
    repro = {}
    for name, losses in runs.items():
        if losses is not None:
            g = global_loss(rest_sum, rest_count, losses)
            evidence[f"rerun_{name}_loss"] = _num(g)
            repro[name] = flag(g)
    evidence["reproduced"] = repro
    witness = "other" if other is not None else "same"
    if witness not in repro:
        return Decision(UNDECIDED, suspect, (), {**evidence, "reason": "no re-run"})
    if not repro[witness]:
        where = "on another rank" if witness == "other" else "on the same rank"
        return Decision(HARDWARE, suspect, (), {**evidence, "reason": f"the spike did not reproduce {where}"})
    per_sample = other if other is not None else same
    culprits = culprits_from_losses(per_sample, rest_sum, rest_count, flag, cfg.max_culprits,
                                    min_loss=cfg.min_culprit_ratio * flag.baseline)
    if culprits is None:
        return Decision(UNDECIDED, suspect, (), {**evidence, "reason": f"removing at most "
                        f"{cfg.max_culprits} samples with a loss >= {cfg.min_culprit_ratio} x baseline "
                        "does not cure the batch: not a few bad documents"})
    evidence["culprit_losses"] = [_num(per_sample[i]) for i in culprits]
    return Decision(DATA, suspect, tuple(tuple(keys[i]) for i in culprits),
                    {**evidence, "reason": "the spike reproduced on " +
                     ("another rank" if other is not None else "a re-run")})


def culprits_from_losses(losses: Sequence[float], rest_sum: float, rest_count: int, flag: Flagger,
                         max_culprits: int, *, min_loss: float = -math.inf) -> list[int] | None:
    """Indexes of the fewest highest-loss samples (each ``>= min_loss`` or non-finite) whose
    removal un-flags the global loss, or None."""
    order = sorted(range(len(losses)), key=lambda i: (not math.isfinite(losses[i]), losses[i]), reverse=True)
    order = [i for i in order if not math.isfinite(losses[i]) or losses[i] >= min_loss]
    for k in range(1, min(max_culprits, len(order)) + 1):
        removed = set(order[:k])
        if not flag(global_loss(rest_sum, rest_count, [x for j, x in enumerate(losses) if j not in removed])):
            return sorted(removed)
    return None


def bisect_culprits(items: Sequence, is_bad: Callable[[Sequence], bool], *, max_calls: int = 64) -> list:
    """The bad items of ``items`` by adaptive halving (group testing): ``is_bad(subset)`` re-runs
    a subset and says whether it still spikes. ``k`` culprits among ``n`` cost about
    ``2k log2(n/k)`` calls; raises ``ConfigError`` when ``max_calls`` would be exceeded."""
    calls = 0

    def test(group: Sequence) -> bool:
        nonlocal calls
        calls += 1
        if calls > max_calls:
            raise ConfigError(f"bisection needs more than max_calls={max_calls} re-runs")
        return bool(is_bad(group))

    def search(group: Sequence) -> list:
        if len(group) == 1:
            return list(group)
        half = len(group) // 2
        left, right = group[:half], group[half:]
        bad_left = test(left)
        bad_right = test(right) if bad_left else True  # the group is bad: if left is clean, right is
        return (search(left) if bad_left else []) + (search(right) if bad_right else [])

    items = list(items)
    return search(items) if items and test(items) else []


def pick_witness(suspect: int, hosts: Sequence[str]) -> int | None:
    """The rank that re-runs the suspect's batch: the next rank on another host if there is one,
    else the next rank; None when the job has one rank."""
    n = len(hosts)
    if n < 2:
        return None
    after = [(suspect + k) % n for k in range(1, n)]
    return next((r for r in after if hosts[r] != hosts[suspect]), after[0])


def quarantine_event(decision: Decision, *, step: int, data_step: int) -> dict:
    """The journal record of a data verdict; ``policy.apply_event`` folds it into the ledger."""
    return {"event": "quarantine", "step": step, "data_step": data_step,
            "entries": [[s, i, data_step] for s, i in decision.culprits]}


def verdict_event(decision: Decision, *, step: int, data_step: int, host: str) -> dict:
    """The journal record of any verdict (``rank``/``host`` name the suspect device)."""
    return {"event": "forensics", "step": step, "data_step": data_step, "verdict": decision.verdict,
            "rank": decision.suspect, "host": host, "culprits": [list(c) for c in decision.culprits],
            "evidence": decision.evidence}


def excluded_devices(records: Iterable[dict]) -> list[tuple[str, int]]:
    """``(host, rank)`` of every hardware verdict in a journal: what a launcher should exclude."""
    return [(str(r["host"]), int(r["rank"])) for r in records
            if r.get("event") == "forensics" and r.get("verdict") == HARDWARE]


def _num(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


# ---- one investigation, end to end (the caller supplies the model and the collective) --------

Gather = Callable[[object], list]  # all ranks' values, in rank order (all_gather_object)
Rerun = Callable[[Sequence[tuple[int, int]]], Sequence[float]]  # per-sample losses of these samples


def investigate_step(*, guard, loader, data_step: int, local_loss: float, local_count: int, rank: int,
                     world_size: int, host: str, rerun: Rerun, gather: Gather,
                     cfg: ForensicsConfig = ForensicsConfig(), clock: Callable[[], float] | None = None
                     ) -> Decision:
    """Run steps 1-4 of the module doc for the spiking ``data_step`` on every rank (collective:
    every rank must call it). ``rerun(keys)`` re-reads the samples by id and returns their
    per-sample losses with the live (not yet updated) weights, forward only. Which rank read which
    sample comes from ``loader.samples_at`` (the sequence's device rule)."""
    t0 = clock() if clock else None
    locals_ = gather((float(local_loss), int(local_count), str(host)))
    losses, counts = [float(x[0]) for x in locals_], [int(x[1]) for x in locals_]
    suspect = suspect_rank(losses)
    hosts = [str(x[2]) for x in locals_]
    other = pick_witness(suspect, hosts)
    refs = loader.samples_at(data_step, keys=False)
    keys = [(r.stream, r.sample_id) for r in refs if r.rank == suspect] if world_size > 1 else \
        [(r.stream, r.sample_id) for r in refs]
    mine = [float(x) for x in rerun(keys)] if rank in (suspect, other) else None
    results = gather(mine)
    detector = guard.state_dict()["loss"]["window"]
    decision = investigate(flag=Flagger(detector, guard.cfg.loss), local_losses=losses, local_counts=counts,
                           keys=keys, same=results[suspect],
                           other=results[other] if other is not None else None, cfg=cfg)
    if clock is not None:
        decision.evidence["seconds"] = clock() - t0
    decision.evidence["rerun_ranks"] = [suspect] + ([other] if other is not None else [])
    decision.evidence["suspect_host"] = hosts[suspect]
    return decision


def act(decision: Decision, *, guard, loader, step: int, data_step: int,
        cfg: ForensicsConfig = ForensicsConfig()) -> str:
    """Journal the verdict and apply it; returns what the training loop does with this step:
    ``"retrain"`` (data: culprits quarantined, loader rewound to ``data_step``: train the step
    again), ``"exit"`` (hardware with ``hardware_exit``: exit 77 after this call), or ``"skip"``
    (drop the update, as the ladder said)."""
    host = str(decision.evidence.get("suspect_host", "?"))
    guard.record(verdict_event(decision, step=step, data_step=data_step, host=host))
    if decision.verdict == DATA:
        guard.record(quarantine_event(decision, step=step, data_step=data_step))
        loader.quarantine([(s, i, data_step) for s, i in decision.culprits])
        loader.rewind(data_step)
        guard.forgive()
        return "retrain"
    if decision.verdict == HARDWARE and cfg.hardware_exit:
        guard.record({"event": "exit", "step": step, "code": exitcodes.REPLACE_NODE,
                      "name": exitcodes.describe(exitcodes.REPLACE_NODE),
                      "reason": f"forensics: rank {decision.suspect} on {host}: {decision.evidence.get('reason')}"})
        return "exit"
    return "skip"
