"""MDS directories written by mosaicml-streaming's own MDSWriter: every column and sample
survives, for each supported encoding and compression; pkl is refused, corruption is named."""

from __future__ import annotations

import io
import json
import os
import sys
from decimal import Decimal

import numpy as np
import pytest

from streamshard.converters.mds import load_index
from streamshard.errors import ConfigError, InputError
from tests.convert_helpers import assert_same_value, convert_direct, mds_writer, read_all

MDSWriter = mds_writer()
pytestmark = pytest.mark.skipif(MDSWriter is None, reason="mosaicml-streaming not installed")

COLUMNS = {
    "raw": "bytes", "text": "str", "n": "int", "u8": "uint8", "i16": "int16", "u64": "uint64",
    "f16": "float16", "f32": "float32", "f64": "float64", "si": "str_int", "sf": "str_float",
    "sd": "str_decimal", "meta": "json", "tokens": "ndarray:uint16", "grid": "ndarray:float32:2,3",
    "any": "ndarray",
}
# the streamshard type each MDS encoding maps to (docs/CONVERTERS.md)
EXPECTED_TYPES = {
    "any": "int64[...]", "f16": "float16", "f32": "float32", "f64": "float64",
    "grid": "float32[2,3]",
    "i16": "int16", "meta": "json", "n": "int64", "raw": "bytes", "sd": "str", "sf": "float64",
    "si": "int64", "text": "str", "tokens": "uint16[...]", "u64": "uint64", "u8": "uint8",
}


