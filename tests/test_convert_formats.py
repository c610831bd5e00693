"""Converters on real files written by the tests: jsonl, text, tokens, parquet."""

from __future__ import annotations

import gzip
import json
import os

import numpy as np
import pytest
import zstandard

from streamshard.convert import convert
from streamshard.errors import ConfigError, InputError, MissingDependencyError
from streamshard.reader import open_dataset

RECORDS = [{"text": f"doc {i} " + "é" * (i % 5), "id": i, "meta": {"k": [i, None]}}
           for i in range(300)]


def _write_jsonl(path, records, compress=None):
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()
    if compress == "gz":
        data = gzip.compress(data)
    elif compress == "zst":
        data = zstandard.ZstdCompressor().compress(data)
    path.write_bytes(data)
    return str(path)


def _samples(dest):
    with open_dataset(str(dest)) as ds:
        return list(ds)


# -- jsonl ---------------------------------------------------------------------------------

@pytest.mark.parametrize("compress,name", [(None, "a.jsonl"), ("gz", "a.jsonl.gz"),
                                           ("zst", "a.jsonl.zst")])
def test_jsonl_fields_typed_and_compressed(tmp_path, compress, name):
    src = _write_jsonl(tmp_path / name, RECORDS, compress)
    s = convert([src], str(tmp_path / "ds"), format="jsonl",
                options={"fields": "text:str,id:int64,meta"}, chunk_size=2000)
    got = _samples(tmp_path / "ds")
    assert got == [{"text": r["text"], "id": r["id"], "meta": r["meta"]} for r in RECORDS]
    assert s.samples == 300 and s.skipped == 0
    with open_dataset(str(tmp_path / "ds")) as ds:
        assert ds.schema.to_json() == {"text": "str", "id": "int64", "meta": "json"}


def test_jsonl_whole_records_any_json_value(tmp_path):
    records = [{"a": 1}, [1, 2], "s", 3.5, None, {"nested": {"x": [True]}}]
    src = tmp_path / "mixed.ndjson"
    src.write_text("\n".join(json.dumps(r) for r in records) + "\n\n   \n")  # blank lines skipped
    convert([str(src)], str(tmp_path / "ds"), format="jsonl")
    assert _samples(tmp_path / "ds") == [{"json": r} for r in records]


def _bad_file(tmp_path, bad_lines):
    lines = [json.dumps({"text": f"t{i}", "id": i}) for i in range(400)]
    for no, text in bad_lines.items():
        lines[no - 1] = text
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_jsonl_malformed_stops_naming_file_and_line_keeping_finished_chunks(tmp_path):
    # line 350 lies in a later byte-range chunk: its number is counted from the file start
    src = _bad_file(tmp_path, {350: '{"text": "broken", '})
    dest = tmp_path / "ds"
    with pytest.raises(InputError, match=r"bad\.jsonl:350: invalid JSON"):
        convert([src], str(dest), format="jsonl", options={"fields": "text:str,id:int64"},
                chunk_size=1000)
    assert not (dest / "index.json").exists()
    parts = sorted(os.listdir(dest / "parts"))
    assert parts and all((dest / "parts" / p / "index.json").exists() for p in parts)
    assert len(parts) < 12  # the failing chunk's output was removed, the finished ones stay


@pytest.mark.parametrize("bad,message", [
    ('{"text": "x"}', "bad.jsonl:7: record has no field 'id'"),       # missing field
    ('{"text": "x", "id": "seven"}', "bad.jsonl:7: column 'id'"),     # writer's SchemaError
    ('[1, 2]', "bad.jsonl:7: expected a JSON object"),                 # not an object
    (b'{"text": "\xff", "id": 1}', "bad.jsonl:7: invalid UTF-8"),     # bytes, not UTF-8
])
def test_jsonl_malformed_kinds_name_the_line(tmp_path, bad, message):
    src = _bad_file(tmp_path, {})
    lines = open(src, "rb").read().split(b"\n")
    lines[6] = bad if isinstance(bad, bytes) else bad.encode()
    open(src, "wb").write(b"\n".join(lines))
    with pytest.raises(InputError) as err:
        convert([src], str(tmp_path / "ds"), format="jsonl",
                options={"fields": "text:str,id:int64"})
    assert message in str(err.value)


