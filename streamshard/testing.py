"""Conformance helpers, shipped so that users can test their own pipelines the same way.

``assert_resume_equivalent(make_loader, at=k)`` checks the loader's central promise: save the
state after ``k`` consumed batches, restore it into a fresh loader, and the rest of the stream
equals the tail of an uninterrupted run.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Iterable

import numpy as np
import torch


def take(loader, count: int, *, max_epochs: int = 1000) -> list[Any]:
    """Consume ``count`` batches from ``loader``, crossing epoch boundaries (new ``iter()``)."""
    out: list[Any] = []
    # Bounded by epochs, not batches: an epoch may serve nothing (wholly skipped), which is
    # legal; max_epochs of them in a row means the loader is broken.
    for _ in range(max_epochs):
        if len(out) >= count:
            break
        for batch in loader:
            out.append(batch)
            if len(out) >= count:
                break
    if len(out) < count:
        raise AssertionError(f"loader produced {len(out)} batches in {max_epochs} epochs, wanted {count}")
    return out


def batch_key(batch: Any) -> Any:
    """A comparable, hashable rendering of a collated batch (tensors -> nested tuples)."""
    if isinstance(batch, torch.Tensor):
        return ("tensor", str(batch.dtype), tuple(batch.shape), tuple(batch.flatten().tolist()))
    if isinstance(batch, np.ndarray):
        return ("ndarray", str(batch.dtype), batch.shape, tuple(batch.flatten().tolist()))
    if isinstance(batch, dict):
        return tuple(sorted((k, batch_key(v)) for k, v in batch.items()))
    if isinstance(batch, (list, tuple)):
        return tuple(batch_key(v) for v in batch)
    return batch


def assert_resume_equivalent(
    make_loader: Callable[[], Any],
    *,
    at: int | Iterable[int],
    total: int,
    make_resumed: Callable[[], Any] | None = None,
) -> None:
    """Assert that resuming after ``k`` batches (for each ``k`` in ``at``) continues exactly
    like an uninterrupted run of ``total`` batches.

    ``make_loader()`` builds a fresh loader; ``make_resumed()`` (default: the same) builds the
    loader that restores the state, e.g. with another ``num_workers``. The state goes through
    ``json`` on the way, as it would through a checkpoint file.
    """
    make_resumed = make_resumed or make_loader
    reference = [batch_key(b) for b in take(make_loader(), total)]
    points = [at] if isinstance(at, int) else list(at)
    for k in points:
        if not 0 <= k <= total:
            raise ValueError(f"resume point {k} outside [0, {total}]")
        first = make_loader()
        head = [batch_key(b) for b in take(first, k)] if k else []
        state = json.loads(json.dumps(first.state_dict()))
        resumed = make_resumed()
        resumed.load_state_dict(state)
        tail = [batch_key(b) for b in take(resumed, total - k)] if total - k else []
        if head != reference[:k]:
            raise AssertionError(f"resume at {k}: the first {k} batches differ from the reference run")
        for i, (got, want) in enumerate(zip(tail, reference[k:])):
            if got != want:
                raise AssertionError(
                    f"resume at {k}: batch {k + i} differs from the uninterrupted run "
                    f"(state={state})"
                )


def assemble_global_batch(sequence, step: int, rank_items: list, *,
                          local_world_size: int = 1) -> list:
    """Put the per-rank items of one step (rank order; each a list in that rank's position
    order) back into the global batch's position order, as one rank would have read it."""
    world_size = len(rank_items)
    step_pos = sequence.step_positions(step)
    out: list = [None] * len(step_pos)
    for rank, items in enumerate(rank_items):
        pos = sequence.device_positions(step, rank, world_size, local_world_size)
        if len(items) != len(pos):
            raise AssertionError(f"rank {rank} has {len(items)} items in step {step}, "
                                 f"the assignment gives it {len(pos)}")
        for slot, item in zip(((pos - step_pos[0]) % sequence.epoch_size).tolist(), items):
            out[slot] = item
    return out


def write_id_dataset(
    path: str,
    num_samples: int,
    *,
    shard_size: int | str = "8KB",
    compression: str | None = "zstd",
    block_size: int | str = "2KiB",
) -> str:
    """Write a small dataset whose sample ``i`` is ``{"id": i, "tokens": uint16[4]}`` (tokens
    derived from ``i``), with many small shards so shuffling, lanes and windows are exercised."""
    from streamshard.writer import ShardWriter

    with ShardWriter(
        path,
        columns={"id": "int64", "tokens": "uint16[4]"},
        shard_size=shard_size,
        block_size=block_size,
        compression=compression,
    ) as writer:
        for i in range(num_samples):
            writer.write({"id": i, "tokens": (np.arange(4) * 7 + i).astype(np.uint16)})
    return path
