"""``transformers.Trainer`` on a StreamingDataset, as a user's script drives it (issue 13.2).

A 2-layer GPT-2 built from a config (no download, HF offline) trains on a token dataset written
with ShardWriter. An uninterrupted run of 6 optimizer steps (gradient accumulation 2: 12 loader
steps, across the dataset's epoch boundary at 10) checkpoints at steps 3 and 6; a NEW
StreamingTrainer resumes from checkpoint-3. The batches it reads, the batches the model sees and
the losses equal the uninterrupted run's from step 4 on, and it reads nothing before them.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("WANDB_DISABLED", "true")

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from streamshard import ConfigError, ShardWriter, StateMismatchError, StreamingDataset, World  # noqa: E402
from streamshard.hf_trainer import LOADER_STATE_NAME, StreamingTrainer  # noqa: E402

N, T, B, VOCAB = 40, 8, 4, 64  # 10 loader steps per epoch


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """A 2-layer model of width 16 gains nothing from intra-op threads; on a loaded 2-core
    machine their spin-waits made each step ~20x slower (1.2 s vs 0.03 s measured)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tokens(tmp_path_factory) -> str:
    """Sample i: T tokens starting with i (the first token names the sample), and a column the
    model does not take (``doc_id``), which remove_unused_columns must drop."""
    path = str(tmp_path_factory.mktemp("hf") / "tokens")
    with ShardWriter(path, columns={"input_ids": "uint16[8]", "doc_id": "int64"},
                     shard_size="256B", block_size="128B") as w:
        for i in range(N):
            w.write({"input_ids": ((np.arange(T) * 5 + i) % VOCAB).astype(np.uint16), "doc_id": i})
    return path


class CountingDataset(StreamingDataset):
    """Records every rank batch a worker reads: (step, sample ids). Reads happen here only."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.reads: list[tuple[int, list[int]]] = []

    def __getitems__(self, key):
        self.reads.append((key.step, list(key.sample_ids)))
        return super().__getitems__(key)


class RecordingTrainer(StreamingTrainer):
    """Records the first tokens (= sample ids) of every micro-batch the model trains on."""

    seen: list

    def compute_loss(self, model, inputs, *a, **kw):
        self.seen.append(inputs["input_ids"][:, 0].tolist())
        return super().compute_loss(model, inputs, *a, **kw)


def causal_lm(samples):
    """The user's collator: whole samples in (doc_id already removed, as the Trainer's own
    wrapper does), model inputs out (labels = inputs, shifted inside the model)."""
    assert set(samples[0]) == {"input_ids"}
    ids = torch.as_tensor(np.stack([s["input_ids"] for s in samples]), dtype=torch.long)
    return {"input_ids": ids, "labels": ids}


def tiny_model():
    """Dropout stays on (0.1): equal losses after resume need the restored RNG stream too."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=T, n_embd=16, n_layer=2,
                                     n_head=2, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)


def run(path, out, *, resume=None, collator=causal_lm, **extra):
    ds = CountingDataset(path, batch_size=B, seed=3)
    args = transformers.TrainingArguments(
        str(out), per_device_train_batch_size=B, gradient_accumulation_steps=2, max_steps=6,
        save_steps=3, logging_steps=1, learning_rate=1e-2, report_to=[], use_cpu=True,
        dataloader_pin_memory=False, disable_tqdm=True, save_only_model=False, seed=11, **extra)
    trainer = RecordingTrainer(model=tiny_model(), args=args, train_dataset=ds,
                               data_collator=collator)
    trainer.seen = []
    trainer.train(resume_from_checkpoint=resume)
    losses = {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}
    return trainer, ds, losses


def test_resume_from_a_checkpoint_continues_exactly_without_replay(tokens, tmp_path):
    full, full_ds, full_losses = run(tokens, tmp_path / "full")
    # 6 optimizer steps x 2 micro-batches = 12 loader steps, read once each, in order.
    assert [step for step, _ in full_ds.reads] == list(range(12))
    assert full.seen == [ids for _, ids in full_ds.reads]
    epoch0 = sorted(i for _, ids in full_ds.reads[:10] for i in ids)
    assert epoch0 == list(range(N))  # one exact epoch, then the next one's order
    assert [ids for _, ids in full_ds.reads[10:12]] != [ids for _, ids in full_ds.reads[:2]]

    ckpt = tmp_path / "full" / "checkpoint-3"
    saved = json.loads((ckpt / LOADER_STATE_NAME).read_text())
    assert saved["global_step"] == 3 and saved["loader"]["step"] == 6  # 3 steps x 2 micro-batches
    assert json.loads((tmp_path / "full" / "checkpoint-6" / LOADER_STATE_NAME).read_text())[
        "loader"]["step"] == 12

    resumed, resumed_ds, resumed_losses = run(tokens, tmp_path / "full", resume=str(ckpt))
    # O(1) seek: the first read is loader step 6; nothing before it was read or replayed.
    assert resumed_ds.reads == full_ds.reads[6:]
    assert resumed.seen == full.seen[6:]
    assert resumed.state.global_step == 6
    # Same batches, same optimizer/scheduler/RNG state: the same losses from step 4 on.
    # (steps 1-3 come from the checkpoint's log history, 4-6 are trained again)
    assert sorted(resumed_losses) == sorted(full_losses) == list(range(1, 7))
    for step in resumed_losses:
        assert resumed_losses[step] == pytest.approx(full_losses[step], rel=1e-5)


