"""Mixtures that change: ``reweight`` and ``load_state_dict(state, reweight=True)`` for every
loader (torch-free; used by StreamingDataLoader and the batch sampler).

The weights in force are the mixture's definition (its weights and schedule, the state's
``sequence``) overridden by the ``reweights`` ledger (:mod:`streamshard.sampler.reweight`).

- ``reweight(weights, from_step)`` adds one ledger entry: the new weights' slots per block from
  ``from_step`` (default: the next step served) on. A served step is refused.
- A resume whose dataset was built with other weights (or another schedule) refuses with
  ``StateMismatchError`` unless ``reweight=True``. With it, the state's definition becomes the
  new one and the ledger keeps the whole history: an entry at step 0 with the saved weights'
  counts, the saved schedule and reweights before the saved step ``f``, then the new weights in
  force at ``f`` and the new schedule after it. The next resume with the same script is then an
  ordinary one (the definitions match), so every later resume stays exact.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Mapping, Sequence

from streamshard.errors import ConfigError, StateMismatchError
from streamshard.restream import relayout, retired
from streamshard.sampler import Ledgers, MixtureOrder, SampleSequence
from streamshard.sampler.reweight import counts_in_force, effective_entries
from streamshard.state import KEY_SEQUENCE, KEY_STEP, validate_state

log = logging.getLogger(__name__)

# Sequence fields a reweight may change (everything else must still match).
MIXTURE_KEYS = ("weights", "schedule", "block")


def resolve_weights(streams: Sequence[Any], weights: Any) -> list[float]:
    """``weights`` as one number per stream: a sequence in stream order (streams removed at a
    resume may be left out), or a dict naming every stream by its source (or index)."""
    if isinstance(weights, Mapping):
        out = []
        for i, stream in enumerate(streams):
            if stream.source in weights:
                out.append(weights[stream.source])
            elif i in weights:
                out.append(weights[i])
            else:
                raise ConfigError(f"reweight: no weight for stream {i} ({stream.source}); name "
                                  "every stream by its source or index")
        unknown = set(weights) - {s.source for s in streams} - set(range(len(streams)))
        if unknown:
            raise ConfigError(f"reweight: unknown streams {sorted(map(str, unknown))}")
        return out
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence):
        raise ConfigError(f"reweight needs a list of weights or a dict, got {weights!r:.80}")
    gone = retired(streams)
    if any(gone) and len(weights) == gone.count(False):  # the listed streams, in stream order
        it = iter(weights)
        return [0.0 if g else next(it) for g in gone]
    if len(weights) != len(streams):
        raise ConfigError(f"reweight got {len(weights)} weights for {len(streams)} streams")
    return list(weights)


def reweight_ledgers(sequence: SampleSequence, streams: Sequence[Any], weights: Any,
                     from_step: int | None, next_step: int) -> Ledgers:
    """``sequence``'s ledgers with the weights ``weights`` from ``from_step`` on (default
    ``next_step``, the next step the loader serves). Unchanged when those weights are already
    in force there (idempotent)."""
    if any(getattr(s, "absolute", False) for s in streams):
        raise ConfigError("this mixture samples each stream by repeat/choose (samples per "
                          "epoch); reweight changes relative weights: build the mixture with "
                          "weights to change them mid-run")
    order = sequence.order
    if not isinstance(order, MixtureOrder):
        raise ConfigError("reweight needs a mixture (a list of Stream), not a single dataset")
    step = next_step if from_step is None else from_step
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ConfigError(f"from_step must be an int >= 0, got {step!r}")
    if step < next_step:
        raise ConfigError(f"cannot reweight from step {step}: it was already served (the loader "
                          f"serves step {next_step} next); the history stays as it was")
    counts = order.counts_for(resolve_weights(streams, weights))
    ledgers = sequence.ledgers
    changed = sequence.with_reweight(step, counts).ledgers  # checks reseeds (history)
    if effective_entries(order, changed.reweights) == effective_entries(order, ledgers.reweights):
        return ledgers
    log.info("reweight from step %d: %s slots per block of %d", step, counts, sum(counts))
    return changed


def _saved_mixture(live: MixtureOrder, saved: Mapping[str, Any]) -> MixtureOrder:
    """The saved definition (weights, block, schedule) over the live streams' orders (streams
    added at this resume, after the saved ones, get weight 0 in it)."""
    def pad(weights):
        return list(weights) + [0.0] * (len(live.orders) - len(weights))

    try:
        return MixtureOrder(live.orders, pad(saved["weights"]), seed=live.seed,
                            block=saved["block"], epoch_size=live.epoch_size,
                            schedule=[(s, pad(w)) for s, w in saved.get("schedule", [])])
    except (ConfigError, KeyError, TypeError, ValueError) as e:
        raise StateMismatchError(f"loader state: the saved mixture is malformed: {e}") from None


def _differs(saved: Any, live: Mapping[str, Any]) -> bool:
    return isinstance(saved, Mapping) and any(saved.get(k) != live.get(k) for k in MIXTURE_KEYS)


def continued(saved_state: Mapping[str, Any], live_sequence: SampleSequence,
              live_state: Mapping[str, Any], reweight: bool, *,
              absolute: bool = False) -> Ledgers | None:
    """For a saved mixture whose weights differ from the live ones: the ledgers that continue
    it (the state validated with the live weights), or ``StateMismatchError`` without
    ``reweight``. Otherwise ``None`` (an ordinary restore)."""
    saved_seq = saved_state.get(KEY_SEQUENCE) if isinstance(saved_state, Mapping) else None
    live_fields = live_sequence.state_fields()
    order = live_sequence.order
    if not isinstance(order, MixtureOrder) or not _differs(saved_seq, live_fields) \
            or saved_seq.get("kind") != "mixture":
        return None
    if absolute:  # one block per epoch: a change would cut an epoch-sized block
        raise StateMismatchError(
            f"the streams' repeat/choose changed since this state was saved (weights: saved="
            f"{saved_seq.get('weights')!r:.60}, live={live_fields.get('weights')!r:.60}); a "
            f"mixture sampled by repeat/choose cannot change mid-run")
    saved_fps = list(saved_state.get("fingerprints") or [])
    live_fps = list(live_state["fingerprints"])
    if not reweight:
        added = [f[:16] for f in live_fps[len(saved_fps):]]
        shown = "; ".join(f"{k}: saved={saved_seq.get(k)!r:.60}, live={live_fields.get(k)!r:.60}"
                          for k in MIXTURE_KEYS if saved_seq.get(k) != live_fields.get(k))
        streams = (f"streams added {added}; " if added else "")
        raise StateMismatchError(
            f"the mixture's weights changed since this state was saved ({streams}{shown}): pass "
            f"reweight=True to load_state_dict to continue with the new weights from the saved "
            f"step (the state keeps the history), or load with the saved weights and call "
            f"loader.reweight(weights)")
    # Everything but the weights must still match (streams, seed, epoch size, batch size...).
    sequence = {k: v for k, v in saved_seq.items() if k not in MIXTURE_KEYS}
    sequence.update({k: live_fields[k] for k in MIXTURE_KEYS if k in live_fields})
    # Streams added at this resume come after the saved ones (streamshard.restream): the
    # saved ones must still match, the new ones are the live ones.
    n = len(saved_fps)
    if len(live_fps) > n and isinstance(sequence.get("streams"), list):
        sequence["streams"] = sequence["streams"] + live_fields["streams"][n:]
    state = {**saved_state, KEY_SEQUENCE: sequence,
             "fingerprints": saved_fps + live_fps[n:]}
    validate_state(state, live_state)
    ledgers = Ledgers.from_state(state)
    f = int(state[KEY_STEP])
    old = _saved_mixture(order, saved_seq)
    # What was in force from step 0 (a saved ledger may already start there) up to step f.
    history = [] if f == 0 else [(0, counts_in_force(old, ledgers.reweights, 0))] + [
        (s, c) for s, c in effective_entries(old, ledgers.reweights) if 0 < s < f]
    new = [(f, counts_in_force(order, (), f))] + [(s, c) for s, c in order.schedule_counts()
                                                  if s > f]
    base = live_sequence.with_ledgers(Ledgers(skips=ledgers.skips, reseeds=ledgers.reseeds))
    try:
        base.with_reweight(f, new[0][1])  # refuses a step whose epoch a reseed permuted
    except ConfigError as e:
        raise StateMismatchError(str(e)) from None
    rows = tuple((s, *c) for s, c in history + new)
    log.info("resume at step %d with new mixture weights %s (were %s)", f,
             list(order.weights), list(old.weights))
    return Ledgers(ledgers.skips, ledgers.reseeds, ledgers.quarantine, rows)


def restore(dataset: Any, state: Any, live_state: Callable[[], dict[str, Any]],
            reweight: bool = False) -> Ledgers:
    """Validate ``state`` against ``dataset`` (adopting a saved default order, continuing a
    changed mixture when ``reweight``) and return the ledgers to serve with; on any error the
    dataset is left as it was."""
    undo_order = dataset.adopt_saved_order(  # both loaders: streams.SequenceHost
        state.get(KEY_SEQUENCE) if isinstance(state, dict) else None)
    try:
        undo_layout = relayout(dataset, state)
    except Exception:
        undo_order()
        raise

    def undo() -> None:
        undo_layout()
        undo_order()

    try:
        live = live_state()
        ledgers = continued(state, dataset.sequence, live, reweight,
                            absolute=any(getattr(x, "absolute", False) for x in dataset.streams)) \
            if isinstance(state, Mapping) else None
        if ledgers is None:
            validate_state(state, live)
            ledgers = Ledgers.from_state(state)
        try:  # rows must fit the mixture (e.g. no more counts than streams)
            dataset.sequence.with_ledgers(ledgers)
        except ConfigError as e:
            raise StateMismatchError(f"cannot load loader state into this loader: {e}") from None
        return ledgers
    except Exception:
        undo()
        raise
