"""Lightning's Trainer with a StreamingDataLoader and no glue (issue 13.2): the loader is
``Stateful`` (``state_dict``/``load_state_dict``), so Lightning's fit loop stores its state in the
checkpoint (``loops.fit_loop.state_dict.combined_loader``) and restores it on ``fit(ckpt_path=...)``.

An uninterrupted run of 14 steps (10 per epoch, so it crosses an epoch) checkpoints every 3 steps;
a NEW Trainer resumes from the step-6 checkpoint (mid-epoch 0) and another from step 12 (mid-epoch
1). The batches each trains on equal the uninterrupted run's from there on, the loader reads
nothing before them, and the final weights are equal.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
L = pytest.importorskip("lightning.pytorch")

from streamshard import StreamingDataLoader, StreamingDataset  # noqa: E402

N, G = 40, 4  # 10 steps per epoch


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny model: intra-op threads only spin-wait on a loaded 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class CountingDataset(StreamingDataset):
    """Records the step of every rank batch read (workers: 0, so reads happen here)."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.reads: list[int] = []

    def __getitems__(self, key):
        self.reads.append(key.step)
        return super().__getitems__(key)


class TinyLM(L.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(64, 8)
        self.head = torch.nn.Linear(8, 64)
        self.seen: list[list[int]] = []

    def training_step(self, batch, batch_idx):
        self.seen.append(batch["id"].tolist())
        tokens = batch["tokens"] % 64
        logits = self.head(self.embed(tokens[:, :-1]))
        return torch.nn.functional.cross_entropy(logits.reshape(-1, 64), tokens[:, 1:].reshape(-1))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(path, ckpt_dir, *, max_steps, ckpt_path=None):
    ds = CountingDataset(path, global_batch_size=G, seed=9)
    model = TinyLM()
    trainer = L.Trainer(
        max_steps=max_steps, accelerator="cpu", devices=1, logger=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        callbacks=[L.callbacks.ModelCheckpoint(dirpath=str(ckpt_dir), every_n_train_steps=3,
                                               save_top_k=-1, filename="{step}")])
    trainer.fit(model, train_dataloaders=StreamingDataLoader(ds), ckpt_path=ckpt_path)
    return model, ds


def test_lightning_resumes_mid_epoch_exactly_through_its_own_checkpoint(id_dataset_factory, tmp_path):
    path = id_dataset_factory(N)
    full, full_ds = fit(path, tmp_path / "ckpt", max_steps=14)
    assert full_ds.reads == list(range(14))  # no prefetch past what was trained
    assert sorted(i for ids in full.seen[:10] for i in ids) == list(range(N))  # one exact epoch

    for at in (6, 12):  # mid-epoch 0, and mid-epoch 1 (the loader's epoch and Lightning's agree)
        ckpt = tmp_path / "ckpt" / f"step={at}.ckpt"
        saved = torch.load(ckpt, weights_only=False)["loops"]["fit_loop"]["state_dict"]
        # The mechanism: Lightning's fit loop saved the loader's state_dict() (it is Stateful).
        assert [s["step"] for s in saved["combined_loader"]] == [at]

        resumed, resumed_ds = fit(path, tmp_path / f"again{at}", max_steps=14, ckpt_path=str(ckpt))
        assert resumed_ds.reads == list(range(at, 14))  # O(1) seek: nothing before was read
        assert resumed.seen == full.seen[at:]
        for a, b in zip(resumed.parameters(), full.parameters()):
            torch.testing.assert_close(a, b)  # the same batches in the same order: same weights