def make_samples(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        out.append({
            "raw": bytes(rng.integers(0, 256, rng.integers(0, 50), dtype=np.uint8)),
            "text": "" if i % 7 == 0 else f"sample {i} \u00e9\u4e2d\U0001f600",
            "n": int(rng.integers(-2**62, 2**62)), "u8": i % 256, "i16": -i, "u64": 2**64 - 1 - i,
            "f16": 0.5 * i, "f32": float(np.float32(rng.random())), "f64": float(rng.random()),
            "si": 10**15 + i, "sf": i / 3, "sd": Decimal(f"{i}.{i:03d}"),
            "meta": {"i": i, "tags": ["a", None, i * 1.5], "nested": {"ok": i % 2 == 0}},
            "tokens": rng.integers(0, 65535, int(rng.integers(1, 200))).astype(np.uint16),
            "grid": rng.random((2, 3)).astype(np.float32),
            "any": rng.integers(-5, 5, (int(rng.integers(1, 4)), 2)).astype(np.int64),
        })
    return out


def expected(sample: dict) -> dict:
    """What the converter must produce for one MDSWriter input sample."""
    out = dict(sample)
    out["sd"] = str(sample["sd"])
    out["f16"] = float(np.float16(sample["f16"]))
    return out


@pytest.mark.parametrize("compression", [None, "zstd:7", "gz"])
def test_every_encoding_and_sample_survives(tmp_path, compression):
    src = str(tmp_path / "mds")
    samples = make_samples(120)
    # small size_limit: many shards, several per piece
    with MDSWriter(out=src, columns=COLUMNS, compression=compression, size_limit=4096) as w:
        for s in samples:
            w.write(s)
    assert len(load_index(src)[1]) > 5
    ds = convert_direct("mds", [os.path.join(src, "index.json")], str(tmp_path / "out"),
                        chunk_bytes=9000)
    assert ds.schema.to_json() == EXPECTED_TYPES
    assert len(ds) == len(samples)
    for i, s in enumerate(samples):
        assert_same_value(ds[i], expected(s), f"sample {i}")


def test_fixed_shape_tokens_and_original_reader_agree(tmp_path):
    """Uncompressed shards are also read by streaming's own MDSReader: same values."""
    MDSReader = sys.modules["streaming.base.format.mds.reader"].MDSReader

    src = str(tmp_path / "mds")
    rng = np.random.default_rng(3)
    toks = [rng.integers(0, 50000, 64).astype(np.uint16) for _ in range(50)]
    with MDSWriter(out=src, columns={"tokens": "ndarray:uint16:64", "id": "int"},
                   size_limit=1500) as w:
        for i, t in enumerate(toks):
            w.write({"tokens": t, "id": i})
    cols, got, pieces = read_all("mds", [src + "/index.json"], chunk_bytes=1)
    assert cols == {"id": "int64", "tokens": "uint16[64]"}
    root, shards = load_index(src)
    assert pieces == len(shards)
    theirs = []
    for shard in shards:
        reader = MDSReader.from_json(root, None, shard)
        theirs += [reader.decode_sample(reader.get_sample_data(k)) for k in range(reader.samples)]
    assert len(got) == len(theirs) == 50
    for a, b in zip(got, theirs):
        assert a["id"] == b["id"] and np.array_equal(a["tokens"], b["tokens"])


def test_image_encodings_keep_the_stored_bytes(tmp_path):
    image = pytest.importorskip("PIL.Image")
    src = str(tmp_path / "img")
    pics = [image.fromarray(np.full((4, 5, 3), i * 20, np.uint8)) for i in range(5)]
    with MDSWriter(out=src, columns={"png": "png", "label": "int"}) as w:
        for i, p in enumerate(pics):
            w.write({"png": p, "label": i})
    cols, got, _ = read_all("mds", [src + "/index.json"])
    assert cols == {"label": "int64", "png": "image"}
    for i, s in enumerate(got):
        back = image.open(io.BytesIO(s["png"]))
        assert back.format == "PNG" and np.array_equal(np.asarray(back), np.asarray(pics[i]))


def test_pickle_columns_are_refused_not_unpickled(tmp_path):
    src = str(tmp_path / "pkl")
    with MDSWriter(out=src, columns={"obj": "pkl", "x": "int"}) as w:
        w.write({"obj": {"a": 1}, "x": 1})
    with pytest.raises(InputError, match=r"index\.json: column 'obj' uses the 'pkl'"):
        read_all("mds", [src + "/index.json"])


def test_truncated_shard_names_the_file(tmp_path):
    src = str(tmp_path / "cut")
    with MDSWriter(out=src, columns={"text": "str"}) as w:
        for i in range(20):
            w.write({"text": "x" * i})
    shard = os.path.join(src, "shard.00000.mds")
    os.truncate(shard, os.path.getsize(shard) - 30)
    with pytest.raises(InputError, match=r"shard\.00000\.mds: sample offsets"):
        read_all("mds", [src + "/index.json"])
    os.remove(shard)
    with pytest.raises(InputError, match=r"shard\.00000\.mds: MDS shard file missing"):
        read_all("mds", [src + "/index.json"])


def test_merged_subdirectories_and_nested_inputs(tmp_path):
    """Two MDS dirs under one parent: each converts; giving parent and child is refused."""
    parent = tmp_path / "all"
    for k in range(2):
        with MDSWriter(out=str(parent / f"p{k}"), columns={"text": "str"}) as w:
            for i in range(3):
                w.write({"text": f"{k}-{i}"})
    files = [str(parent / "p0" / "index.json"), str(parent / "p1" / "index.json")]
    _, got, _ = read_all("mds", files)
    assert [s["text"] for s in got] == ["0-0", "0-1", "0-2", "1-0", "1-1", "1-2"]
    # an index.json one level up that lists the subdirectory shards (as streaming's merge does)
    shards = []
    for k in range(2):
        for shard in load_index(files[k])[1]:
            shard["raw_data"]["basename"] = f"p{k}/" + shard["raw_data"]["basename"]
            shards.append(shard)
    (parent / "index.json").write_text(json.dumps({"version": 2, "shards": shards}))
    _, top, _ = read_all("mds", [str(parent / "index.json")])
    assert [s["text"] for s in top] == [s["text"] for s in got]
    with pytest.raises(ConfigError, match="not both"):
        read_all("mds", [str(parent / "index.json"), files[0]])


def test_not_an_mds_directory(tmp_path):
    (tmp_path / "index.json").write_text(json.dumps({"version": 2, "shards": [
        {"format": "json", "version": 2}]}))
    with pytest.raises(InputError, match="only 'mds' shards"):
        read_all("mds", [str(tmp_path / "index.json")])
