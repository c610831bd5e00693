"""The ``streamshard`` command through real subprocesses: convert, inspect, verify, merge."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from streamshard.index import DatasetIndex

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args, check=None):
    proc = subprocess.run([sys.executable, "-m", "streamshard.cli", *map(str, args)],
                          env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True,
                          text=True, timeout=120)
    if check is not None:
        assert proc.returncode == check, (proc.stdout, proc.stderr)
    return proc


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    with open(d / "docs.jsonl", "w") as f:
        for i in range(2000):
            f.write(json.dumps({"text": f"sample {i} " + "x" * 300, "id": i}) + "\n")
    dest = d / "ds"
    proc = run("convert", d / "docs.jsonl", dest, "--format", "jsonl", "--fields",
               "text:str,id:int64", "--shard-size", "20KB", "--block-size", "4KiB",
               "--chunk-size", "200KB", "--workers", "2", check=0)
    return d, dest, proc


def test_convert_prints_summary_and_progress(dataset):
    _, dest, proc = dataset
    out = proc.stdout
    assert "converted 2,000 samples into" in out and "(4 chunks, 0 reused)" in out
    assert "ratio" in out and "MB/s" in out
    index = DatasetIndex.from_bytes((dest / "index.json").read_bytes(), "index.json")
    assert f"fingerprint {index.fingerprint}" in out
    assert "convert 100.0%" in proc.stderr  # the non-tty progress line


def test_inspect_shows_schema_counts_and_truncated_previews(dataset):
    _, dest, _ = dataset
    out = run("inspect", dest, "--samples", "2", check=0).stdout
    assert "samples     2,000" in out and "text: str" in out and "id: int64" in out
    assert 'text: "sample 1 xxxx' in out and "chars)" in out  # 300 x's are truncated
    assert "sample 2" not in out


def test_verify_ok_then_flipped_byte_names_shard_and_block(dataset, tmp_path):
    _, dest, _ = dataset
    proc = run("verify", dest, check=0)
    assert proc.stdout.startswith("ok: ")
    # a private copy to corrupt
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(dest, bad)
    index = DatasetIndex.from_bytes((bad / "index.json").read_bytes(), "index.json")
    shard = index.shards[3]
    path = bad / shard.file
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    proc = run("verify", bad, check=1)
    problems = [line for line in proc.stdout.splitlines() if line.startswith("CORRUPT")]
    assert problems and all(shard.file in p for p in problems)
    assert any("block" in p for p in problems)
    assert "FAILED" in proc.stdout


def test_merge_parts_inside_dest(tmp_path, dataset):
    d, _, _ = dataset
    merged = tmp_path / "merged"
    for i, fields in enumerate(("text:str,id:int64", "text:str,id:int64")):
        run("convert", d / "docs.jsonl", merged / f"p{i}", "--format", "jsonl", "--fields",
            fields, "--quiet", check=0)
    proc = run("merge", merged / "p0", merged / "p1", merged, check=0)
    assert "merged 2 parts: 4,000 samples" in proc.stdout
    assert "samples     4,000" in run("inspect", merged, check=0).stdout
    run("verify", merged, "--quiet", check=0)


@pytest.mark.parametrize("args,code,message", [
    # usage errors exit 2: argparse ...
    (["convert", "only-one-path", "--format", "jsonl"], 2, "arguments are required: DEST"),
    (["convert", "a", "b", "--format", "nope"], 2, "invalid choice: 'nope'"),
    (["frobnicate"], 2, "invalid choice"),
    # ... and ConfigError: an option of another format
    (["convert", "{src}", "{tmp}/o", "--format", "jsonl", "--seq-len", "4"], 2,
     "option --seq-len does not apply to --format jsonl"),
    # runtime errors exit 1 with one line naming the file and line
    (["convert", "{bad}", "{tmp}/o2", "--format", "jsonl"], 1, "bad.jsonl:2: invalid JSON"),
    (["verify", "{tmp}"], 1, "no index file"),
    (["inspect", "{tmp}/missing"], 1, "does not exist"),
])
def test_errors_are_one_line_with_exit_codes(tmp_path, dataset, args, code, message):
    d, _, _ = dataset
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"a": 1}\n{"a": \n')
    args = [a.format(src=d / "docs.jsonl", tmp=tmp_path, bad=bad) for a in args]
    proc = run(*args, check=code)
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_debug_shows_traceback(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{\n")
    proc = run("convert", bad, tmp_path / "o", "--format", "jsonl", "--debug")
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "InputError" in proc.stderr


def test_skip_errors_summary_lists_locations(tmp_path):
    src = tmp_path / "t.jsonl"
    src.write_text('{"a": 1}\nnope\n{"a": 2}\n[\n')
    proc = run("convert", src, tmp_path / "o", "--format", "jsonl", "--skip-errors", check=0)
    assert "skipped 2 malformed records" in proc.stdout
    assert "t.jsonl:2: invalid JSON" in proc.stdout and "t.jsonl:4: invalid JSON" in proc.stdout
    assert "converted 2 samples" in proc.stdout
