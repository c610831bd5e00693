"""Megatron indexed datasets: inputs built by megatron-core's own IndexedDatasetBuilder and
compared with its IndexedDataset reader; malformed indexes give InputErrors naming the file."""

from __future__ import annotations

import os
import struct
import warnings

import numpy as np
import pytest

from streamshard.converters.megatron import MAGIC, read_index
from streamshard.errors import ConfigError, InputError
from tests.convert_helpers import assert_same_value, convert_direct, read_all

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    idx_mod = pytest.importorskip("megatron.core.datasets.indexed_dataset")
torch = pytest.importorskip("torch")


def build(prefix: str, docs: list[list[np.ndarray]], dtype=np.uint16, modes=None) -> None:
    """Documents of sequences, written with megatron-core's builder (add_item/end_document)."""
    builder = idx_mod.IndexedDatasetBuilder(prefix + ".bin", dtype=dtype,
                                            multimodal=modes is not None)
    k = 0
    for doc in docs:
        for seq in doc:
            if modes is None:
                builder.add_item(torch.from_numpy(seq.astype(np.int64)))
            else:
                builder.add_item(torch.from_numpy(seq.astype(np.int64)), mode=modes[k])
            k += 1
        builder.end_document()
    builder.finalize(prefix + ".idx")


def random_docs(seed: int, n_docs: int, vocab: int) -> list[list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [[rng.integers(0, vocab, rng.integers(0, 300)) for _ in range(rng.integers(1, 4))]
            for _ in range(n_docs)]


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_every_sequence_and_document_survive(tmp_path, dtype):
    prefix = str(tmp_path / "corpus_text_document")
    docs = random_docs(1, 60, 60000)
    docs[3].append(np.zeros(0, np.int64))  # an empty sequence is still a sample
    build(prefix, docs, dtype)
    # tiny chunk_bytes: many pieces, so the document id is recomputed at piece starts
    ds = convert_direct("megatron", [prefix + ".idx"], str(tmp_path / "out"), {"doc_ids": True},
                        chunk_bytes=2000)
    ref = idx_mod.IndexedDataset(prefix)
    assert ds.schema.to_json() == {"tokens": f"{np.dtype(dtype).name}[]", "document": "int64"}
    assert len(ds) == len(ref) == sum(len(d) for d in docs)
    doc_of = np.repeat(np.arange(len(ref.document_indices) - 1), np.diff(ref.document_indices))
    for i in range(len(ref)):
        got = ds[i]
        assert_same_value(got["tokens"], np.asarray(ref[i]), f"sequence {i}")
        assert got["document"] == doc_of[i], f"sequence {i}"
    assert np.dtype(dtype).name == ds[0]["tokens"].dtype.name


def test_pieces_cover_every_sequence_once(tmp_path):
    prefix = str(tmp_path / "a")
    build(prefix, random_docs(2, 40, 1000))
    cols, samples, pieces = read_all("megatron", [prefix + ".idx"], chunk_bytes=500)
    assert pieces > 5
    ref = idx_mod.IndexedDataset(prefix)
    assert cols == {"tokens": "uint16[]"}
    assert len(samples) == len(ref)
    for i, s in enumerate(samples):
        assert np.array_equal(s["tokens"], ref[i])


def test_multimodal_modes_are_kept(tmp_path):
    prefix = str(tmp_path / "mm")
    docs = random_docs(3, 10, 500)
    n = sum(len(d) for d in docs)
    modes = [i % 3 for i in range(n)]
    build(prefix, docs, np.int32, modes=modes)
    cols, samples, _ = read_all("megatron", [prefix + ".bin"])
    assert cols == {"tokens": "int32[]", "mode": "int8"}
    assert [s["mode"] for s in samples] == modes


def test_two_datasets_concatenate_and_duplicates_refused(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    build(a, random_docs(4, 5, 100))
    build(b, random_docs(5, 7, 100))
    _, samples, _ = read_all("megatron", [a + ".idx", b + ".idx"])
    # index explicitly: list() on IndexedDataset reads past its end (no IndexError, a crash)
    ref = [np.array(d[i]) for d in map(idx_mod.IndexedDataset, (a, b)) for i in range(len(d))]
    assert len(samples) == len(ref)
    assert all(np.array_equal(s["tokens"], r) for s, r in zip(samples, ref))
    with pytest.raises(ConfigError, match="pass each dataset once"):
        read_all("megatron", [a + ".idx", a + ".bin"])


def _corrupt_cases(prefix: str):
    raw = open(prefix + ".idx", "rb").read()
    # (name, new .idx bytes or None, new .bin size or None, expected message)
    return [
        ("bad magic", b"XXIDIDX\x00\x00" + raw[9:], None, "bad magic"),
        ("newer version", MAGIC + struct.pack("<Q", 2) + raw[17:], None, "version 2"),
        ("unknown dtype", raw[:17] + bytes([42]) + raw[18:], None, "dtype code 42"),
        ("truncated index", raw[:-5], None, "does not match"),
        ("short header", raw[:10], None, "too short"),
        ("truncated bin", None, 10, "beyond"),
    ]


@pytest.mark.parametrize("case", range(6))
def test_malformed_inputs_name_the_file(tmp_path, case):
    prefix = str(tmp_path / "bad")
    build(prefix, random_docs(6, 8, 100))
    name, idx_bytes, bin_size, message = _corrupt_cases(prefix)[case]
    if idx_bytes is not None:
        with open(prefix + ".idx", "wb") as f:
            f.write(idx_bytes)
    if bin_size is not None:
        os.truncate(prefix + ".bin", bin_size)
    with pytest.raises(InputError, match=message) as err:
        read_index(prefix)
    assert "bad." in str(err.value), name


def test_missing_bin_is_named(tmp_path):
    prefix = str(tmp_path / "lonely")
    build(prefix, random_docs(7, 2, 10))
    os.remove(prefix + ".bin")
    with pytest.raises(InputError, match=r"lonely\.bin: missing"):
        read_index(prefix)
