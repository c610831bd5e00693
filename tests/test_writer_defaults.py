"""One set of writer defaults (streamshard/writer.py): ShardWriter, convert(), packing and the
CLI produce the same block size, shard size and compression level when none is given."""

from __future__ import annotations

import inspect
import json

import pytest

from streamshard.cli import main
from streamshard.convert import convert
from streamshard.convert_packing import pack_corpus
from streamshard.index import DatasetIndex
from streamshard.writer import (
    DEFAULT_BLOCK_SIZE, DEFAULT_COMPRESSION_LEVEL, DEFAULT_SHARD_SIZE, ShardWriter, WriterConfig,
)


def test_block_size_is_the_measured_64_kib():
    assert DEFAULT_BLOCK_SIZE == 64 * 1024  # docs/FORMAT.md "Block size"
    cfg = WriterConfig()
    assert (cfg.block_size, cfg.shard_size, cfg.compression_level) == (
        DEFAULT_BLOCK_SIZE, DEFAULT_SHARD_SIZE, DEFAULT_COMPRESSION_LEVEL)


@pytest.mark.parametrize("entry", [ShardWriter, convert, pack_corpus])
def test_every_entry_point_defaults_to_the_writer_constants(entry):
    params = inspect.signature(entry).parameters
    assert params["block_size"].default == DEFAULT_BLOCK_SIZE
    assert params["shard_size"].default == DEFAULT_SHARD_SIZE
    if "compression_level" in params:
        assert params["compression_level"].default == DEFAULT_COMPRESSION_LEVEL


def _jsonl(path):
    with open(path, "w") as f:
        for i in range(50):
            f.write(json.dumps({"text": f"doc {i}", "ids": [i, i + 1, i + 2]}) + "\n")
    return str(path)


@pytest.mark.parametrize("pack", [False, True], ids=["convert", "pack"])
def test_cli_writes_the_default_block_size_into_the_index(tmp_path, pack):
    src = _jsonl(tmp_path / "in.jsonl")
    dest = tmp_path / "ds"
    args = ["convert", src, str(dest), "--format", "jsonl", "--quiet"]
    args += (["--token-field", "ids", "--seq-len", "8", "--eod-id", "0"] if pack
             else ["--fields", "text:str"])
    assert main(args) == 0
    index = DatasetIndex.from_bytes((dest / "index.json").read_bytes(), "index.json")
    assert index.block_size == DEFAULT_BLOCK_SIZE
    assert index.shard_size == DEFAULT_SHARD_SIZE
    assert index.compression_level == DEFAULT_COMPRESSION_LEVEL