def test_jsonl_skip_errors_counts_and_names_locations(tmp_path):
    src = _bad_file(tmp_path, {3: "not json", 250: '{"id": 1}', 399: '{"text": 1, "id": 2}'})
    s = convert([src], str(tmp_path / "ds"), format="jsonl",
                options={"fields": "text:str,id:int64"}, chunk_size=1500, skip_errors=True)
    assert s.skipped == 3 and s.samples == 397
    assert [e.split(":")[1] for e in s.skipped_examples] == ["3", "250", "399"]
    ids = [x["id"] for x in _samples(tmp_path / "ds")]
    assert ids == [i for i in range(400) if i + 1 not in (3, 250, 399)]
    with open_dataset(str(tmp_path / "ds")) as ds:
        assert ds.index.metadata["converter"]["skipped_records"] == 3


# -- text ------------------------------------------------------------------------------------

def _text_tree(tmp_path):
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    (root / ".hidden").mkdir()
    (root / "b.txt").write_text("bee\n\nline two\r\n")
    (root / "a.txt").write_text("alpha")
    (root / "sub" / "c.md").write_text("  \nsea\n")
    (root / ".secret").write_text("skipped: hidden")
    (root / ".hidden" / "x.txt").write_text("skipped: hidden dir")
    return root


def test_text_file_mode_one_sample_per_file_sorted(tmp_path):
    root = _text_tree(tmp_path)
    convert([str(root)], str(tmp_path / "ds"), format="text")
    assert _samples(tmp_path / "ds") == [
        {"text": "alpha", "path": "a.txt"},
        {"text": "bee\n\nline two\r\n", "path": "b.txt"},
        {"text": "  \nsea\n", "path": "sub/c.md"},
    ]


def test_text_line_mode_skips_blank_lines(tmp_path):
    root = _text_tree(tmp_path)
    convert([str(root)], str(tmp_path / "ds"), format="text", options={"mode": "line"})
    assert [x["text"] for x in _samples(tmp_path / "ds")] == ["alpha", "bee", "line two", "sea"]


