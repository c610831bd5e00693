"""`streamshard plan`: figures from the real sampler and rank split, reading only the index."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np

from streamshard.blockshuffle import block_groups
from streamshard.capacity import node_shards
from streamshard.cli import main
from streamshard.reader import open_dataset

KEYS = {"bytes_per_node_over_share_max", "bytes_per_node_over_share_mean", "rank_batch_min",
        "rank_batch_max", "cache_working_set_bytes_max", "steps_per_epoch"}


def index_only(path: str, tmp_path) -> str:
    """A copy of the dataset without its shard files: planning must not need them."""
    dest = tmp_path / "index-only"
    dest.mkdir()
    shutil.copy(os.path.join(path, "index.json"), dest / "index.json")
    return str(dest)


def test_plan_json_has_the_issue_keys_and_reads_no_shard(id_dataset_factory, tmp_path, capsys):
    full = id_dataset_factory(601, shard_size="1KB")
    path = index_only(full, tmp_path)
    assert main(["plan", path, "--world-size", "6", "--local-world-size", "2",
                 "--global-batch-size", "16", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert KEYS <= set(report)
    assert (report["rank_batch_min"], report["rank_batch_max"]) == (2, 3)  # 16 on 6 ranks
    assert report["steps_per_epoch"] == 601 // 16
    assert report["bytes_per_node_over_share_max"] >= report["bytes_per_node_over_share_mean"] >= 1
    with open_dataset(full) as ds:
        shards = ds.index.shards
        assert report["num_shards"] == len(shards) and report["nodes"] == 3
        blocks = block_groups(ds.index)  # zstd shards: the loader's block-aware order
    predicted = node_shards([s.samples for s in shards], world_size=6, local_world_size=2,
                            global_batch_size=16, blocks=blocks)
    per_node = predicted.sum(axis=1)
    assert report["shards_per_node_max"] == per_node.max()
    assert np.isclose(report["shards_per_node_mean"], per_node.mean(), atol=1e-3)


def test_plan_text_and_no_shuffle_says_it_samples(id_dataset_factory, capsys):
    path = id_dataset_factory(601, shard_size="1KB")
    assert main(["plan", path, "--world-size", "4", "--local-world-size", "4",
                 "--global-batch-size", "8"]) == 0
    text = capsys.readouterr().out
    assert "bytes per node / fair share" in text and "cache working set per node" in text
    assert main(["plan", path, "--world-size", "4", "--local-world-size", "2",
                 "--global-batch-size", "8", "--no-shuffle", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["method"].startswith("sampled ")


def test_plan_bad_world_is_a_usage_error(id_dataset_factory, capsys):
    path = id_dataset_factory(601)
    assert main(["plan", path, "--world-size", "0", "--local-world-size", "1",
                 "--global-batch-size", "8"]) == 2
    assert "world_size must be positive, got 0" in capsys.readouterr().err
