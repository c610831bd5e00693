"""Which samples a step reads: the global batch of any past or future step, with sources.

The sequence is a pure function of (seed, epoch, position) plus the ledgers, so this is arithmetic:
no replay, no shard read unless the id/path columns or previews are asked for. Works from a
loader state alone (:func:`sequence_from_state`) plus the datasets' indexes, which is what
``streamshard explain`` does.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from streamshard.errors import ConfigError, StateMismatchError
from streamshard.sampler import BlockGroups, EpochOrder, Ledgers, MixtureOrder, SampleSequence
from streamshard.state import KEY_FINGERPRINTS, KEY_SEQUENCE, KEY_STEP, KEY_STEPS_PER_EPOCH

# Columns read as a sample's key when present (scalars or short strings): what a data team needs
# to find the document in the corpus.
KEY_COLUMN_NAMES = ("id", "doc_id", "uid", "key", "__key__", "path", "url", "source", "filename", "name")


@dataclass(frozen=True)
class SampleRef:
    """One sample of a global batch and where it comes from.

    ``index`` is its place in the global batch (``0..G-1``), ``rank`` the device that reads it at
    ``world_size`` (None when not asked), ``filled`` whether it fills a quarantined sample's
    position (then ``replaces`` is that sample's ``[stream, id]``), ``keys`` its id/path columns.
    """

    step: int
    index: int
    stream: int
    sample_id: int
    shard: int
    shard_file: str
    offset: int
    rank: int | None = None
    filled: bool = False
    replaces: tuple[int, int] | None = None
    keys: Mapping[str, Any] | None = None

    def to_json(self) -> dict:
        out = asdict(self)
        out["replaces"] = list(self.replaces) if self.replaces else None
        out["keys"] = dict(self.keys) if self.keys else None
        return out


def key_columns(dataset) -> list[str]:
    """The dataset's columns that identify a sample (see ``KEY_COLUMN_NAMES``), in schema order."""
    wanted = set(KEY_COLUMN_NAMES)
    return [name for name, typ in dataset.schema.to_json().items()
            if name in wanted and ("[" not in typ)]


def ranks_of(seq: SampleSequence, step: int, world_size: int,
             local_world_size: int = 1) -> np.ndarray:
    """Which rank reads each position of global batch ``step``, from the sequence's own rank
    split (``SampleSequence.assignment``): never re-derived here."""
    return seq.assignment(world_size, local_world_size).rank_of(seq.step_positions(step))


def samples_at(seq: SampleSequence, datasets: Sequence, step: int, *, world_size: int | None = None,
               local_world_size: int = 1, keys: bool = True) -> list[SampleRef]:
    """The global batch ``step`` as :class:`SampleRef` rows, in global-batch order.

    ``datasets`` are the streams' readers (only their indexes are used unless ``keys``).
    """
    if not isinstance(step, int) or step < 0:
        raise ConfigError(f"step must be a non-negative int, got {step!r}")
    g, steps = seq.global_batch_size, seq.steps_per_epoch
    epoch, j = divmod(step, steps)
    pos = j * g + np.arange(g, dtype=np.int64)
    if not seq.drop_last:
        pos %= seq.epoch_size
    streams, samples, filled = seq.map_positions_marked(epoch, pos)
    if filled.any():
        raw_streams, raw_samples = seq._map_raw(epoch, pos)
    ranks = ranks_of(seq, step, world_size, local_world_size) if world_size else None
    cols = [key_columns(ds) for ds in datasets] if keys else [[] for _ in datasets]
    rows = []
    for i, (stream, sample) in enumerate(zip(streams.tolist(), samples.tolist())):
        ds = datasets[stream]
        shard, offset = ds.index.locate(sample)
        row_keys = None
        if cols[stream]:
            item = ds[sample]
            row_keys = {c: _plain(item[c]) for c in cols[stream]}
        rows.append(SampleRef(
            step=step, index=i, stream=stream, sample_id=sample, shard=shard,
            shard_file=ds.index.shards[shard].file, offset=offset,
            rank=int(ranks[i]) if ranks is not None else None, filled=bool(filled[i]),
            replaces=(int(raw_streams[i]), int(raw_samples[i])) if filled[i] else None,
            keys=row_keys))
    return rows


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def source_of(datasets: Sequence, stream: int, sample_id: int) -> dict:
    """Where a sample lives: stream, id, shard index and file name, offset in the shard, keys."""
    ds = datasets[stream]
    shard, offset = ds.index.locate(sample_id)
    out = {"stream": stream, "sample_id": sample_id, "shard": shard,
           "shard_file": ds.index.shards[shard].file, "offset": offset}
    cols = key_columns(ds)
    if cols:
        item = ds[sample_id]
        out["keys"] = {c: _plain(item[c]) for c in cols}
    return out


def sequence_from_state(state: Mapping[str, Any], datasets: Sequence) -> tuple[SampleSequence, int]:
    """Rebuild the loader's sequence (ledgers included) from its saved state and the streams'
    datasets (indexes only); returns ``(sequence, next step)``. The fingerprints and every
    sequence setting are checked, each mismatch shown as ``saved=... live=...``."""
    if not isinstance(state, Mapping) or KEY_SEQUENCE not in state:
        raise StateMismatchError("not a streamshard loader state: no 'sequence' key")
    fields = state[KEY_SEQUENCE]
    if not isinstance(fields, Mapping):
        raise StateMismatchError(f"loader state's 'sequence' must be an object, got {fields!r:.80}")
    saved_fps = list(state.get(KEY_FINGERPRINTS, []))
    live_fps = [ds.fingerprint for ds in datasets]
    if saved_fps != live_fps:
        raise StateMismatchError(f"fingerprints: saved={saved_fps}, live={live_fps} "
                                 "(pass the datasets of the run, in stream order)")
    try:
        if fields.get("kind") == "mixture":
            orders = [_order(f, ds) for f, ds in zip(fields["streams"], datasets)]
            order: EpochOrder | MixtureOrder = MixtureOrder(
                orders, fields["weights"], seed=fields["seed"], block=fields["block"],
                epoch_size=fields["epoch_size"],
                schedule=[(step, w) for step, w in fields.get("schedule", [])])
        else:
            order = _order(fields, datasets[0])
        seq = SampleSequence(order, global_batch_size=fields["global_batch_size"],
                             drop_last=fields["drop_last"]).with_ledgers(Ledgers.from_state(state))
    except (KeyError, TypeError, ConfigError) as e:
        raise StateMismatchError(f"loader state's sequence is incomplete or invalid ({e})") from None
    live = seq.state_fields()
    if "packing" in fields:  # packed/bucketed steps hold the same documents (docs/SAMPLER.md)
        live["packing"] = fields["packing"]
    problems = [f"sequence.{k}: saved={fields.get(k)!r}, live={live.get(k)!r}"
                for k in sorted(set(fields) | set(live))
                if k not in Ledgers.names() and fields.get(k) != live.get(k)]
    if state.get(KEY_STEPS_PER_EPOCH) != seq.steps_per_epoch:
        problems.append(f"steps_per_epoch: saved={state.get(KEY_STEPS_PER_EPOCH)!r}, "
                        f"live={seq.steps_per_epoch}")
    if problems:
        raise StateMismatchError("loader state does not match these datasets:\n  " + "\n  ".join(problems))
    return seq, int(state.get(KEY_STEP, 0))


def _order(fields: Mapping[str, Any], ds) -> EpochOrder:
    blocks = fields.get("blocks")  # the block-aware shuffle's [samples_per_block, blocks_per_group]
    if blocks is not None:
        if not (isinstance(blocks, list) and len(blocks) == 2):
            raise StateMismatchError(f"sequence.blocks must be [samples_per_block, blocks_per_group], "
                                     f"got {blocks!r:.80}")
        blocks = BlockGroups(*blocks)
    return EpochOrder(ds.index.shards.samples, seed=fields["seed"],
                      shuffle=fields["shuffle"], lanes=fields["lanes"], window=fields["window"],
                      blocks=blocks)
