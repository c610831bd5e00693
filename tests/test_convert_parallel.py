"""Parallel conversion: identical output for any --workers, crash-resume, argument checks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from streamshard.convert import MARKER, convert
from streamshard.errors import ConfigError, DatasetExistsError, InputError
from streamshard.reader import open_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _shard_bytes(dest):
    with open_dataset(str(dest)) as ds:
        files = [s.file for s in ds.index.shards]
        fingerprint = ds.fingerprint
    return fingerprint, [(f, open(os.path.join(dest, f), "rb").read()) for f in files]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(3)
    # Zipf-like tokens in two files, one with a tail
    for name, n in (("a.npy", 41_000), ("b.npy", 30_000)):
        np.save(d / name, np.minimum(rng.zipf(1.3, n), 65535).astype(np.uint16))
    with open(d / "docs.jsonl", "w") as f:
        for i in range(3000):
            f.write(json.dumps({"text": "word " * (i % 40), "id": i}) + "\n")
    return d


@pytest.mark.parametrize("fmt,src,options", [
    ("tokens", ["a.npy", "b.npy"], {"seq_len": 512}),
    ("jsonl", ["docs.jsonl"], {"fields": "text:str,id:int64"}),
])
def test_workers_give_identical_datasets(tmp_path, inputs, fmt, src, options):
    results = []
    for workers in (1, 2):
        dest = tmp_path / f"w{workers}"
        s = convert([str(inputs / x) for x in src], str(dest), format=fmt, options=options,
                    workers=workers, chunk_size="40KB", shard_size="16KB")
        assert s.chunks >= 3
        results.append((s.samples, s.counters, _shard_bytes(dest)))
    assert results[0] == results[1]
    assert not (tmp_path / "w2" / MARKER).exists()


def _cli(args, env=None, **kw):
    full_env = dict(os.environ, PYTHONPATH=ROOT, **(env or {}))
    return subprocess.run([sys.executable, "-m", "streamshard.cli", *args], env=full_env,
                          capture_output=True, text=True, timeout=120, **kw)


def test_sigkill_midway_then_resume_equals_uninterrupted(tmp_path, inputs):
    args = ["convert", str(inputs / "a.npy"), str(inputs / "b.npy"), "--format", "tokens",
            "--seq-len", "256", "--chunk-size", "20KB", "--shard-size", "8KB", "--quiet"]
    dest = tmp_path / "killed"
    # The same conversion through the library, paced by its on_chunk hook (0.4 s after each
    # chunk) so the SIGKILL lands between chunks; the resume below goes through the CLI.
    script = (f"import time; from streamshard.convert import convert; "
              f"convert({[str(inputs / 'a.npy'), str(inputs / 'b.npy')]!r}, {str(dest)!r}, "
              f"format='tokens', options={{'seq_len': 256}}, chunk_size='20KB', shard_size='8KB', "
              f"on_chunk=lambda i: time.sleep(0.4))")
    proc = subprocess.Popen([sys.executable, "-c", script], env=dict(os.environ, PYTHONPATH=ROOT),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    parts = dest / "parts"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        done = [p for p in (os.listdir(parts) if parts.exists() else [])
                if (parts / p / "index.json").exists()]
        if len(done) >= 2:
            break
        time.sleep(0.02)
    assert proc.poll() is None, proc.communicate()  # still running: the kill lands midway
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(done) >= 2 and not (dest / "index.json").exists()
    assert (dest / MARKER).exists()

    resumed = _cli([*args, str(dest)])
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming:" in resumed.stderr
    reused = int(resumed.stdout.split(" reused)")[0].rsplit(", ", 1)[1])
    assert reused >= 2

    clean = _cli([*args, str(tmp_path / "clean")])
    assert clean.returncode == 0, clean.stderr
    assert _shard_bytes(dest) == _shard_bytes(tmp_path / "clean")
    assert not (dest / MARKER).exists()


def test_resume_refuses_other_arguments_and_no_resume_discards(tmp_path, inputs):
    src = inputs / "docs.jsonl"
    dest = tmp_path / "ds"
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(src.read_bytes() + b"{oops\n")
    with pytest.raises(InputError, match=r"bad\.jsonl:3001"):
        convert([str(bad)], str(dest), format="jsonl", chunk_size="30KB")
    assert (dest / MARKER).exists()
    # different arguments are refused, naming the difference
    with pytest.raises(ConfigError, match=r"chunk_size: unfinished conversion used 30000, "
                                          r"now 64000000"):
        convert([str(bad)], str(dest), format="jsonl")
    # --skip-errors does not change finished chunks, so the rerun resumes with it
    s = convert([str(bad)], str(dest), format="jsonl", chunk_size="30KB", skip_errors=True)
    assert s.reused_chunks >= 1 and s.skipped == 1 and s.samples == 3000

    with pytest.raises(InputError):
        convert([str(bad)], str(tmp_path / "ds2"), format="jsonl", chunk_size="30KB")
    bad.write_bytes(src.read_bytes())  # the input is fixed: its size changes
    with pytest.raises(ConfigError, match=r"input .*bad\.jsonl changed"):
        convert([str(bad)], str(tmp_path / "ds2"), format="jsonl", chunk_size="30KB")
    s = convert([str(bad)], str(tmp_path / "ds2"), format="jsonl", chunk_size="30KB",
                resume=False)
    assert s.reused_chunks == 0 and s.samples == 3000 and s.skipped == 0


def test_error_with_two_workers_keeps_finished_chunks(tmp_path, inputs):
    lines = (inputs / "docs.jsonl").read_bytes().split(b"\n")
    lines[2500] = b"{broken"
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b"\n".join(lines))
    dest = tmp_path / "ds"
    with pytest.raises(InputError, match=r"bad\.jsonl:2501: invalid JSON"):
        convert([str(bad)], str(dest), format="jsonl", chunk_size="20KB", workers=2)
    parts = sorted(os.listdir(dest / "parts"))
    assert parts and all((dest / "parts" / p / "index.json").exists() for p in parts)


def test_existing_dataset_needs_overwrite(tmp_path, inputs):
    dest = tmp_path / "ds"
    convert([str(inputs / "docs.jsonl")], str(dest), format="jsonl")
    with pytest.raises(DatasetExistsError, match="--overwrite"):
        convert([str(inputs / "docs.jsonl")], str(dest), format="jsonl")
    s = convert([str(inputs / "a.npy")], str(dest), format="tokens", options={"seq_len": 1000},
                overwrite=True)
    with open_dataset(str(dest)) as ds:
        assert len(ds) == s.samples == 41 and ds.schema.to_json() == {"tokens": "uint16[1000]"}


def test_workers_from_a_script_on_stdin(tmp_path):
    """`python - <<EOF` has no main file a new interpreter could import: the driver forks then,
    and the result is the same dataset as with one worker."""
    import json as _json
    import subprocess
    import sys

    from streamshard.convert import convert

    src = tmp_path / "in.jsonl"
    src.write_text("".join(_json.dumps({"k": i, "t": "x" * 50}) + "\n" for i in range(3000)))
    script = (f"from streamshard.convert import convert\n"
              f"s = convert([{str(src)!r}], {str(tmp_path / 'two')!r}, format='jsonl', workers=2, "
              f"chunk_size='40KB')\nprint(s.fingerprint)\n")
    proc = subprocess.run([sys.executable, "-"], input=script, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    one = convert([str(src)], str(tmp_path / "one"), format="jsonl", workers=1, chunk_size="40KB")
    assert proc.stdout.strip().splitlines()[-1] == one.fingerprint
