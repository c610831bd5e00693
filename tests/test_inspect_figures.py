"""``streamshard inspect --json / --plot`` and ``streamshard benchmark`` (issue 13, item 6): the
figures match the data they describe, the PNG is written (and matplotlib stays optional), and the
benchmark times an epoch and checks its resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from streamshard import ShardWriter, open_dataset
from streamshard.cli import main
from streamshard.stats import dataset_figures, sample_ids

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LENGTHS = [int(x) for x in np.random.default_rng(0).integers(1, 300, 400)]


@pytest.fixture(scope="module")
def ds_path(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("fig") / "ds")
    with ShardWriter(path, columns={"tokens": "uint16[]", "text": "str", "label": "int64"},
                     shard_size="20KB", block_size="4KiB") as w:
        for i, n in enumerate(LENGTHS):
            w.write({"tokens": np.arange(n, dtype=np.uint16), "text": "é" * (i % 7),
                     "label": i})
    return path


def inspect_json(path, capsys, *extra) -> dict:
    assert main(["inspect", path, "--json", *extra]) == 0
    return json.loads(capsys.readouterr().out)


def test_json_figures_describe_the_data(ds_path, capsys):
    doc = inspect_json(ds_path, capsys, "--samples", "1")
    fig = doc["figures"]
    assert doc["samples"] == fig["samples"] == fig["sampled"] == 400
    tokens = fig["columns"]["tokens"]
    assert tokens["elements"]["min"] == min(LENGTHS) and tokens["elements"]["max"] == max(LENGTHS)
    assert tokens["elements"]["mean"] == pytest.approx(np.mean(LENGTHS))
    assert tokens["bytes"]["max"] == 2 * max(LENGTHS)
    assert sum(tokens["elements"]["histogram"]["counts"]) == 400
    text = fig["columns"]["text"]["bytes"]  # UTF-8 bytes: "é" is 2
    assert (text["min"], text["max"]) == (0, 12)
    assert text["histogram"]["counts"] == [sum(1 for i in range(400) if 2 * (i % 7) == b)
                                           for b in range(13)]  # one bin per integer
    assert fig["columns"]["label"] == {"type": "int64", "fixed_bytes": 8}
    with open_dataset(ds_path) as ds:
        shards = ds.index.shards
        assert fig["shards"]["count"] == len(shards) > 1
        assert fig["shards"]["stored_bytes"]["max"] == max(s.bytes for s in shards)
        raw, stored = sum(s.raw_bytes for s in shards), sum(s.bytes for s in shards)
    assert fig["compression"]["ratio"] == pytest.approx(raw / stored)
    assert fig["compression"]["per_shard"]["count"] == len(shards)
    assert doc["preview"][0]["label"] == "0"


def test_per_sample_figures_are_bounded_and_spread(ds_path, capsys):
    doc = inspect_json(ds_path, capsys, "--figure-samples", "10", "--samples", "0")
    assert doc["figures"]["sampled"] == 10
    ids = sample_ids(400, 10)
    assert ids[0] == 0 and ids[-1] == 399 and len(set(ids.tolist())) == 10
    assert doc["figures"]["columns"]["tokens"]["elements"]["max"] == max(LENGTHS[i] for i in ids)


def test_plot_writes_a_png(ds_path, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "fig.png"
    assert main(["inspect", ds_path, "--plot", str(out)]) == 0
    assert f"plot written to {out}" in capsys.readouterr().out
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width > 800 and height > 600  # 2 x 2 panels (tokens, text, shards, compression)
    assert not [p for p in os.listdir(tmp_path) if p != "fig.png"]  # no temp file left


def test_without_matplotlib_plot_says_what_to_install(ds_path, tmp_path):
    blocker = ("import sys\n"
               "class Block:\n"
               "    def find_spec(self, name, path=None, target=None):\n"
               "        if name == 'matplotlib' or name.startswith('matplotlib.'):\n"
               "            raise ImportError(f'blocked {name}')\n"
               "sys.meta_path.insert(0, Block())\n"
               "from streamshard.cli import main\n"
               f"sys.exit(main(['inspect', {ds_path!r}, '--plot', {str(tmp_path / 'x.png')!r}]))\n")
    proc = subprocess.run([sys.executable, "-c", blocker], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=ROOT), timeout=60)
    assert proc.returncode == 1
    assert "pip install 'streamshard[plot]'" in proc.stderr


def test_figures_of_an_empty_column(tmp_path):
    path = str(tmp_path / "e")
    with ShardWriter(path, columns={"b": "bytes"}) as w:
        w.write({"b": b""})
    with open_dataset(path) as ds:
        fig = dataset_figures(ds)
    assert fig["columns"]["b"]["bytes"]["histogram"]["counts"] == [1]


# -- benchmark -------------------------------------------------------------------------------

class Tick:
    """A clock that advances one second per reading, so the figures are exact."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def test_benchmark_times_an_epoch_and_checks_the_resume(id_dataset_factory):
    pytest.importorskip("torch")
    from streamshard.cli_benchmark import run_benchmark

    path = id_dataset_factory(96)
    r = run_benchmark(path, batch_size=8, seed=3, clock=Tick())
    assert r["batches"] == 12 and r["samples"] == 96 and r["settings"]["collate"] == "default"
    # readings: start, first batch, end -> 2 "seconds" for the epoch, 1 to the first batch
    assert r["seconds"] == 2.0 and r["samples_per_second"] == 48.0
    assert r["first_batch_seconds"] == 1.0
    assert r["resume"] == {"at_batch": 6, "seconds_to_first_batch": 1.0, "same_batch": True}
    short = run_benchmark(path, batch_size=8, steps=4, clock=Tick())
    assert short["batches"] == 4 and short["resume"]["at_batch"] == 2


def test_benchmark_cli(id_dataset_factory, capsys):
    pytest.importorskip("torch")
    path = id_dataset_factory(96)
    assert main(["benchmark", path, "--batch-size", "8", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["samples"] == 96 and r["resume"]["same_batch"] is True
    assert main(["benchmark", path, "--batch-size", "8", "--no-shuffle", "--steps", "3"]) == 0
    out = capsys.readouterr().out
    assert "read        3 batches, 24 samples" in out and "in order" in out
    assert "same batch as the uninterrupted run" in out
