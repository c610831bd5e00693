"""Fuzzing the on-disk format: shard headers, block tables, trailers, zstd frame headers, raw
bytes, sample encodings and every key of index.json. Each property asserts only "a streamshard
error or correct data" (tests/fuzzing.py). Short budgets here; ``pytest -m fuzz`` runs the long
duplicates."""

from __future__ import annotations

import os
import resource
import struct
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamshard.errors import StreamshardError
from streamshard.schema import Schema
from streamshard.shardfile import TABLE_ENTRY, TRAILER

from tests import fuzzing as fz

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_COMMON = dict(deadline=None, suppress_health_check=list(HealthCheck), derandomize=False)
COMPRESSIONS = st.sampled_from(["zstd", None])
INTERESTING_U64 = st.one_of(
    st.sampled_from([0, 1, 7, 8, 16, 31, 32, 33, 40, 2**31, 2**32 - 1, 2**32, 10**11,
                     2**63 - 1, 2**63, 2**64 - 1]),
    st.integers(min_value=0, max_value=2**64 - 1))


# ---- raw byte mutations: every checksum stays as written ------------------------------------
def check_raw_mutation(comp, shard, edits, cut):
    with fz.scratch_copy(comp) as ds:
        doc = fz.load_doc(ds)
        shard %= len(doc["shards"]["files"])
        path = os.path.join(ds, doc["shards"]["files"][shard])
        data = bytearray(open(path, "rb").read())
        for pos, value in edits:
            data[pos % len(data)] = value
        if cut is not None:
            data = data[:cut % (len(data) + 1)]
        open(path, "wb").write(bytes(data))
        fz.fix_index_for(ds, shard)
        fz.read_everything(ds, exact=True)  # nothing re-hashed: any data served must be right


RAW = dict(comp=COMPRESSIONS, shard=st.integers(0, 50),
           edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1,
                          max_size=4),
           cut=st.none() | st.integers(0, 10**6))


@settings(max_examples=fz.SHORT, **_COMMON)
@given(**RAW)
def test_fuzz_raw_bytes(comp, shard, edits, cut):
    check_raw_mutation(comp, shard, edits, cut)


@pytest.mark.fuzz
@settings(max_examples=fz.LONG, **_COMMON)
@given(**RAW)
def test_fuzz_raw_bytes_long(comp, shard, edits, cut):
    check_raw_mutation(comp, shard, edits, cut)


# ---- structured mutations, checksums recomputed (a forger's shard) ---------------------------
def check_field_mutation(comp, part, index, field_no, value):
    with fz.scratch_copy(comp) as ds:
        doc = fz.load_doc(ds)
        path = os.path.join(ds, doc["shards"]["files"][0])
        data = bytearray(open(path, "rb").read())
        off, nblocks = struct.unpack_from("<QI", data, len(data) - TRAILER.size)
        if part == "header":
            fmt = ["<8s", "<H", "<H", "<20s"][field_no % 4]
            pos = [0, 8, 10, 12][field_no % 4]
            raw = value.to_bytes(8, "little")
            struct.pack_into(fmt, data, pos, (raw * 3)[:struct.calcsize(fmt)]
                             if "s" in fmt else value & 0xFFFF)
        elif part == "table":
            b = index % nblocks
            e = list(TABLE_ENTRY.unpack_from(data, off + 40 * b))
            e[field_no % 5] = value
            TABLE_ENTRY.pack_into(data, off + 40 * b, *e)
        elif part == "trailer":
            t = list(TRAILER.unpack_from(data, len(data) - TRAILER.size))
            k = [0, 1, 2, 3][field_no % 4]
            t[k] = value & (0xFFFFFFFF if k in (1, 2) else 2**64 - 1)
            TRAILER.pack_into(data, len(data) - TRAILER.size, *t)
        elif part == "frame":  # the zstd frame header (or the raw block header) of one block
            b = index % nblocks
            start = struct.unpack_from("<Q", data, off + 40 * b)[0]
            data[start + field_no % 18] = value & 0xFF
        elif part == "payload":  # inside a block, re-hashed: decodes differently or fails
            b = index % nblocks
            start, stored = struct.unpack_from("<QQ", data, off + 40 * b)
            data[start + value % max(stored, 1)] ^= 1 + field_no % 255
        data = fz.rehash_table(data, blocks=part in ("frame", "payload", "table"))
        open(path, "wb").write(bytes(data))
        fz.fix_index_for(ds, 0)
        # the forger re-hashed: bytes may legitimately decode to other values; no other outcome
        fz.read_everything(ds, exact=part in ("header", "trailer"))


FIELDS = dict(comp=COMPRESSIONS,
              part=st.sampled_from(["header", "table", "trailer", "frame", "payload"]),
              index=st.integers(0, 100), field_no=st.integers(0, 100), value=INTERESTING_U64)