def test_text_line_mode_invalid_utf8_names_line(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes(b"ok\nfine\n\xc3\x28 broken\nlast\n")
    with pytest.raises(InputError, match=r"t\.txt:3: invalid UTF-8"):
        convert([str(path)], str(tmp_path / "ds"), format="text", options={"mode": "line"})
    s = convert([str(path)], str(tmp_path / "ds2"), format="text", options={"mode": "line"},
                skip_errors=True)
    assert s.skipped == 1 and [x["text"] for x in _samples(tmp_path / "ds2")] == ["ok", "fine",
                                                                                  "last"]


def test_glob_sources_and_dest_inside_source_is_not_an_input(tmp_path):
    root = _text_tree(tmp_path)
    convert([str(root / "*.txt")], str(root / "out"), format="text")
    assert [x["path"] for x in _samples(root / "out")] == ["a.txt", "b.txt"]
    # converting root into root/out again: the old dataset files under dest are not inputs
    convert([str(root)], str(root / "out"), format="text", overwrite=True)
    assert [x["path"] for x in _samples(root / "out")] == ["a.txt", "b.txt", "sub/c.md"]


# -- tokens ----------------------------------------------------------------------------------

def test_tokens_npy_drops_and_counts_tail(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 50000, 10_037, dtype=np.uint16)
    np.save(tmp_path / "t.npy", tokens)
    s = convert([str(tmp_path / "t.npy")], str(tmp_path / "ds"), format="tokens",
                options={"seq_len": 100}, chunk_size=3000)
    got = np.stack([x["tokens"] for x in _samples(tmp_path / "ds")])
    np.testing.assert_array_equal(got, tokens[:10_000].reshape(100, 100))
    assert got.dtype == np.uint16 and s.counters == {"dropped_tokens": 37} and s.chunks > 1


def test_tokens_raw_keep_tail_and_multiple_files(tmp_path):
    a = np.arange(250, dtype=np.uint32) * 70_000
    b = np.arange(64, dtype=np.uint32)
    a.tofile(tmp_path / "a.bin")
    b.tofile(tmp_path / "b.bin")
    s = convert([str(tmp_path)], str(tmp_path / "ds"), format="tokens",
                options={"seq_len": 64, "dtype": "uint32", "keep_tail": True})
    got = [x["tokens"] for x in _samples(tmp_path / "ds")]
    assert [len(t) for t in got] == [64, 64, 64, 58, 64]  # each file is its own stream
    np.testing.assert_array_equal(np.concatenate(got), np.concatenate([a, b]))
    assert s.counters == {}
    with open_dataset(str(tmp_path / "ds")) as ds:
        assert ds.schema.to_json() == {"tokens": "uint32[]"}


@pytest.mark.parametrize("setup,options,error,match", [
    # raw files do not say their dtype
    (lambda d: np.arange(8, dtype=np.uint16).tofile(d / "x.bin"), {"seq_len": 4},
     ConfigError, "need --dtype"),
    # 7 bytes cannot be uint16 tokens
    (lambda d: (d / "x.bin").write_bytes(b"\x00" * 7), {"seq_len": 2, "dtype": "uint16"},
     InputError, r"x\.bin: size 7 bytes is not a multiple of 2"),
    # the .npy header disagrees with --dtype
    (lambda d: np.save(d / "x.npy", np.arange(8, dtype=np.int32)),
     {"seq_len": 2, "dtype": "uint16"}, InputError, "differs from --dtype uint16"),
    # float arrays are not tokens
    (lambda d: np.save(d / "x.npy", np.ones(8)), {"seq_len": 2}, InputError, "not a token dtype"),
    # --seq-len is required
    (lambda d: np.save(d / "x.npy", np.arange(8, dtype=np.int32)), {}, ConfigError, "--seq-len"),
])
def test_tokens_bad_input(tmp_path, setup, options, error, match):
    src = tmp_path / "in"
    src.mkdir()
    setup(src)
    with pytest.raises(error, match=match):
        convert([str(src)], str(tmp_path / "ds"), format="tokens", options=options)


# -- parquet ---------------------------------------------------------------------------------

def _parquet(path, n=50, nulls=False):
    import datetime

    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({
        "id": pa.array(range(n), pa.int64()),
        "score": pa.array([i / 4 for i in range(n)], pa.float32()),
        "flag": pa.array([i % 2 == 0 for i in range(n)]),
        "text": pa.array([None if nulls and i == 7 else f"row {i}" for i in range(n)]),
        "blob": pa.array([bytes([i % 256]) * 3 for i in range(n)], pa.binary()),
        "toks": pa.array([list(range(i % 5)) for i in range(n)], pa.list_(pa.int32())),
        "vec": pa.array([[i, i + 1, i + 2] for i in range(n)], pa.list_(pa.float32(), 3)),
        "info": pa.array([{"a": i, "b": str(i)} for i in range(n)]),
        "when": pa.array([datetime.datetime(2024, 1, 1) + datetime.timedelta(hours=i)
                          for i in range(n)], pa.timestamp("s")),
        "cat": pa.array([["x", "y"][i % 2] for i in range(n)]).dictionary_encode(),
    })
    pq.write_table(table, path, row_group_size=16)
    return str(path)


def test_parquet_keeps_every_field_with_mapped_types(tmp_path):
    src = _parquet(tmp_path / "a.parquet")
    s = convert([src], str(tmp_path / "ds"), format="parquet", chunk_size=1000)
    assert s.samples == 50 and s.chunks > 1  # row groups spread over several chunks
    with open_dataset(str(tmp_path / "ds")) as ds:
        assert ds.schema.to_json() == {
            "id": "int64", "score": "float32", "flag": "bool", "text": "str", "blob": "bytes",
            "toks": "int32[]", "vec": "float32[3]", "info": "json", "when": "json", "cat": "str"}
        rows = list(ds)
    r = rows[9]
    assert (r["id"], r["score"], r["flag"], r["text"], r["blob"]) == (9, 2.25, False, "row 9",
                                                                      b"\x09" * 3)
    np.testing.assert_array_equal(r["toks"], np.arange(4, dtype=np.int32))
    np.testing.assert_array_equal(r["vec"], np.array([9, 10, 11], dtype=np.float32))
    assert (r["info"], r["when"], r["cat"]) == ({"a": 9, "b": "9"}, "2024-01-01T09:00:00", "y")
    assert [x["id"] for x in rows] == list(range(50))


def test_parquet_null_is_malformed_unless_json(tmp_path):
    src = _parquet(tmp_path / "a.parquet", nulls=True)
    with pytest.raises(InputError, match=r"a\.parquet: row 7: column 'text' is null"):
        convert([src], str(tmp_path / "ds"), format="parquet")
    convert([src], str(tmp_path / "ds2"), format="parquet", options={"fields": "id,text:json"})
    rows = _samples(tmp_path / "ds2")
    assert rows[7] == {"id": 7, "text": None} and rows[8] == {"id": 8, "text": "row 8"}


def test_parquet_missing_pyarrow_says_what_to_install(tmp_path, monkeypatch):
    import sys

    src = _parquet(tmp_path / "a.parquet")
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # import now raises ImportError
    with pytest.raises(MissingDependencyError, match=r"pip install 'streamshard\[parquet\]'"):
        convert([src], str(tmp_path / "ds"), format="parquet")
