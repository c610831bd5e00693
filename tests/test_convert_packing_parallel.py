"""Packing through the parallel, resumable conversion driver: the samples equal the in-memory
reference packer whatever the chunking, every worker count writes the same bytes, a SIGKILLed
conversion resumes to the uninterrupted result, and a resume with changed inputs is refused."""

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
from streamshard.convert_packing import TOKENS, make_spec, pack_corpus
from streamshard.converters.packing import PackingConfig, pack, unpack
from streamshard.errors import ConfigError, CorruptionError, InputError
from streamshard.reader import open_dataset

from tests.test_convert_packing import tokenizer_json, write_jsonl  # noqa: F401 (fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EOD = 7


def _samples(dest) -> list[dict]:
    with open_dataset(str(dest)) as ds:
        return [ds[i] for i in range(len(ds))]


def _shard_bytes(dest):
    with open_dataset(str(dest)) as ds:
        files = [s.file for s in ds.index.shards]
        fingerprint = ds.fingerprint
    return fingerprint, [(f, open(os.path.join(dest, f), "rb").read()) for f in files]


def _same_samples(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.keys() == w.keys()
        assert np.array_equal(g["tokens"], w["tokens"]) and g["tokens"].dtype == w["tokens"].dtype
        assert int(g["length"]) == int(w["length"])
        if "doc_starts" in w:
            assert g["doc_starts"].tolist() == w["doc_starts"].tolist()


# (seq_len, chunk_size): one row per way a sequence meets chunk boundaries
LAYOUTS = [
    (3, "1KB"),     # many sequences per chunk, each chunk ends mid-sequence
    (400, "1KB"),   # sequences longer than a chunk's tokens: one reads several chunks ahead
    (5, "64MB"),    # one chunk: the single-process layout
]


@pytest.mark.parametrize("seq_len,chunk_size", LAYOUTS)
def test_chunked_packing_equals_reference_packer(tmp_path, seq_len, chunk_size):
    rng = np.random.default_rng(seq_len)
    docs = [rng.integers(0, 60000, int(n)).tolist() for n in rng.integers(0, 30, 120)]
    docs[5] = docs[6] = []  # empty documents: just their eod
    records = [{"ids": d} for d in docs]
    records[40:40] = [{"ids": "bad"}] * 12  # bad records only: a chunk may hold no document
    write_jsonl(tmp_path / "a.jsonl", records[:70])
    write_jsonl(tmp_path / "b.jsonl", records[70:])
    spec = make_spec(seq_len=seq_len, token_field="ids", eod_id=EOD, pad_id=0,
                     doc_boundaries=True, token_dtype_name="uint16")
    s = convert([str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")], str(tmp_path / "out"),
                format="jsonl", chunk_size=chunk_size, shard_size="1KB", block_size="512B",
                skip_errors=True, packing=spec)
    want = list(pack(docs, PackingConfig(seq_len, EOD, 0, True, "uint16")))
    got = _samples(tmp_path / "out")
    _same_samples(got, want)
    stream, starts = unpack(got)
    assert starts == list(np.cumsum([0] + [len(d) + 1 for d in docs[:-1]]))
    assert s.skipped == 12 and s.counters["documents"] == len(docs)
    assert s.counters["tokens"] == sum(map(len, docs)) and s.samples == len(want)
    assert s.counters["padded_tokens"] == seq_len * len(want) - stream.size
    if chunk_size != "64MB":
        assert s.chunks >= 6
    assert not (tmp_path / "out" / TOKENS).exists() and not (tmp_path / "out" / MARKER).exists()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    words = "the quick brown fox jumps over lazy dogs".split()
    for f in range(3):
        write_jsonl(d / f"c{f}.jsonl", [{"text": " ".join(words[(i + f) % 8:] * (i % 9)) + f" {i}"}
                                       for i in range(400)])
    return d


def test_workers_give_identical_packed_datasets(tmp_path, corpus, tokenizer_json):
    srcs = [str(corpus / f"c{f}.jsonl") for f in range(3)]
    out = []
    for workers in (1, 2):
        stats = pack_corpus(srcs, str(tmp_path / f"w{workers}"), format="jsonl", seq_len=48,
                            tokenizer=tokenizer_json, doc_boundaries=True, shard_size="4KB",
                            chunk_size="12KB", workers=workers)
        out.append((stats.documents, stats.tokens, stats.sequences,
                    _shard_bytes(tmp_path / f"w{workers}")))
    assert out[0] == out[1] and out[0][0] == 1200
    with open_dataset(str(tmp_path / "w2")) as ds:
        assert ds.index.metadata["converter"]["chunks"] >= 6
        assert ds.index.metadata["packing"]["seq_len"] == 48


def _cli(args, **kw):
    return subprocess.run([sys.executable, "-m", "streamshard.cli", *args],
                          env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True,
                          timeout=120, **kw)


def _killed_run(srcs, dest, tokenizer, hook: str, ready) -> None:
    """Run the conversion in a subprocess paced by ``hook`` (0.4 s after each chunk of that
    round), SIGKILL it once ``ready()`` holds."""
    script = (f"import time; from streamshard.convert_packing import make_spec; "
              f"from streamshard.convert import convert; "
              f"spec = make_spec(seq_len=48, tokenizer={tokenizer!r}, doc_boundaries=True); "
              f"convert({srcs!r}, {str(dest)!r}, format='jsonl', chunk_size='12KB', "
              f"shard_size='4KB', packing=spec, {hook}=lambda i: time.sleep(0.4))")
    proc = subprocess.Popen([sys.executable, "-c", script], env=dict(os.environ, PYTHONPATH=ROOT),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None and not ready():
        time.sleep(0.02)
    assert proc.poll() is None, proc.communicate()  # still running: the kill lands midway
    proc.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.mark.slow(reason="three interpreters with tokenizers: the real crash path in both rounds")
def test_sigkill_in_each_round_then_resume_equals_uninterrupted(tmp_path, corpus,
                                                                 tokenizer_json):
    srcs = [str(corpus / f"c{f}.jsonl") for f in range(3)]
    dest = tmp_path / "killed"
    tokens, parts = dest / TOKENS, dest / "parts"

    def sidecars() -> list[str]:
        return [p for p in (os.listdir(tokens) if tokens.exists() else []) if p.endswith(".json")]

    def packed() -> list[str]:
        return [p for p in (os.listdir(parts) if parts.exists() else [])
                if (parts / p / "index.json").exists()]

    _killed_run(srcs, dest, tokenizer_json, "on_tokens", lambda: len(sidecars()) >= 2)
    first = sorted(sidecars())
    assert len(first) >= 2 and not packed() and (dest / MARKER).exists()
    saved = {p: (tokens / p).read_bytes() for p in first}

    _killed_run(srcs, dest, tokenizer_json, "on_chunk", lambda: len(packed()) >= 2)
    done = sorted(packed())
    assert len(done) >= 2 and not (dest / "index.json").exists()
    # what the first run wrote was kept, not rewritten
    assert {p: (tokens / p).read_bytes() for p in first} == saved
    saved_parts = {p: (parts / p / "index.json").read_bytes() for p in done}

    args = ["convert", *srcs, "--format", "jsonl", "--tokenizer", tokenizer_json,
            "--seq-len", "48", "--doc-boundaries", "--chunk-size", "12KB", "--shard-size", "4KB",
            "--quiet"]
    resumed = _cli([*args, str(dest), "--workers", "2"])
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming:" in resumed.stderr
    assert {p: (parts / p / "index.json").read_bytes() for p in done} == saved_parts
    convert(srcs, str(tmp_path / "clean"), format="jsonl", chunk_size="12KB", shard_size="4KB",
            packing=make_spec(seq_len=48, tokenizer=tokenizer_json, doc_boundaries=True))
    assert _shard_bytes(dest) == _shard_bytes(tmp_path / "clean")
    assert not tokens.exists() and not (dest / MARKER).exists()


def test_resume_refuses_changed_inputs_and_tokenizer_and_checks_token_files(
        tmp_path, tokenizer_json):
    src = tmp_path / "in.jsonl"
    write_jsonl(src, [{"text": f"the lazy dog {i}"} for i in range(300)] + [{"text": 5}])
    dest = tmp_path / "ds"
    kw = dict(format="jsonl", seq_len=16, tokenizer=tokenizer_json, chunk_size="2KB")
    with pytest.raises(InputError, match=r"in\.jsonl:301: text field must be a string"):
        pack_corpus([str(src)], str(dest), **kw)
    assert (dest / MARKER).exists() and len(os.listdir(dest / TOKENS)) >= 4

    other = tmp_path / "other.json"
    other.write_bytes(open(tokenizer_json, "rb").read().replace(b'"lazy"', b'"lazz"'))
    with pytest.raises(ConfigError, match="packing: unfinished conversion used"):
        pack_corpus([str(src)], str(dest), **{**kw, "tokenizer": str(other)})
    with pytest.raises(ConfigError, match="seq_len"):
        pack_corpus([str(src)], str(dest), **{**kw, "seq_len": 17})

    # a damaged token file is found by its checksum, not packed
    victim = sorted((dest / TOKENS).glob("*.bin"))[0]
    data = bytearray(victim.read_bytes())
    data[0] ^= 1
    victim.write_bytes(bytes(data))
    with pytest.raises(CorruptionError, match="token file does not match its sidecar"):
        pack_corpus([str(src)], str(dest), **{**kw, "skip_errors": True})

    with open(src, "a") as f:  # the input changed since the crash
        f.write(json.dumps({"text": "one more"}) + "\n")
    with pytest.raises(ConfigError, match=r"input .*in\.jsonl changed"):
        pack_corpus([str(src)], str(dest), **kw)
    stats = pack_corpus([str(src)], str(dest), **{**kw, "skip_errors": True, "resume": False})
    assert stats.documents == 301 and stats.skipped == 1


def test_command_line_takes_workers_chunk_size_and_resume(tmp_path, capsys):
    write_jsonl(tmp_path / "c.jsonl", [{"ids": [1, 2, 3, i]} for i in range(200)])
    args = ["convert", str(tmp_path / "c.jsonl"), "--format", "jsonl", "--token-field", "ids",
            "--eod-id", "0", "--seq-len", "10", "--chunk-size", "1KB", "--quiet"]
    from streamshard.cli import main as cli

    assert cli([*args, str(tmp_path / "one")]) == 0
    assert cli([*args, str(tmp_path / "two"), "--workers", "2", "--resume"]) == 0
    out = capsys.readouterr().out
    assert "packed 200 documents (800 tokens) into 100 sequences of 10" in out
    assert _shard_bytes(tmp_path / "one") == _shard_bytes(tmp_path / "two")


def test_packing_into_an_fsspec_destination(tmp_path):
    """A non-local destination (fsspec's in-memory filesystem: what the driver does on S3 too,
    one put per file): token files, parts and index go through it, the dataset equals the
    local conversion, and the token files are removed at the end."""
    import fsspec

    write_jsonl(tmp_path / "c.jsonl", [{"ids": [1, 2, 3, i]} for i in range(300)])
    spec = make_spec(seq_len=8, token_field="ids", eod_id=0, doc_boundaries=True)
    kw = dict(format="jsonl", chunk_size="1KB", packing=spec)
    local = convert([str(tmp_path / "c.jsonl")], str(tmp_path / "local"), **kw)
    url = f"memory://tok-{os.getpid()}/ds"
    remote = convert([str(tmp_path / "c.jsonl")], url, **kw)
    fs = fsspec.filesystem("memory")
    try:
        assert remote.chunks == local.chunks >= 5 and remote.fingerprint == local.fingerprint
        assert remote.samples == local.samples == 188  # ceil(300 * 5 / 8)
        assert not fs.exists(f"/tok-{os.getpid()}/ds/{TOKENS}")
        assert not fs.exists(f"/tok-{os.getpid()}/ds/{MARKER}")
    finally:
        fs.rm(f"/tok-{os.getpid()}", recursive=True)

