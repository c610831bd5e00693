"""Any world size: the same update from the same global batch on any number of ranks.

A global batch of ``G`` samples is split among ``D`` ranks in batches of ``G // D`` or
``G // D + 1`` (docs/SAMPLER.md, "Which rank reads what"). The mean over the global batch is
``sum of per-sample losses / G``, whatever the split; a per-rank mean (``loss.mean()``) is not:
with unequal rank batches it weights the samples of small ranks more, and it changes when ``D``
changes. Data-parallel training (DDP, FSDP) *averages* gradients over ranks, so each rank must
back-propagate ``D * (its sum) / G``: the average over ranks is then exactly the gradient of the
global mean. :func:`loss_for_backward` computes that; :func:`global_mean_loss` gives the
all-reduced value to log. :func:`micro_batches` splits a rank batch for gradient accumulation
when memory is the limit: back-propagate each micro batch's :func:`loss_for_backward` (still over
``G``), synchronize gradients on the last one only (:func:`sync_on_last`), then step once.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch

from streamshard.errors import ConfigError


def _check_positive(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive int, got {value!r}")
    return value


def loss_for_backward(per_sample_losses: torch.Tensor, *, global_batch_size: int,
                      world_size: int, grad_averaging: bool = True) -> torch.Tensor:
    """The loss this rank back-propagates: ``sum(per_sample_losses) * D / G``.

    With ``grad_averaging=True`` (DDP and FSDP average gradients over the ``D`` ranks) the
    averaged gradient equals the gradient of ``sum over the global batch / G``: the update is
    the same on any world size and any split. Pass ``grad_averaging=False`` when gradients are
    summed over ranks (a hand-written all-reduce SUM): the factor ``D`` is then dropped.
    """
    g = _check_positive(global_batch_size, "global_batch_size")
    d = _check_positive(world_size, "world_size")
    scale = d / g if grad_averaging else 1.0 / g
    return per_sample_losses.sum() * scale


def global_mean_loss(per_sample_losses: torch.Tensor, *, global_batch_size: int,
                     group: Any = None) -> torch.Tensor:
    """The global batch's mean loss, ``all_reduce(sum) / G``, detached (for logging).

    Uses ``torch.distributed`` when it is initialized (one SUM all-reduce on ``group``);
    otherwise this process holds the whole global batch."""
    g = _check_positive(global_batch_size, "global_batch_size")
    total = per_sample_losses.detach().sum().to(torch.float64)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(total, op=torch.distributed.ReduceOp.SUM, group=group)
    return total / g


def _split(value: Any, start: int, stop: int) -> Any:
    if isinstance(value, (torch.Tensor,)) or hasattr(value, "__array__") and hasattr(value, "shape"):
        return value[start:stop]
    if isinstance(value, dict):
        return {key: _split(item, start, stop) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(value[start:stop])
    raise ConfigError(f"cannot split a batch of type {type(value).__name__} into micro batches")


def _length(batch: Any) -> int:
    if isinstance(batch, dict):
        lengths = {_length(v) for v in batch.values()}
        if len(lengths) != 1:
            raise ConfigError(f"batch columns have different lengths {sorted(lengths)}")
        return lengths.pop()
    if isinstance(batch, (torch.Tensor,)) or hasattr(batch, "shape"):
        return int(batch.shape[0])
    return len(batch)


def micro_batches(batch: Any, micro_batch_size: int) -> Iterator[tuple[Any, bool]]:
    """Split a collated rank batch (tensor, array, list, or a dict of them) along its first
    dimension into ``(micro batch, is_last)`` of at most ``micro_batch_size`` samples."""
    size = _check_positive(micro_batch_size, "micro_batch_size")
    n = _length(batch)
    starts = list(range(0, n, size)) or [0]
    for i, start in enumerate(starts):
        yield _split(batch, start, min(n, start + size)), i == len(starts) - 1


def sync_on_last(model: torch.nn.Module, is_last: bool) -> contextlib.AbstractContextManager:
    """``model.no_sync()`` for all micro batches but the last (DDP/FSDP skip the gradient
    all-reduce there), a null context otherwise or for a model without ``no_sync``."""
    no_sync = getattr(model, "no_sync", None)
    if is_last or no_sync is None:
        return contextlib.nullcontext()
    return no_sync()
