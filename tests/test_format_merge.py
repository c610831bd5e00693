"""merge_datasets: an index over part datasets inside dest, without copying shard data."""

from __future__ import annotations

import numpy as np
import pytest

from streamshard import merge_datasets, open_dataset, verify_dataset
from streamshard.errors import ConfigError, DatasetExistsError, SchemaError

from tests.format_helpers import token_samples, write


def make_parts(dest, sizes, **kw):
    parts, samples = [], []
    for p, n in enumerate(sizes):
        part = dest / f"part-{p:05d}"
        s = token_samples(n, seed=p)
        write(part, s, columns={"tokens": "uint16[]"}, shard_size="3KB", block_size="1KiB",
              metadata={"part": p}, **kw)
        parts.append(str(part))
        samples += s
    return parts, samples


def test_merge_two_parts(tmp_path):
    parts, samples = make_parts(tmp_path, [37, 0, 55])   # an empty part in the middle
    before = {p: (tmp_path / p / "index.json").read_bytes() for p in ("part-00000", "part-00002")}
    shard_bytes = sorted(f.read_bytes() for f in tmp_path.rglob("*.sss"))
    merged = merge_datasets(parts, str(tmp_path))
    assert merged.num_samples == 92 and merged.metadata == {"part": 0}
    assert merged.shards[0].file == "part-00000/shard-000000.sss"
    assert [s.index for s in merged.shards] == list(range(merged.num_shards))
    ds = open_dataset(tmp_path)
    assert ds.fingerprint == merged.fingerprint and len(ds) == 92
    for i in range(92):
        np.testing.assert_array_equal(ds[i]["tokens"], samples[i]["tokens"])
    assert verify_dataset(str(tmp_path)).ok
    # nothing was copied or rewritten; part indexes stay usable
    assert sorted(f.read_bytes() for f in tmp_path.rglob("*.sss")) == shard_bytes
    for p, data in before.items():
        assert (tmp_path / p / "index.json").read_bytes() == data
    with pytest.raises(DatasetExistsError):
        merge_datasets(parts, str(tmp_path))
    again = merge_datasets(parts[::-1], str(tmp_path), overwrite=True, metadata={"m": 1})
    assert again.fingerprint != merged.fingerprint and again.metadata == {"m": 1}
    assert open_dataset(tmp_path)[0]["tokens"].tolist() == samples[37]["tokens"].tolist()


def test_merge_rejects_mismatched_schema(tmp_path):
    parts, _ = make_parts(tmp_path, [5])
    write(tmp_path / "other", [{"tokens": "x"}], columns={"tokens": "str"})
    with pytest.raises(SchemaError, match="other has columns {'tokens': 'str'}.*uint16"):
        merge_datasets(parts + [str(tmp_path / "other")], str(tmp_path))
    assert not (tmp_path / "index.json").exists()


def test_merge_rejects_mixed_compression(tmp_path):
    parts, _ = make_parts(tmp_path, [5])
    write(tmp_path / "raw", token_samples(3), columns={"tokens": "uint16[]"}, compression=None)
    with pytest.raises(ConfigError, match="compression None"):
        merge_datasets(parts + [str(tmp_path / "raw")], str(tmp_path))


def test_merge_rejects_part_outside_dest(tmp_path):
    parts, _ = make_parts(tmp_path / "a", [5])
    with pytest.raises(ConfigError, match="not inside the merge destination"):
        merge_datasets(parts, str(tmp_path / "b"))
    with pytest.raises(ConfigError, match="at least one part"):
        merge_datasets([], str(tmp_path))
