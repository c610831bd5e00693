"""``streamshard explain`` and ``streamshard quarantine``: from a saved loader state alone."""

from __future__ import annotations

import json

import pytest

from streamshard import StreamingDataLoader, StreamingDataset, World
from streamshard.cli import main
from streamshard.testing import take

N = 203


@pytest.fixture()
def run(id_dataset_factory, tmp_path):
    """A dataset, a loader that consumed 7 steps with a skip, and its state file."""
    path = id_dataset_factory(N)
    loader = StreamingDataLoader(StreamingDataset(path, global_batch_size=6, seed=7, world=World(0, 1)))
    loader.skip(9, 11)
    take(loader, 7)
    state = tmp_path / "state.json"
    state.write_text(json.dumps(loader.state_dict()))
    return path, loader, state


def explain_json(capsys, *argv) -> list[dict]:
    assert main(["explain", *argv, "--json"]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_explain_answers_what_the_loader_serves(run, capsys):
    path, loader, state = run
    out = explain_json(capsys, path, "--state", str(state), "--steps", "7-12", "--world-size", "2")
    served = [b["id"].tolist() for b in take(loader, 3)]  # steps 7, 8, 11 (9 and 10 skipped)
    assert [o["step"] for o in out] == [7, 8, 9, 10, 11, 12]
    assert [o["skipped"] for o in out] == [False, False, True, True, False, False]
    got = [[s["sample_id"] for s in o["samples"]] for o in out if not o["skipped"]][:3]
    assert got == served
    assert [s["keys"]["id"] for s in out[0]["samples"]] == served[0]
    seq = loader.streaming_dataset.sequence  # ranks follow the sampler's rank split
    want = seq.assignment(2).rank_of(seq.step_positions(7)).tolist()
    assert [s["rank"] for s in out[0]["samples"]] == want and sorted(want) == [0, 0, 0, 1, 1, 1]


def test_explain_from_a_checkpoint_meta_and_text_output(run, tmp_path, capsys):
    path, loader, state = run
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"step": 7, "loader": json.loads(state.read_text())}))
    assert main(["explain", path, "--state", str(meta), "--show", "tokens"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("step 7 (epoch 0): 6 samples") and "tokens=uint16[4]" in text


def test_quarantine_add_list_export_remove_and_explain_shows_the_fill(run, tmp_path, capsys):
    path, loader, state = run
    victim = explain_json(capsys, path, "--state", str(state), "--steps", "8")[0]["samples"][4]["sample_id"]
    assert main(["quarantine", "add", str(state), f"0:{victim}", "0:3@0"]) == 0
    assert main(["quarantine", "add", str(state), f"0:{victim}@20"]) == 0  # idempotent: keeps step 7
    capsys.readouterr()
    assert json.loads(state.read_text())["quarantine"] == [[0, 3, 0], [0, victim, 7]]
    row = explain_json(capsys, path, "--state", str(state), "--steps", "8")[0]["samples"][4]
    assert row["filled"] and row["replaces"] == [0, victim] and row["sample_id"] != victim
    out = tmp_path / "q.jsonl"
    assert main(["quarantine", "export", str(state), path, "-o", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["sample_id"], r["keys"]["id"], r["shard_file"]) for r in rows] == [
        (3, 3, "shard-000000.sss"), (victim, victim, "shard-000000.sss")]
    resumed = StreamingDataLoader(StreamingDataset(path, global_batch_size=6, seed=7, world=World(0, 1)))
    resumed.load_state_dict(json.loads(state.read_text()))
    assert victim not in [i for b in take(resumed, 30) for i in b["id"].tolist()]
    assert main(["quarantine", "remove", str(state), "0:3"]) == 0
    assert main(["quarantine", "list", str(state), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1]) == [
        {"stream": 0, "sample_id": victim, "from_step": 7}]


@pytest.mark.parametrize("argv, message", [
    (["--steps", "5-2"], "--steps must satisfy"),  # reversed range
    (["--steps", "x"], "--steps must be N or A-B"),  # not a number
])
def test_explain_usage_errors(run, capsys, argv, message):
    path, _, state = run
    assert main(["explain", path, "--state", str(state), *argv]) == 2
    assert message in capsys.readouterr().err


def test_state_of_another_dataset_is_refused(run, id_dataset_factory, tmp_path, capsys):
    _, _, state = run
    assert main(["explain", id_dataset_factory(50), "--state", str(state)]) == 1
    assert "fingerprints: saved=" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    assert main(["quarantine", "list", str(bad)]) == 1
    assert "neither a loader state" in capsys.readouterr().err
    assert main(["quarantine", "add", str(state), "0-3"]) == 2
    assert "STREAM:ID[@FROM_STEP]" in capsys.readouterr().err


def test_explain_decodes_tokens_with_a_tokenizer(run, tmp_path, capsys):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers.models import WordLevel

    tok = tokenizers.Tokenizer(WordLevel({f"w{i}": i for i in range(400)}, unk_token="w0"))
    tok.save(str(tmp_path / "tokenizer.json"))
    path, loader, state = run
    first = loader.samples_at(7, keys=False)[0].sample_id  # tokens of sample i: i, i+7, i+14, i+21
    assert main(["explain", path, "--state", str(state), "--steps", "7", "--show", "tokens",
                 "--tokenizer", str(tmp_path / "tokenizer.json")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[2].strip() == f'tokens="w{first} w{first + 7} w{first + 14} w{first + 21}"'


def test_explain_a_mixture_state(id_dataset_factory, tmp_path, capsys):
    from streamshard.dataset import Stream

    a, b = id_dataset_factory(60), id_dataset_factory(45)
    ds = StreamingDataset([Stream(a, 0.6), Stream(b, 0.4)], global_batch_size=10, seed=3, world=World(0, 1))
    loader = StreamingDataLoader(ds)
    loader.quarantine([(1, 7, 0)])
    state = tmp_path / "mix.json"
    state.write_text(json.dumps(loader.state_dict()))
    out = explain_json(capsys, a, b, "--state", str(state), "--steps", "0-9", "--no-keys")
    for row in out:
        want = [(r.stream, r.sample_id) for r in loader.samples_at(row["step"], keys=False)]
        assert [(s["stream"], s["sample_id"]) for s in row["samples"]] == want
        assert (1, 7) not in want
    assert main(["explain", b, a, "--state", str(state)]) == 1  # streams in the wrong order
    assert "fingerprints: saved=" in capsys.readouterr().err
