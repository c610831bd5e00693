"""One way to locate a sample (streamshard/locate.py): DatasetIndex.locate for ints and arrays,
the reader and the sampler's shard_of agree with it, empty shards are stepped over."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamshard.index import DatasetIndex, ShardInfo
from streamshard.sampler import EpochOrder
from streamshard.schema import Schema


def index_of(sizes) -> DatasetIndex:
    shards = [ShardInfo(i, f"shard-{i:06d}.sss", n, 100, 100, "0" * 16) for i, n in enumerate(sizes)]
    return DatasetIndex.build(Schema({"x": "int64"}), shards, compression=None)


def brute(sizes, i):
    for s, n in enumerate(sizes):
        if i < n:
            return s, i
        i -= n
    raise AssertionError("out of range")


@settings(max_examples=80, deadline=None)
@given(sizes=st.lists(st.integers(0, 6), min_size=1, max_size=12).filter(lambda s: sum(s) > 0),
       data=st.data())
def test_locate_matches_brute_force_for_ints_arrays_and_negatives(sizes, data):
    index = index_of(sizes)
    n = sum(sizes)
    ids = data.draw(st.lists(st.integers(-n, n - 1), max_size=20))
    want = [brute(sizes, i % n) for i in ids]
    assert [index.locate(i) for i in ids] == want
    assert [index.locate(np.int32(i)) for i in ids] == want   # numpy ints in, Python ints out
    shards, offsets = index.locate(np.array(ids, dtype=np.int64))
    assert shards.dtype == offsets.dtype == np.int64
    assert list(zip(shards.tolist(), offsets.tolist())) == want
    order = EpochOrder(sizes, seed=0, shuffle=False)
    positive = [i % n for i in ids]
    assert order.shard_of(np.array(positive, dtype=np.int64)).tolist() == [s for s, _ in want]


@pytest.mark.parametrize("bad, error, match", [
    (10, IndexError, "sample index 10 out of range for a dataset of 10 samples"),   # one past the end
    (-11, IndexError, "sample index -11 out of range"),                            # before the start
    (np.array([3, 12, -20]), IndexError, "sample index 12 out of range"),          # first bad id is named
    (np.array([1.5]), TypeError, "sample ids must be ints"),                       # floats refused
    (2.0, TypeError, "sample ids must be ints"),                                   # a float scalar too
])
def test_locate_refuses_out_of_range_and_non_ints(bad, error, match):
    index = index_of([4, 0, 6])
    with pytest.raises(error, match=match):
        index.locate(bad)


def test_reader_and_fastpath_rows_use_the_index(id_dataset_factory):
    from streamshard import open_dataset

    ds = open_dataset(id_dataset_factory(300, shard_size="1KB", block_size="256B"))
    assert ds.num_shards > 3
    ids = np.random.default_rng(0).permutation(300)[:50]
    shards, offsets = ds.index.locate(ids)
    for i, s, k in zip(ids.tolist(), shards.tolist(), offsets.tolist()):
        assert ds[i]["id"] == ds.read(s, k)["id"] == i and ds.locate(i) == (s, k)
    rows = np.empty((len(ids), ds.schema.fixed_size), np.uint8)
    ds.read_rows(ids.tolist(), memoryview(rows).cast("B"))
    assert rows[:, :8].copy().view("<i8").ravel().tolist() == ids.tolist()  # column id first
    with pytest.raises(IndexError, match="sample index 300 out of range"):
        ds[300]