@settings(max_examples=fz.SHORT * 2, **_COMMON)
@given(**FIELDS)
def test_fuzz_structured_fields(comp, part, index, field_no, value):
    check_field_mutation(comp, part, index, field_no, value)


@pytest.mark.fuzz
@settings(max_examples=fz.LONG, **_COMMON)
@given(**FIELDS)
def test_fuzz_structured_fields_long(comp, part, index, field_no, value):
    check_field_mutation(comp, part, index, field_no, value)


# ---- index.json: every key, every type --------------------------------------------------------
_TOP = ["magic", "version", "columns", "compression", "compression_level", "block_size",
        "shard_size", "num_samples", "metadata", "shards", "fingerprint"]
_SHARD_KEYS = ["files", "samples", "bytes", "raw_bytes", "xxh64", "table_xxh64"]


def check_index_mutation(comp, key, sub, pos, value, refingerprint, delete):
    with fz.scratch_copy(comp) as ds:
        doc = fz.load_doc(ds)
        if key == "shards":
            lists = doc["shards"]
            name = _SHARD_KEYS[sub % len(_SHARD_KEYS)]
            if delete:
                lists.pop(name, None)
            elif pos is None or not isinstance(lists.get(name), list):
                lists[name] = value
            else:
                lists[name][pos % len(lists[name])] = value
        elif delete:
            doc.pop(key, None)
        else:
            doc[key] = value
        fz.save_doc(ds, doc, refingerprint=refingerprint)
        # a changed column type may decode the same bytes into other values: that is what the
        # index says; any other mutation leaves the shards as written, so data must be exact
        fz.read_everything(ds, exact=key not in ("columns",))


INDEX = dict(comp=COMPRESSIONS, key=st.sampled_from(_TOP), sub=st.integers(0, 20),
             pos=st.none() | st.integers(0, 100), value=fz.jsonish(),
             refingerprint=st.booleans(), delete=st.booleans())


@settings(max_examples=fz.SHORT * 2, **_COMMON)
@given(**INDEX)
def test_fuzz_index_json(comp, key, sub, pos, value, refingerprint, delete):
    check_index_mutation(comp, key, sub, pos, value, refingerprint, delete)


@pytest.mark.fuzz
@settings(max_examples=fz.LONG, **_COMMON)
@given(**INDEX)
def test_fuzz_index_json_long(comp, key, sub, pos, value, refingerprint, delete):
    check_index_mutation(comp, key, sub, pos, value, refingerprint, delete)


# ---- sample encodings ----------------------------------------------------------------------------
TYPES = ["bytes", "str", "json", "int64", "float16", "bool", "uint8[2,3]", "uint16[]",
         "float32[*,3]", "int32[...]", "uint8[*,*]"]


def check_decode(types, blob):
    schema = Schema({f"c{i}": t for i, t in enumerate(types)})
    with fz.time_bound():
        try:
            value = schema.decode(blob, 0, len(blob))
        except StreamshardError:
            return
        # what decodes must re-encode to the same bytes (the encoding is canonical), except
        # json whose text may be spelled differently ("1.0" vs "1.00") and floats (NaN payloads)
        if not any(t == "json" or t.startswith("float") for t in types):
            assert schema.encode(value) == blob


DECODE = dict(types=st.lists(st.sampled_from(TYPES), min_size=1, max_size=3),
              blob=st.binary(max_size=200))


@settings(max_examples=fz.SHORT * 4, **_COMMON)
@given(**DECODE)
def test_fuzz_sample_decoding(types, blob):
    check_decode(types, blob)


@pytest.mark.fuzz
@settings(max_examples=fz.LONG * 4, **_COMMON)
@given(**DECODE)
def test_fuzz_sample_decoding_long(types, blob):
    check_decode(types, blob)


# ---- the memory bound ----------------------------------------------------------------------------
_UNDER_LIMIT = """
import sys
sys.path.insert(0, {root!r})
from tests import test_fuzz_format as t
for name in ("test_fuzz_raw_bytes", "test_fuzz_structured_fields", "test_fuzz_index_json"):
    getattr(t, name)()
print("ok")
"""


@pytest.mark.slow(reason="the format properties again in a subprocess with a 1 GiB address-space cap")
def test_fuzz_under_memory_limit():
    """The short format properties again in a process whose address space is capped at 1 GiB:
    a decompression bomb or a trusted 100 GB size would end in MemoryError there."""
    limit = 1 << 30

    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    proc = subprocess.run([sys.executable, "-c", _UNDER_LIMIT.format(root=ROOT)],
                          preexec_fn=cap, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, STREAMSHARD_FUZZ_SHORT="15"))
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
