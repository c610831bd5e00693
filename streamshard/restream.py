"""Adding or removing a mixture's streams at a resume (torch-free).

A stream is known by its dataset fingerprint. The state lists every stream the run has ever used
(``fingerprints``, and ``sequence.streams`` for their orders) in the order they joined, and a
stream's index in that list is its id everywhere: its order's key ``derive_key(seed, id)``, the
``stream`` of quarantine entries and ``samples_at``, the columns of ``reweights`` rows. So a
resume with another stream list lays the live streams out in that history order:

- a saved stream still listed keeps its id (wherever it now is in the list);
- a saved stream no longer listed stays as a **retired** stream: weight 0, no dataset; its order
  answers nothing (a step that would read it is an error naming it), its fields stay in the
  state so any later resume matches;
- a new stream gets the next id, after every saved one.

The epoch length stays the run's (``steps_per_epoch`` is part of every step's arithmetic; a
dataset built with ``epoch_size`` left to its default adopts the saved one). Then
the weights differ from the saved ones (a new stream has a weight, a removed one 0), so the
resume needs ``reweight=True`` and continues as :mod:`streamshard.mixing` describes: every later
resume with the same script is an ordinary one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from streamshard.errors import ConfigError, StateMismatchError
from streamshard.sampler import EpochOrder, MixtureOrder, SampleSequence
from streamshard.streams import Stream

log = logging.getLogger(__name__)


class RetiredOrder(EpochOrder):
    """The order of a stream removed at a resume: its saved fields, no samples to serve."""

    def __init__(self, fields: Mapping[str, Any], fingerprint: str):
        size = fields.get("size")
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise StateMismatchError(f"loader state: stream {fingerprint[:16]} has a malformed "
                                     f"size {size!r}")
        super().__init__([size], seed=0, shuffle=False, lanes=1)
        self._fields = dict(fields)
        self._fingerprint = fingerprint

    def state_fields(self) -> dict:
        return dict(self._fields)

    def map_checked(self, epoch: int, positions):
        raise ConfigError(f"stream {self._fingerprint[:16]} was removed from the mixture at a "
                          f"resume; this step reads it (a past step, a drop_last=False pad or a "
                          f"quarantine repeat of its epoch): list it again to read it")

    def __call__(self, epoch: int, positions):
        return self.map_checked(epoch, positions)


@dataclass(frozen=True)
class RetiredDataset:
    """Stands for a removed stream's dataset: its fingerprint, nothing to read."""

    fingerprint: str

    def close(self) -> None:
        pass


def _fail(message: str) -> StateMismatchError:
    return StateMismatchError(f"cannot load loader state into this loader: {message}")


def relayout(dataset: Any, state: Any) -> Callable[[], None]:
    """Lay ``dataset``'s streams out in ``state``'s history order when the stream lists differ
    (see the module docstring). Returns an undo callable; a no-op when the lists match."""
    if not isinstance(state, Mapping) or not hasattr(dataset, "adopt_layout"):
        return lambda: None
    saved_fps, saved_seq = state.get("fingerprints"), state.get("sequence")
    live_fps = dataset.fingerprints
    if not isinstance(saved_fps, list) or not isinstance(saved_seq, Mapping) \
            or not all(isinstance(f, str) for f in saved_fps):
        return lambda: None
    # The same list: nothing to lay out, unless an earlier resume changed the streams and left
    # the run's epoch length (adopted when this dataset left epoch_size to its default).
    same_length = saved_seq.get("epoch_size") == dataset.sequence.epoch_size or \
        not getattr(dataset, "_epoch_size_adoptable", False)
    if saved_fps == live_fps and same_length:
        return lambda: None
    if saved_seq.get("kind") != "mixture":
        if saved_fps and saved_fps[0] in live_fps:
            raise _fail("this run used one dataset, not a mixture; streams can be added to and "
                        "removed from a mixture (a list of Stream) only: start the run as a "
                        "mixture, a stream may have weight 0 until it joins")
        return lambda: None
    saved_streams = saved_seq.get("streams")
    if not isinstance(saved_streams, list) or len(saved_streams) != len(saved_fps) \
            or len(set(saved_fps)) != len(saved_fps) or len(set(live_fps)) != len(live_fps):
        return lambda: None  # malformed or ambiguous: strict validation reports it
    live = dict(zip(live_fps, range(len(live_fps))))
    layout = list(saved_fps) + [f for f in live_fps if f not in set(saved_fps)]
    streams, datasets, orders, weights = [], [], [], []
    base = dataset.sequence.order
    live_weights = (list(base.weights) if isinstance(base, MixtureOrder) else [1.0])
    live_schedule = base.schedule if isinstance(base, MixtureOrder) else ()
    for sid, fp in enumerate(layout):
        if fp in live:
            i = live[fp]
            streams.append(dataset.streams[i])
            datasets.append(dataset.datasets[i])
            orders.append(dataset.stream_order(i, sid))
            weights.append(i)
        else:
            if not isinstance(saved_streams[sid], Mapping):
                return lambda: None
            streams.append(Stream(f"<removed {fp[:16]}>", 0.0))
            datasets.append(RetiredDataset(fp))
            orders.append(RetiredOrder(saved_streams[sid], fp))
            weights.append(None)

    def relaid(values):
        return [0.0 if i is None else values[i] for i in weights]

    epoch_size = saved_seq.get("epoch_size")
    if isinstance(epoch_size, bool) or not isinstance(epoch_size, int) or epoch_size < 1:
        return lambda: None
    try:
        order = MixtureOrder(orders, relaid(live_weights), seed=dataset.seed,
                             block=base.block if isinstance(base, MixtureOrder) else None,
                             epoch_size=epoch_size,
                             schedule=[(s, relaid(w)) for s, w in live_schedule])
    except ConfigError as e:
        raise _fail(f"the new stream list does not make a mixture: {e}") from None
    added = [f[:16] for f in layout[len(saved_fps):]]
    removed = [f[:16] for f in saved_fps if f not in live]
    log.info("resume with streams added %s and removed %s (history order kept)", added, removed)
    seq = dataset.sequence
    return dataset.adopt_layout(tuple(streams), tuple(datasets), SampleSequence(
        order, global_batch_size=seq.global_batch_size, drop_last=seq.drop_last))


def retired(streams) -> list[bool]:
    """Which of ``streams`` are retired (removed at a resume)."""
    return [s.source.startswith("<removed ") and s.weight == 0.0 for s in streams]
