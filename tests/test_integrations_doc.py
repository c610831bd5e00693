"""docs/INTEGRATIONS.md: every block marked ``<!-- integrations:run -->`` runs as written, in
order, one namespace per ``##`` section, in a directory holding ``tokens/`` (40 samples,
``input_ids: uint16[8]``), as the doc says at its top. Then the results are checked: the resumed
Trainer logged the uninterrupted run's losses, and each checkpoint holds the loader state."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest

for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("WANDB_DISABLED", "true")

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("accelerate")
pytest.importorskip("lightning.pytorch")

DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs",
                   "INTEGRATIONS.md")
MARK = "<!-- integrations:run -->"
BLOCK = re.compile(r"^```(\w+)\n(.*?)^```", re.S | re.M)


def runnable_blocks() -> list[tuple[str, str]]:
    """``(section, code)`` of each marked block, in document order."""
    text = open(DOC, encoding="utf-8").read()
    out = []
    for mark in re.finditer("^" + re.escape(MARK) + "\n", text, re.M):
        heads = re.findall(r"^## (.+)$", text[:mark.start()], re.M)
        m = BLOCK.match(text, mark.end())
        assert m and m.group(1) == "python", f"{MARK} at offset {mark.start()}: no python block"
        out.append((heads[-1], m.group(2)))
    return out


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    from streamshard import ShardWriter

    with ShardWriter(str(tmp_path / "tokens"), columns={"input_ids": "uint16[8]"},
                     shard_size="256B", block_size="128B") as w:
        for i in range(40):
            w.write({"input_ids": ((np.arange(8) * 3 + i) % 64).astype(np.uint16)})
    monkeypatch.chdir(tmp_path)
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: intra-op threads only spin-wait on a loaded machine
    yield tmp_path
    torch.set_num_threads(before)


def test_integrations_doc_blocks_run_and_resume_exactly(workdir, capsys):
    blocks = runnable_blocks()
    sections = {s for s, _ in blocks}
    assert sections == {"Hugging Face `transformers.Trainer`", "Lightning"}
    namespaces: dict[str, dict] = {}
    for section, code in blocks:
        torch.manual_seed(0)  # the same initial weights for the first and the resumed model
        exec(compile(code, f"INTEGRATIONS.md [{section}]", "exec"),  # noqa: S102 (our doc)
             namespaces.setdefault(section, {}))

    hf = namespaces["Hugging Face `transformers.Trainer`"]
    assert "12" in capsys.readouterr().out.split()
    full, resumed = hf["trainer"], hf["resumed"]
    losses = [{h["step"]: h["loss"] for h in t.state.log_history if "loss" in h} for t in (full, resumed)]
    assert sorted(losses[1]) == list(range(1, 7)) and losses[1] == pytest.approx(losses[0], rel=1e-5)
    for k in (3, 6):
        saved = json.loads((workdir / "run" / f"checkpoint-{k}" / "streamshard_loader.json").read_text())
        assert (saved["global_step"], saved["loader"]["step"]) == (k, 2 * k)

    lightning = namespaces["Lightning"]
    assert lightning["loader"].step == 6  # resumed at 3, trained to max_steps 6
    for k in (3, 6):
        ckpt = torch.load(workdir / "ckpt" / f"step={k}.ckpt", weights_only=False)
        assert [s["step"] for s in ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"]] == [k]
