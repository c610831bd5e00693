"""docs/MIGRATING.md: every streamshard block marked ``<!-- migrating:run -->`` runs as written.

Python blocks of one ``##`` section share a namespace; ``bash`` blocks run each ``streamshard``
line through the CLI's ``main`` (exit code 0 required). The working directory holds the inputs the
doc names (``corpus.jsonl``, ``hf_saved/``), and ``docs`` / ``train_step`` are defined, as the doc
says at its top."""

from __future__ import annotations

import json
import os
import re
import shlex

import pytest

pytest.importorskip("torch")

DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs",
                   "MIGRATING.md")
MARK = "<!-- migrating:run -->"
BLOCK = re.compile(r"^```(\w+)\n(.*?)^```", re.S | re.M)


def runnable_blocks() -> list[tuple[str, str, str]]:
    """``(section, language, code)`` of each marked block, in document order."""
    text = open(DOC, encoding="utf-8").read()
    out = []
    for mark in re.finditer("^" + re.escape(MARK) + "\n", text, re.M):  # a line of its own
        heads = re.findall(r"^## (.+)$", text[:mark.start()], re.M)
        m = BLOCK.match(text, mark.end())
        assert m, f"{MARK} at offset {mark.start()} is not followed by a fenced block"
        out.append((heads[-1] if heads else "", m.group(1), m.group(2)))
    return out


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    rows = [{"text": f"document number {i} " + "z" * (i % 50), "id": i} for i in range(200)]
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "hf_saved"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run_bash(code: str) -> None:
    from streamshard.cli import main

    for line in code.replace("\\\n", " ").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        argv = shlex.split(line, comments=True)
        assert argv[0] == "streamshard", f"only streamshard commands run here: {line}"
        assert main(argv[1:]) == 0, line


def test_the_doc_has_runnable_blocks_in_every_streamshard_section():
    sections = {s for s, _, _ in runnable_blocks()}
    assert {"Writing a dataset", "Reading for training", "Resuming mid-epoch",
            "Mixing datasets"} <= sections


def test_migrating_guide_blocks_run(workdir, capsys):
    seen: list[dict] = []
    namespaces: dict[str, dict] = {}
    for section, lang, code in runnable_blocks():
        if lang == "bash":
            run_bash(code)
            continue
        assert lang == "python", lang
        ns = namespaces.setdefault(section, {
            "docs": [{"text": f"doc {i}", "tokens": list(range(i, i + 16))} for i in range(50)],
            "train_step": seen.append,
        })
        exec(compile(code, f"MIGRATING.md [{section}]", "exec"), ns)  # noqa: S102 (our doc)
    assert seen, "no block called train_step"
    first = seen[0]
    assert first["id"].shape == (8,) and len(first["text"]) == 8
    out = capsys.readouterr().out
    assert "samples     200" in out  # inspect of the dataset converted from hf_saved
