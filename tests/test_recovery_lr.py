"""The LR cut through optimizer hooks: the update uses schedule * scale for every scheduler kind,
and the scheduler's own state never sees the scale."""

from __future__ import annotations

import pytest
import torch

from streamshard.errors import ConfigError
from streamshard.recovery.lr import install_lr_scale

SCHEDULERS = [  # each row: a scheduler kind (closed-form, chainable, per-step)
    ("lambda", lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1 / (s + 1))),
    ("exponential", lambda o: torch.optim.lr_scheduler.ExponentialLR(o, 0.9)),  # reads group["lr"]
    ("cosine", lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, 10)),
    ("onecycle", lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=20)),
]


def lrs_used(make_sched, scale):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.1)
    sched = make_sched(opt)
    factor = {"s": 1.0}
    install_lr_scale(opt, lambda: factor["s"]) if scale else None
    used = []
    for step in range(8):
        factor["s"] = 0.5 if step >= 3 else 1.0  # a rollback cut the LR at step 3
        p.grad = torch.ones(1)
        before = p.item()
        opt.step()
        used.append(before - p.item())  # SGD: the step equals the lr used
        sched.step()
    return used, sched.state_dict()


@pytest.mark.parametrize("name,make", SCHEDULERS, ids=[n for n, _ in SCHEDULERS])
def test_update_uses_schedule_times_scale(name, make):
    plain, plain_state = lrs_used(make, scale=False)
    scaled, scaled_state = lrs_used(make, scale=True)
    want = [lr * (0.5 if i >= 3 else 1.0) for i, lr in enumerate(plain)]
    assert scaled == pytest.approx(want, rel=1e-6)
    assert scaled_state["_last_lr"] == pytest.approx(plain_state["_last_lr"])  # the schedule is untouched


def test_scale_out_of_range_is_refused():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.1)
    install_lr_scale(opt, lambda: 0.0)
    p.grad = torch.ones(1)
    with pytest.raises(ConfigError, match="LR scale must be in"):
        opt.step()