def test_resume_true_takes_the_newest_checkpoint_and_default_collation(tokens, tmp_path):
    """No data_collator: the dataset's own collation (int64 tokens), ``doc_id`` (not a forward
    argument) dropped. No labels column here: the loss comes from compute_loss."""

    class LossFromInputs(RecordingTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, **kw):
            assert set(inputs) == {"input_ids"} and inputs["input_ids"].dtype == torch.int64
            self.seen.append(inputs["input_ids"][:, 0].tolist())
            logits = model(input_ids=inputs["input_ids"]).logits[:, :-1]
            return torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB),
                                                     inputs["input_ids"][:, 1:].reshape(-1))

    def make(max_steps):
        ds = CountingDataset(tokens, batch_size=B, seed=5)
        args = transformers.TrainingArguments(
            str(tmp_path / "a"), per_device_train_batch_size=B, max_steps=max_steps, save_steps=2,
            report_to=[], use_cpu=True, dataloader_pin_memory=False, disable_tqdm=True)
        trainer = LossFromInputs(model=tiny_model(), args=args, train_dataset=ds)
        trainer.seen = []
        return trainer, ds

    def batches(ds, steps):  # what the sampler says steps hold: arithmetic, no read
        return [(s, ds.sequence.batch(s, 0, 1)[1].tolist()) for s in steps]

    first, first_ds = make(3)
    first.train()  # checkpoint-2, then checkpoint-3 at the end
    assert first_ds.reads == batches(first_ds, range(3)) and first.seen == [r[1] for r in first_ds.reads]
    longer, longer_ds = make(5)  # the job is extended: the newest checkpoint is checkpoint-3
    longer.train(resume_from_checkpoint=True)
    assert longer_ds.reads == batches(longer_ds, [3, 4]) and longer.seen == [r[1] for r in longer_ds.reads]
    with pytest.raises(ConfigError, match="checkpoint-5 is at step 5 and max_steps is 5: nothing"):
        make(5)[0].train(resume_from_checkpoint=True)


def test_setup_errors_name_the_fix(tokens, tmp_path):
    def make(**kw):
        ds = StreamingDataset(tokens, world=kw.pop("world", None), **kw.pop("ds", {"batch_size": B}))
        args = transformers.TrainingArguments(str(tmp_path / "e"), report_to=[], use_cpu=True,
                                              **{"per_device_train_batch_size": B, **kw})
        return StreamingTrainer(model=tiny_model(), args=args, train_dataset=ds)

    with pytest.raises(ConfigError, match=r"needs TrainingArguments\(max_steps=...\) > 0.* 10 steps per epoch"):
        make()
    with pytest.raises(ConfigError, match="differs from the StreamingDataset's batch of 4"):
        make(max_steps=2, per_device_train_batch_size=2)
    with pytest.raises(ConfigError, match="built for rank 1 of 2, the Trainer runs rank 0 of 1"):
        make(max_steps=2, world=World(1, 2), ds={"global_batch_size": 8})
    # The plain Trainer batches the dataset's batches again: the error names StreamingTrainer.
    plain = transformers.Trainer(model=tiny_model(), train_dataset=StreamingDataset(tokens, batch_size=B),
                                 args=transformers.TrainingArguments(
                                     str(tmp_path / "p"), per_device_train_batch_size=B, max_steps=1,
                                     report_to=[], use_cpu=True, dataloader_pin_memory=False))
    with pytest.raises(ConfigError, match="with transformers.Trainer, streamshard.hf_trainer.StreamingTrainer"):
        plain.train()
    trainer = make(max_steps=2)
    assert trainer.args.ignore_data_skip is True  # the loader state resumes the data
    # A checkpoint StreamingTrainer did not write (no loader state) is refused by name.
    (tmp_path / "e" / "checkpoint-1").mkdir(parents=True)
    with pytest.raises(StateMismatchError, match=f"checkpoint-1 has no {LOADER_STATE_NAME}"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "e" / "checkpoint-1"))
