"""The recovery LR cut as a multiplier every torch LR scheduler honours.

``install_lr_scale(optimizer, lambda: guard.lr_scale)`` registers an optimizer step pre-hook that
multiplies each group's ``lr`` by the current scale just before ``optimizer.step()`` and a post-hook
that puts the scheduler's value back right after. The scheduler (LambdaLR, cosine, OneCycle,
chainable ones that read ``group["lr"]``) therefore never sees the scale and keeps its own schedule;
the update uses ``schedule(step) * scale``. Nothing in the training loop has to remember to read
the scale, and a restart that restores the ledger restores the cut.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from streamshard.errors import ConfigError


class LRScaleHandle:
    """Removes both hooks (``remove()``)."""

    def __init__(self, pre, post):
        self._handles = (pre, post)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def install_lr_scale(optimizer: torch.optim.Optimizer, scale: Callable[[], float]) -> LRScaleHandle:
    """Make every ``optimizer.step()`` use ``lr * scale()`` (see the module docstring)."""
    saved: list = []

    def pre(opt, args, kwargs):
        s = float(scale())
        if not 0 < s <= 1:
            raise ConfigError(f"LR scale must be in (0, 1], got {s}")
        saved[:] = [g["lr"] for g in opt.param_groups]
        for g in opt.param_groups:
            g["lr"] = g["lr"] * s

    def post(opt, args, kwargs):
        for g, lr in zip(opt.param_groups, saved):
            g["lr"] = lr
        saved.clear()

    return LRScaleHandle(optimizer.register_step_pre_hook(pre), optimizer.register_step_post_hook(post))
