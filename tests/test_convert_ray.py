"""Ray Data Datasink on a local 2-CPU Ray cluster (one cluster for the module): the merged
dataset equals a single-process conversion of the same rows, parts are merged without copying."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from streamshard import open_dataset
from streamshard.errors import DatasetExistsError

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")
pytestmark = pytest.mark.slow(reason="starts a local 2-CPU Ray cluster: ~19 s setup here")

from streamshard.converters.ray_sink import PARTS, StreamshardDatasink, write_streamshard  # noqa: E402

COLUMNS = {"text": "str", "id": "int64", "tokens": "uint16[]", "meta": "json"}


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             configure_logging=False, ignore_reinit_error=True)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


def rows(n: int) -> list[dict]:
    rng = np.random.default_rng(11)
    return [{"text": f"row {i} \u00e9", "id": i,
             "tokens": rng.integers(0, 65535, int(rng.integers(0, 50))).astype(np.uint16),
             "meta": {"i": i, "even": i % 2 == 0}} for i in range(n)]


def write_single(dest: str, samples: list[dict]) -> None:
    from streamshard import ShardWriter

    with ShardWriter(dest, columns=COLUMNS, shard_size="4KB", block_size="1KB") as w:
        for s in samples:
            w.write(s)


def assert_same_content(a, b) -> None:
    assert len(a) == len(b)
    for i in range(len(a)):
        x, y = a[i], b[i]
        assert x.keys() == y.keys()
        for k in x:
            if isinstance(x[k], np.ndarray):
                assert x[k].dtype == y[k].dtype and np.array_equal(x[k], y[k]), (i, k)
            else:
                assert x[k] == y[k], (i, k)


def test_datasink_equals_single_process_conversion(cluster, tmp_path):
    data = rows(300)
    ds = ray.data.from_items(data, override_num_blocks=6)
    index = write_streamshard(ds, str(tmp_path / "ray"), columns=COLUMNS,
                              shard_size="4KB", block_size="1KB")
    write_single(str(tmp_path / "single"), data)
    got, ref = open_dataset(str(tmp_path / "ray")), open_dataset(str(tmp_path / "single"))
    assert index.num_samples == 300 and got.fingerprint == index.fingerprint
    assert_same_content(got, ref)
    # merged without copying: every shard lives in a part directory written by a task
    parts = {s.file.split("/")[1] for s in got.index.shards}
    assert all(s.file.startswith(f"{PARTS}/part-") for s in got.index.shards)
    assert len(parts) >= 2
    assert not [f for f in os.listdir(tmp_path / "ray") if f.endswith(".sss")]


def test_read_json_pipeline_matches_streamshard_convert(cluster, tmp_path):
    """The same JSONL files: Ray read_json + the Datasink vs the jsonl converter driver."""
    from streamshard.convert import convert

    src = tmp_path / "src"
    src.mkdir()
    for k in range(3):
        with open(src / f"part{k}.jsonl", "w") as f:
            for i in range(k * 40, k * 40 + 40):
                f.write(json.dumps({"text": "t" * (i % 9), "id": i}) + "\n")
    files = sorted(str(p) for p in src.iterdir())
    cols = {"text": "str", "id": "int64"}
    write_streamshard(ray.data.read_json(files), str(tmp_path / "ray"), columns=cols)
    convert([str(src)], str(tmp_path / "conv"), format="jsonl",
            options={"fields": "text:str,id:int64"})
    assert_same_content(open_dataset(str(tmp_path / "ray")), open_dataset(str(tmp_path / "conv")))


def test_existing_destination_is_refused_unless_overwrite(cluster, tmp_path):
    dest = str(tmp_path / "d")
    small = ray.data.from_items(rows(10), override_num_blocks=2)
    write_streamshard(small, dest, columns=COLUMNS)
    with pytest.raises(DatasetExistsError, match="already holds a dataset"):
        write_streamshard(small, dest, columns=COLUMNS)
    write_streamshard(ray.data.from_items(rows(4), override_num_blocks=1), dest,
                      columns=COLUMNS, overwrite=True)
    assert len(open_dataset(dest)) == 4


def test_sink_validates_settings_on_the_driver():
    from streamshard.errors import ConfigError, SchemaError

    with pytest.raises(SchemaError):
        StreamshardDatasink("x", columns={"a": "uint17"})
    with pytest.raises(ConfigError, match="unknown writer option 'shardsize'"):
        StreamshardDatasink("x", columns={"a": "str"}, shardsize="1MB")
