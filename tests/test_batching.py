"""Any world size: the same global batch and the same update on any number of ranks."""

from __future__ import annotations

import pytest
import torch

from streamshard.batching import global_mean_loss, loss_for_backward, micro_batches, sync_on_last
from streamshard.errors import ConfigError
from streamshard.sampler import EpochOrder, SampleSequence

G = 8


def grads(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, scale_loss) -> torch.Tensor:
    model.zero_grad()
    per_sample = torch.nn.functional.mse_loss(model(x).squeeze(1), y, reduction="none")
    scale_loss(per_sample).backward()
    return model.weight.grad.clone()


@pytest.mark.parametrize("world_size", [1, 2, 3, 5, 8])
def test_averaged_rank_gradients_equal_the_global_mean_gradient(world_size):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1, bias=False)
    x, y = torch.randn(40, 4), torch.randn(40)
    seq = SampleSequence(EpochOrder([10, 10, 10, 10], seed=1, lanes=4), global_batch_size=G)
    step = 2
    ids = seq.global_batch(step)[1]
    want = grads(model, x[ids], y[ids], lambda loss: loss.mean())
    # what DDP does: every rank back-propagates its own loss, gradients are averaged
    parts = [seq.batch(step, d, world_size)[1] for d in range(world_size)]
    assert max(map(len, parts)) - min(map(len, parts)) <= 1  # 8 on 3 ranks: 3, 3, 2
    got = sum(grads(model, x[p], y[p], lambda loss: loss_for_backward(
        loss, global_batch_size=G, world_size=world_size)) for p in parts) / world_size
    torch.testing.assert_close(got, want)
    # a per-rank mean gives another update as soon as the rank batches differ in size
    naive = sum(grads(model, x[p], y[p], lambda loss: loss.mean()) for p in parts) / world_size
    if len({len(p) for p in parts}) > 1:
        assert not torch.allclose(naive, want)


def test_gradient_accumulation_gives_the_same_update():
    torch.manual_seed(1)
    model = torch.nn.Linear(3, 1, bias=False)
    batch = {"x": torch.randn(7, 3), "y": torch.randn(7)}
    whole = grads(model, batch["x"], batch["y"], lambda loss: loss_for_backward(
        loss, global_batch_size=14, world_size=2))
    model.zero_grad()
    seen = []
    for micro, last in micro_batches(batch, 3):
        seen.append((len(micro["x"]), last))
        with sync_on_last(model, last):
            per_sample = torch.nn.functional.mse_loss(model(micro["x"]).squeeze(1), micro["y"],
                                                      reduction="none")
            loss_for_backward(per_sample, global_batch_size=14, world_size=2).backward()
    assert seen == [(3, False), (3, False), (1, True)]
    torch.testing.assert_close(model.weight.grad, whole)


def test_global_mean_loss_single_process_and_errors():
    losses = torch.tensor([1.0, 2.0, 3.0])
    assert global_mean_loss(losses, global_batch_size=6).item() == 1.0
    summed = loss_for_backward(losses, global_batch_size=6, world_size=2, grad_averaging=False)
    assert summed.item() == 1.0
    with pytest.raises(ConfigError, match="global_batch_size must be a positive int, got 0"):
        loss_for_backward(losses, global_batch_size=0, world_size=1)
    with pytest.raises(ConfigError, match="micro_batch_size must be a positive int"):
        list(micro_batches(losses, 0))
    with pytest.raises(ConfigError, match="different lengths"):
        list(micro_batches({"a": torch.zeros(2), "b": torch.zeros(3)}, 1))


def _ddp_step(rank: int, world_size: int, port: int, data: str, out: str) -> None:
    """One DDP (gloo) step on this rank's batch of global batch 0 with loss_for_backward."""
    import os

    import torch.distributed as dist

    from streamshard import StreamingDataLoader, StreamingDataset, World
    from streamshard.testing import take

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    ds = StreamingDataset(data, global_batch_size=G, seed=2, world=World(rank, world_size))
    batch = take(StreamingDataLoader(ds), 1)[0]
    model = torch.nn.parallel.DistributedDataParallel(linear_model())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    per_sample = sample_losses(model, batch)
    loss_for_backward(per_sample, global_batch_size=G, world_size=world_size).backward()
    opt.step()
    logged = global_mean_loss(per_sample, global_batch_size=G)
    if rank == 0:
        torch.save({"weight": model.module.weight.detach(), "loss": logged}, out)
    dist.destroy_process_group()


def linear_model() -> torch.nn.Linear:
    torch.manual_seed(0)
    return torch.nn.Linear(4, 1, bias=False)


def sample_losses(model, batch) -> torch.Tensor:
    x = batch["tokens"].to(torch.float32) / 100
    return (model(x).squeeze(1) - batch["id"].to(torch.float32) / 100) ** 2


@pytest.mark.slow(reason="three spawned gloo processes with DDP")
def test_real_ddp_update_on_3_ranks_equals_the_one_process_update(id_dataset_factory, tmp_path):
    """8 samples on 3 gloo ranks (3, 3, 2): the same weights after one step as on one process."""
    import torch.multiprocessing as mp

    from streamshard import StreamingDataLoader, StreamingDataset, World
    from streamshard.testing import take
    from tests.net import free_port

    data = id_dataset_factory(64)
    ds = StreamingDataset(data, global_batch_size=G, seed=2, world=World())
    model = linear_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    per_sample = sample_losses(model, take(StreamingDataLoader(ds), 1)[0])
    per_sample.mean().backward()
    opt.step()
    out = str(tmp_path / "rank0.pt")
    mp.start_processes(_ddp_step, args=(3, free_port(), data, out), nprocs=3,
                       start_method="spawn", join=True)
    got = torch.load(out)
    torch.testing.assert_close(got["weight"], model.weight.detach())
    torch.testing.assert_close(got["loss"].to(torch.float32), per_sample.mean().detach())
