"""Packing: the joined stream equals the documents plus eod, every sequence is seq_len long (the
last one padded, with its real length recorded), document boundaries are recoverable; end to end
with a real tokenizer.json trained by the tokenizers package and pre-tokenized input."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamshard.cli import main as cli
from streamshard.converters.packing import PackingConfig, load_tokenizer, pack, unpack
from streamshard.convert_packing import pack_corpus
from streamshard.index import DatasetIndex
from streamshard import open_dataset
from streamshard.errors import ConfigError, InputError, MissingDependencyError

EOD = 7


def expected_stream(docs) -> tuple[np.ndarray, list[int]]:
    parts, starts, pos = [], [], 0
    for d in docs:
        starts.append(pos)
        parts.append(np.append(np.asarray(d, np.int64), EOD))
        pos += len(d) + 1
    return np.concatenate(parts), starts


def check_packed(samples: list[dict], docs, seq_len: int, pad: int) -> None:
    stream, starts = expected_stream(docs)
    assert len(samples) == -(-len(stream) // seq_len)
    for i, s in enumerate(samples):
        assert s["tokens"].shape == (seq_len,)
        full = i < len(samples) - 1
        assert s["length"] == (seq_len if full else len(stream) - seq_len * i)
        assert np.all(s["tokens"][s["length"]:] == pad)
    got_stream, got_starts = unpack(samples)
    assert np.array_equal(got_stream, stream)
    assert got_starts == starts


@settings(max_examples=150, deadline=None)
@given(docs=st.lists(st.lists(st.integers(0, 1000), max_size=40), min_size=1, max_size=30),
       seq_len=st.integers(1, 17), pad=st.sampled_from([None, 0, 65535]))
def test_stream_lengths_and_boundaries(docs, seq_len, pad):
    cfg = PackingConfig(seq_len, EOD, pad, doc_boundaries=True, dtype="uint16")
    check_packed(list(pack(docs, cfg)), docs, seq_len, EOD if pad is None else pad)


# (docs, seq_len, sequences) - one row per edge
EDGES = [
    ([[1, 2, 3]], 4, 1),               # stream fills exactly one sequence: no padding at all
    ([[1, 2, 3]], 2, 2),               # exact multiple across the eod
    ([[]], 3, 1),                      # one empty document: just its eod, padded
    ([list(range(20))], 4, 6),         # a document spanning many sequences
    ([[EOD, EOD], [1]], 3, 2),         # eod inside a document: doc_starts stay exact
    ([[1]] * 9, 2, 9),                 # many short documents per sequence
]


@pytest.mark.parametrize("docs,seq_len,sequences", EDGES)
def test_edges(docs, seq_len, sequences):
    samples = list(pack(docs, PackingConfig(seq_len, EOD, 0, doc_boundaries=True,
                                            dtype="uint32")))
    assert len(samples) == sequences
    check_packed(samples, docs, seq_len, 0)


def test_config_is_validated():
    with pytest.raises(ConfigError, match="seq_len must be a positive int, got 0"):
        PackingConfig(0, EOD)
    with pytest.raises(ConfigError, match="eod_id must be an int in"):
        PackingConfig(8, 70000, dtype="uint16")


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory) -> str:
    """A small BPE tokenizer.json trained with the tokenizers package (a real HF tokenizer)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<|endoftext|>"])
    tok.train_from_iterator([f"the quick brown fox {i} jumps over lazy dogs" for i in range(200)],
                            trainer)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return str(path)


