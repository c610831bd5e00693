"""Hugging Face datasets saved with save_to_disk (by the datasets package itself), read back with
pyarrow only and compared row by row with datasets.load_from_disk."""

from __future__ import annotations

import io

import numpy as np
import pytest

from streamshard.errors import ConfigError, InputError
from tests.convert_helpers import convert_direct, read_all

datasets = pytest.importorskip("datasets")
datasets.disable_progress_bars()


def make_dataset(n: int):
    rng = np.random.default_rng(0)
    return datasets.Dataset.from_dict(
        {
            "text": [f"doc {i} \u00e9" if i % 4 else "" for i in range(n)],
            "input_ids": [rng.integers(0, 50000, int(rng.integers(0, 30))).tolist()
                          for _ in range(n)],
            "label": [i % 3 for i in range(n)],
            "score": [i / 7 for i in range(n)],
            "flag": [i % 2 == 0 for i in range(n)],
            "meta": [{"src": f"s{i}", "pos": [i, i + 1]} for i in range(n)],
            "maybe": [None if i % 5 == 0 else f"m{i}" for i in range(n)],
            "emb": [rng.random(4).astype(np.float32).tolist() for _ in range(n)],
        },
        features=datasets.Features({
            "text": datasets.Value("string"),
            "input_ids": datasets.Sequence(datasets.Value("int32")),
            "label": datasets.ClassLabel(names=["a", "b", "c"]),
            "score": datasets.Value("float64"),
            "flag": datasets.Value("bool"),
            "meta": {"src": datasets.Value("string"),
                     "pos": datasets.Sequence(datasets.Value("int64"))},
            "maybe": datasets.Value("string"),
            "emb": datasets.Sequence(datasets.Value("float32"), length=4),
        }),
    )


def test_every_row_and_column_matches_load_from_disk(tmp_path):
    src = tmp_path / "saved"
    make_dataset(200).save_to_disk(str(src), num_shards=3)  # three Arrow files
    ds = convert_direct("hf", [str(src / "state.json")], str(tmp_path / "out"), chunk_bytes=3000)
    assert ds.schema.to_json() == {
        "text": "str", "input_ids": "int32[]", "label": "int64", "score": "float64",
        "flag": "bool", "meta": "json", "maybe": "json", "emb": "float32[4]"}
    ref = datasets.load_from_disk(str(src))
    assert len(ds) == len(ref) == 200
    for i, row in enumerate(ref):
        got = ds[i]
        assert got["text"] == row["text"] and got["label"] == row["label"]
        assert got["score"] == row["score"] and got["flag"] == row["flag"]
        assert got["input_ids"].dtype == np.int32
        assert got["input_ids"].tolist() == row["input_ids"]
        assert got["emb"].tolist() == row["emb"]
        assert got["meta"] == row["meta"] and got["maybe"] == row["maybe"]


def test_pieces_split_rows_without_loss(tmp_path):
    src = tmp_path / "saved"
    make_dataset(57).save_to_disk(str(src), num_shards=2)
    _, rows, pieces = read_all("hf", [str(src / "state.json")], chunk_bytes=500)
    assert pieces > 3
    assert [r["text"] for r in rows] == datasets.load_from_disk(str(src))["text"]


def test_image_structs_are_flattened_to_bytes(tmp_path):
    image = pytest.importorskip("PIL.Image")
    pics = [image.fromarray(np.full((3, 3, 3), 40 * i, np.uint8)) for i in range(4)]
    src = tmp_path / "img"
    datasets.Dataset.from_dict({"image": pics, "y": list(range(4))},
                               features=datasets.Features({"image": datasets.Image(),
                                                           "y": datasets.Value("int8")})
                               ).save_to_disk(str(src))
    cols, rows, _ = read_all("hf", [str(src / "state.json")])
    assert cols == {"image.bytes": "image", "image.path": "json", "y": "int8"}
    for i, row in enumerate(rows):
        assert np.array_equal(np.asarray(image.open(io.BytesIO(row["image.bytes"]))),
                              np.asarray(pics[i]))
        assert row["y"] == i and row["image.path"] is None


def test_dataset_dict_splits_are_not_mixed(tmp_path):
    src = tmp_path / "dd"
    splits = {"train": make_dataset(10), "test": make_dataset(3)}
    datasets.DatasetDict(splits).save_to_disk(str(src))
    with pytest.raises(ConfigError, match="one split directory at a time"):
        read_all("hf", [str(src / "test" / "state.json"), str(src / "train" / "state.json")])
    _, rows, _ = read_all("hf", [str(src / "test" / "state.json")])
    assert len(rows) == 3


def test_missing_arrow_file_is_named(tmp_path):
    src = tmp_path / "saved"
    make_dataset(5).save_to_disk(str(src))
    (src / "data-00000-of-00001.arrow").unlink()
    with pytest.raises(InputError, match=r"data-00000-of-00001\.arrow: Arrow data file"):
        read_all("hf", [str(src / "state.json")])
