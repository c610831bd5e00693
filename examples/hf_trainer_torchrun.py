"""StreamingTrainer under torchrun: 2 gloo ranks on CPU resume exactly (docs/INTEGRATIONS.md).

    python examples/hf_trainer_torchrun.py [WORKDIR]

Writes a small token dataset, then runs (each through ``torch.distributed.run``): a 1-rank
reference, an uninterrupted 2-rank run of 6 optimizer steps (gradient accumulation 2, global batch
8, checkpoints at 3 and 6), and a 2-rank resume from checkpoint-3 in new processes. Checks that
each rank of the resumed run reads steps 6-11 only, that the two ranks' batches together are the
1-rank run's global batches, and that the resumed run logs the uninterrupted 2-rank run's losses
(dropout on: the RNG state resumes too). Not in the test suite: its five transformers start-ups
take ~40 s of CPU (1.5 min of wall on a loaded 2-core machine). Needs ``pip install 'streamshard[hf-trainer]'``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import numpy as np

G, STEPS_OUT = 8, "reads-{rank}{tag}.json"


def train(data: str, out: str, resume: str | None) -> None:
    """One rank's run (called by torchrun); writes what it read and the losses it logged."""
    import torch
    import transformers

    from streamshard import StreamingDataset, detect_world
    from streamshard.hf_trainer import StreamingTrainer

    torch.set_num_threads(1)
    reads: list = []

    class Recorded(StreamingDataset):
        def __getitems__(self, key):
            reads.append([key.step, list(key.sample_ids)])
            return super().__getitems__(key)

    def causal_lm(samples):
        ids = torch.as_tensor(np.stack([s["input_ids"] for s in samples]), dtype=torch.long)
        return {"input_ids": ids, "labels": ids}

    world = detect_world()
    ds = Recorded(data, global_batch_size=G, seed=4)
    args = transformers.TrainingArguments(
        out, per_device_train_batch_size=G // world.world_size, gradient_accumulation_steps=2,
        max_steps=6, save_steps=3, logging_steps=1, report_to=[], use_cpu=True,
        dataloader_pin_memory=False, disable_tqdm=True)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=128, n_positions=8, n_embd=16, n_layer=2, n_head=2))
    trainer = StreamingTrainer(model=model, args=args, train_dataset=ds, data_collator=causal_lm)
    trainer.train(resume_from_checkpoint=resume)
    losses = {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}
    tag = "-resumed" if resume else ""
    with open(os.path.join(out, STEPS_OUT.format(rank=world.rank, tag=tag)), "w") as f:
        json.dump({"reads": reads, "losses": losses}, f)


def main(work: str) -> None:
    from streamshard import ShardWriter

    data = os.path.join(work, "tokens")
    if not os.path.exists(data):
        with ShardWriter(data, columns={"input_ids": "uint16[8]"}, shard_size="1KB",
                         block_size="256B") as w:
            for i in range(96):
                w.write({"input_ids": ((np.arange(8) + i) % 128).astype(np.uint16)})
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")

    def run(ranks: int, out: str, resume: str = "-") -> None:
        subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={ranks}",
                        __file__, "--rank-main", data, out, resume], env=env, check=True,
                       timeout=600)

    def load(out: str, ranks: int, tag: str = "") -> list[dict]:
        return [json.load(open(os.path.join(out, STEPS_OUT.format(rank=r, tag=tag))))
                for r in range(ranks)]

    one, two = os.path.join(work, "one"), os.path.join(work, "two")
    run(1, one)
    run(2, two)
    run(2, two, os.path.join(two, "checkpoint-3"))
    reference = {step: sorted(ids) for step, ids in load(one, 1)[0]["reads"]}
    full, resumed = load(two, 2), load(two, 2, "-resumed")
    for rank in range(2):
        assert [s for s, _ in full[rank]["reads"]] == list(range(12)), full[rank]["reads"]
        assert [s for s, _ in resumed[rank]["reads"]] == list(range(6, 12)), "replayed or skipped"
    for run_ in (full, resumed):
        merged: dict[int, list[int]] = {}
        for rank in run_:
            for step, ids in rank["reads"]:
                merged.setdefault(step, []).extend(ids)
        assert all(sorted(ids) == reference[step] for step, ids in merged.items())
    assert resumed[0]["losses"] == full[0]["losses"], (resumed[0]["losses"], full[0]["losses"])
    print("OK: 2 ranks resumed from checkpoint-3 read steps 6-11 only, the global batches equal "
          "the 1-rank run's, and the losses equal the uninterrupted 2-rank run's:",
          full[0]["losses"])


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--rank-main":
        _, _, data_dir, out_dir, resume_from = sys.argv
        train(data_dir, out_dir, None if resume_from == "-" else resume_from)
    else:
        main(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="hf-torchrun-"))