def write_jsonl(path, records) -> None:
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def test_pack_corpus_with_tokenizer_across_files_and_shards(tmp_path, tokenizer_json):
    texts = [f"doc {i}: " + "the quick brown fox " * (i % 13) for i in range(150)]
    write_jsonl(tmp_path / "a.jsonl", [{"text": t, "id": i} for i, t in enumerate(texts[:70])])
    write_jsonl(tmp_path / "b.jsonl", [{"text": t} for t in texts[70:]])
    stats = pack_corpus([str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")],
                        str(tmp_path / "out"), format="jsonl", seq_len=64,
                        tokenizer=tokenizer_json, doc_boundaries=True, shard_size="2KB",
                        block_size="1KB")
    tok = load_tokenizer(tokenizer_json)
    eod = tok.token_to_id("<|endoftext|>")
    ds = open_dataset(str(tmp_path / "out"))
    assert ds.num_shards >= 2 and len(ds) == stats.sequences
    assert ds.schema.to_json() == {"tokens": "uint16[64]", "length": "uint32",
                                   "doc_starts": "uint32[]"}
    stream, starts = unpack(ds[i] for i in range(len(ds)))
    want = [np.append(tok.encode(t, add_special_tokens=False).ids, eod) for t in texts]
    assert np.array_equal(stream, np.concatenate(want))
    assert starts == list(np.cumsum([0] + [len(w) for w in want[:-1]]))
    assert stats.documents == 150 and stats.tokens == len(stream) - 150
    assert ds.index.metadata["packing"]["eod_id"] == eod


def test_pre_tokenized_field_and_bad_records(tmp_path):
    docs = [[1, 2, 3], [4], [], [5, 6]]
    write_jsonl(tmp_path / "t.jsonl", [{"ids": d} for d in docs[:2]] + [{"ids": -1}, {"no": 1}]
                + [{"ids": d} for d in docs[2:]])
    kwargs = dict(format="jsonl", seq_len=3, token_field="ids", eod_id=EOD, doc_boundaries=True)
    with pytest.raises(InputError, match=r"t\.jsonl:3: tokens must be a 1-D"):
        pack_corpus([str(tmp_path / "t.jsonl")], str(tmp_path / "o1"), **kwargs)
    stats = pack_corpus([str(tmp_path / "t.jsonl")], str(tmp_path / "o2"), skip_errors=True,
                        **kwargs)
    assert stats.skipped == 2 and stats.documents == 4
    ds = open_dataset(str(tmp_path / "o2"))
    check_packed([ds[i] for i in range(len(ds))], docs, 3, EOD)
    with pytest.raises(ConfigError, match="--eod-id is required"):
        pack_corpus([str(tmp_path / "t.jsonl")], str(tmp_path / "o3"), format="jsonl",
                    seq_len=3, token_field="ids")


def test_command_line_honours_writer_flags(tmp_path, tokenizer_json, capsys):
    """`streamshard convert --tokenizer` is the one packing command line: the writer flags
    reach the dataset (--compression-level was ignored before)."""
    write_jsonl(tmp_path / "c.jsonl", [{"body": "the lazy dog"}] * 20)
    rc = cli(["convert", str(tmp_path / "c.jsonl"), str(tmp_path / "out"), "--format", "jsonl",
              "--tokenizer", tokenizer_json, "--text-field", "body", "--seq-len", "16",
              "--pad-id", "0", "--fields", "body:str", "--compression-level", "19",
              "--block-size", "4KiB", "--no-resume"])
    assert rc == 0
    assert "packed 20 documents" in capsys.readouterr().out
    ds = open_dataset(str(tmp_path / "out"))
    assert ds[len(ds) - 1]["length"] <= 16 and ds.schema.to_json()["tokens"] == "uint16[16]"
    index = DatasetIndex.from_bytes((tmp_path / "out" / "index.json").read_bytes(), "index.json")
    assert (index.compression_level, index.block_size) == (19, 4096)


def test_missing_tokenizers_package_gives_install_hint(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    with pytest.raises(MissingDependencyError, match=r"pip install 'streamshard\[tokenizers\]'"):
        load_tokenizer(str(tmp_path / "tokenizer.json"))


def test_streamshard_convert_tokenizer_packs(tmp_path, tokenizer_json):
    """`streamshard convert --tokenizer` (the documented entry point) packs like pack_corpus."""
    write_jsonl(tmp_path / "c.jsonl", [{"body": f"the lazy dog {i}"} for i in range(30)])
    rc = cli(["convert", str(tmp_path / "c.jsonl"), str(tmp_path / "out"), "--format", "jsonl",
              "--tokenizer", tokenizer_json, "--text-field", "body", "--seq-len", "16",
              "--fields", "body:str", "--doc-boundaries"])
    assert rc == 0
    ds = open_dataset(str(tmp_path / "out"))
    assert ds.schema.to_json()["tokens"] == "uint16[16]" and "doc_starts" in ds.schema.to_json()
    tokens = [t for i in range(len(ds)) for t in ds[i]["tokens"][: ds[i]["length"]].tolist()]
    ref = str(tmp_path / "ref")
    pack_corpus([str(tmp_path / "c.jsonl")], ref, format="jsonl", seq_len=16,
                options={"fields": "body:str"}, tokenizer=tokenizer_json, text_field="body",
                doc_boundaries=True)
    want = open_dataset(ref)
    assert tokens == [t for i in range(len(want)) for t in want[i]["tokens"][: want[i]["length"]].tolist()]
