"""Index open: the fingerprint checked over the raw shard lists, the canonical rule as the
fallback (old or hand-formatted files still open), and the lazily built shard records."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamshard.errors import CorruptionError
from streamshard.index import (DatasetIndex, ShardInfo, ShardTable, fingerprint_from_raw,
                               fingerprint_of)
from streamshard.indexcheck import loads_strict
from streamshard.schema import Schema

SCHEMA = Schema({"tokens": "uint16[4]", "text": "str"})  # column order is not sorted order

_names = st.from_regex(r"[A-Za-z0-9._\-+=,@~]{1,8}(/[A-Za-z0-9_]{1,4})?", fullmatch=True).filter(
    lambda n: all(p not in (".", "..") for p in n.split("/")))
_shard = st.builds(lambda name, n, b, r, h, t: ShardInfo(0, name, n, b, r, f"{h:016x}",
                                                         None if t is None else f"{t:016x}"),
                   _names, st.integers(0, 2**40), st.integers(0, 2**62), st.integers(0, 2**62),
                   st.integers(0, 2**64 - 1), st.none() | st.integers(0, 2**64 - 1))
_meta = st.dictionaries(st.text(max_size=5), st.none() | st.integers() | st.text(max_size=8)
                        | st.lists(st.integers(), max_size=3), max_size=4)


def _index(shards, meta=None) -> DatasetIndex:
    return DatasetIndex.build(SCHEMA, shards, compression="zstd", compression_level=3,
                              block_size=65536, shard_size=2**26, metadata=meta or {})


@settings(max_examples=60, deadline=None)
@given(st.lists(_shard, max_size=6), _meta)
def test_raw_fingerprint_equals_the_canonical_rule(shards, meta):
    idx = _index(shards, meta)
    data = idx.to_bytes()
    assert fingerprint_from_raw(data, loads_strict(data)) == fingerprint_of(idx.to_document()) \
        == idx.fingerprint
    back = DatasetIndex.from_bytes(data, "index.json")
    assert back == idx and back.shards == idx.shards
    assert list(back.schema.columns) == ["tokens", "text"]


def _sample_index() -> DatasetIndex:
    return _index([ShardInfo(i, f"p/shard-{i:06d}.sss", 100 + i, 5000 + i, 6000 + i, f"{i:016x}",
                             f"{i + 7:016x}") for i in range(5)], {"source": "test"})


@pytest.mark.parametrize("layout", [
    lambda doc: json.dumps(doc),  # what older tools and the tests' forgers write: one line
    lambda doc: json.dumps(doc, indent=2),  # reformatted by hand (every list item on a line)
    lambda doc: json.dumps({"fingerprint": doc["fingerprint"], **doc}, sort_keys=True),
    lambda doc: "\r\n".join(_sample_index().to_bytes().decode().split("\n")),  # CRLF copy
])
def test_other_layouts_fall_back_to_the_canonical_rule(layout):
    idx = _sample_index()
    data = layout(idx.to_document()).encode()
    assert fingerprint_from_raw(data, loads_strict(data)) != idx.fingerprint  # no fast path
    assert DatasetIndex.from_bytes(data, "index.json") == idx  # still opens


@pytest.mark.parametrize("old,new", [
    (b'"samples":[100,', b'"samples":[101,'),  # a count changed in place
    (b'"p/shard-000001.sss"', b'"p/shard-000009.sss"'),  # a name swapped
    (b'"0000000000000002"', b'"0000000000000003"'),  # a whole-file hash edited
    (b'"samples":[100,', b'"samples":[100 ,'),  # a space added: same document, other bytes
])
def test_edited_shard_lists_are_checked(old, new):
    idx = _sample_index()
    data = idx.to_bytes()
    assert data.count(old) == 1
    edited = data.replace(old, new)
    if json.loads(edited) == json.loads(data):  # only the layout changed: opens via fallback
        assert DatasetIndex.from_bytes(edited, "index.json") == idx
    else:
        with pytest.raises(CorruptionError, match="index.json: fingerprint mismatch"):
            DatasetIndex.from_bytes(edited, "index.json")
        if not old.startswith(b'"samples"'):  # (a count edit also breaks num_samples)
            assert DatasetIndex.from_bytes(edited, "x", check_fingerprint=False).fingerprint \
                == idx.fingerprint  # verify keeps going with what the damaged index says


def test_a_repeated_shard_list_is_not_the_fast_layout():
    idx = _sample_index()
    data = idx.to_bytes().replace(b'"samples":[', b'"samples":[1],"samples":[', 1)
    doc = loads_strict(data)  # the last "samples" wins, as for any JSON reader
    assert fingerprint_from_raw(data, doc) is None


def test_shard_table_builds_records_on_demand():
    idx = _sample_index()
    table = idx.shards
    assert isinstance(table, ShardTable) and len(table) == 5
    assert table[1] == ShardInfo(1, "p/shard-000001.sss", 101, 5001, 6001, f"{1:016x}", f"{8:016x}")
    assert table[-1].index == 4 and table[1:3] == (table[1], table[2])
    assert table[np.int64(2)] == table[2] and type(table[np.int64(2)].index) is int
    with pytest.raises(TypeError):
        table[1.0]
    assert list(table) == [table[i] for i in range(5)] == list(table[:])
    assert type(table[0].samples) is int  # records hold Python ints, like the JSON
    assert table.samples.dtype == np.int64 and table.samples.tolist() == [100, 101, 102, 103, 104]
    with pytest.raises(ValueError):
        table.samples[0] = 7  # the columns are read-only
    for bad in (5, -6):
        with pytest.raises(IndexError, match=f"shard {bad} out of range"):
            table[bad]
    again = pickle.loads(pickle.dumps(idx))
    assert again.shards == table and again.shards == tuple(table) and again.shards[2] == table[2]
    assert not again.shards.samples.flags.writeable
    # built from records (the index field also accepts a plain tuple and renumbers it)
    assert ShardTable.from_records(list(table)) == table
    no_ident = ShardTable.from_records([s._replace(table_xxh64=None) for s in table])
    assert no_ident.table_xxh64 is None and no_ident[0].table_xxh64 is None
