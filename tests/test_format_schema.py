"""Column types and sample encoding: parsing table, hypothesis round trips, validation errors."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamshard.errors import CorruptionError, SchemaError
from streamshard.schema import NUMERIC_DTYPES, ColumnType, Schema, parse_type

from tests.format_helpers import assert_sample_equal, values_of

SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("text, expected", [
    ("bytes", ColumnType("bytes")),
    ("str", ColumnType("str")),
    ("json", ColumnType("json")),
    ("uint16", ColumnType("scalar", "uint16")),
    ("bool", ColumnType("scalar", "bool")),
    ("uint16[]", ColumnType("array", "uint16", (None,))),          # 1-D, any length
    ("uint16[*]", ColumnType("array", "uint16", (None,))),         # same as []
    ("uint16[2048]", ColumnType("array", "uint16", (2048,))),      # fixed
    ("float32[*,3]", ColumnType("array", "float32", (None, 3))),   # mixed
    ("float32[ * , 3 ]", ColumnType("array", "float32", (None, 3))),  # spaces tolerated
    ("int8[...]", ColumnType("array", "int8", None)),              # any ndim
    ("uint8[0]", ColumnType("array", "uint8", (0,))),              # empty fixed shape is legal
])
def test_parse_type_table(text, expected):
    assert parse_type(text, "c") == expected
    assert parse_type(expected.text, "c") == expected  # canonical text parses back


@pytest.mark.parametrize("bad", [
    "string",          # unknown name
    "complex64",       # not a supported dtype
    "uint16[-1]",      # negative dim
    "uint16[2,x]",     # junk dim
    "uint16[",         # unbalanced
    "object[]",        # object arrays would need pickle
    3,                 # not a string
])
def test_parse_type_rejects_and_names_column(bad):
    with pytest.raises(SchemaError, match="column 'tok'"):
        Schema({"tok": bad})


def test_canonical_text_and_fixed_size():
    s = Schema({"a": "uint16[2048]", "b": "float32[*,3]", "c": "int64", "d": "uint16[]"})
    assert s.to_json() == {"a": "uint16[2048]", "b": "float32[*,3]", "c": "int64", "d": "uint16[]"}
    assert Schema({"a": "uint16[2048]", "c": "int64"}).fixed_size == 4096 + 8
    assert s.fixed_size is None


def test_one_fixed_column_is_stored_as_plain_bytes():
    s = Schema({"tokens": "uint16[4]"})
    arr = np.array([1, 2, 3, 65535], dtype=np.uint16)
    assert s.encode({"tokens": arr}) == arr.astype("<u2").tobytes()


ALL_TYPES = ["bytes", "str", "json", *NUMERIC_DTYPES,
             *(f"{d}[]" for d in NUMERIC_DTYPES), "uint16[3]", "float32[*,3]", "int32[2,*]",
             "float64[...]", "uint8[0]"]


@pytest.mark.parametrize("type_text", ALL_TYPES)
@SETTINGS
@given(data=st.data())
def test_round_trip_every_type(type_text, data):
    schema = Schema({"x": type_text, "pad": "str"})
    ct = schema.columns["x"]
    value = data.draw(values_of(ct))
    sample = {"x": value, "pad": "é"}
    buf = b"junk" + schema.encode(sample) + b"tail"   # decode honours offset and length
    got = schema.decode(buf, 4, len(buf) - 8)
    assert_sample_equal(got, sample, schema)
    alone = Schema({"x": type_text})                   # one-column fast paths
    b = alone.encode({"x": value})
    assert_sample_equal(alone.decode(memoryview(b), 0, len(b)), {"x": value}, alone)


@pytest.mark.parametrize("sample, message", [
    ({"tok": np.zeros(3, np.uint16)}, "column 'n' of sample 7: missing"),
    ({"tok": np.zeros(3, np.uint16), "n": 1, "z": 1}, "column 'z' of sample 7: not in the schema"),
    ({"tok": np.zeros(3, np.float32), "n": 1}, "column 'tok' of sample 7: expected dtype uint16"),
    ({"tok": np.zeros(3, np.int64), "n": 1}, "not a safe cast"),         # int64 -> uint16 narrows
    ({"tok": np.zeros((2, 2), np.uint16), "n": 1}, "expected 1-D array"),
    ({"tok": [1, 70000], "n": 1}, "out of range for uint16"),
    ({"tok": [1.5], "n": 1}, "expected uint16 values"),
    ({"tok": "abc", "n": 1}, "expected an ndarray or list"),
    ({"tok": [1], "n": 1.0}, "column 'n' of sample 7: expected int32"),  # float into int
    ({"tok": [1], "n": 2**40}, "out of range for int32"),
])
def test_encode_errors_name_column_and_sample(sample, message):
    s = Schema({"tok": "uint16[]", "n": "int32"})
    with pytest.raises(SchemaError, match=message.replace("(", r"\(")):
        s.encode(sample, 7)


def test_safe_casts_accepted():
    s = Schema({"a": "int64[]", "f": "float64", "b": "bool", "fx": "float32[2,2]"})
    buf = s.encode({"a": np.arange(3, dtype=np.uint16), "f": 3, "b": np.bool_(True),
                    "fx": [[1, 2], [3, 4]]})   # uint16 -> int64, int -> float, list -> float32
    out = s.decode(buf, 0, len(buf))
    assert out["a"].dtype == np.int64 and out["f"] == 3.0 and out["b"] is True
    assert out["fx"].dtype == np.float32 and out["fx"].tolist() == [[1, 2], [3, 4]]


def test_json_and_str_errors():
    s = Schema({"j": "json", "s": "str", "b": "bytes"})
    with pytest.raises(SchemaError, match="column 'j'.*not JSON"):
        s.encode({"j": {1, 2}, "s": "", "b": b""})
    with pytest.raises(SchemaError, match="column 'j'.*not JSON"):
        s.encode({"j": float("nan"), "s": "", "b": b""})   # NaN is not valid JSON
    with pytest.raises(SchemaError, match="column 's'.*UTF-8"):
        s.encode({"j": 1, "s": "\ud800", "b": b""})         # lone surrogate
    with pytest.raises(SchemaError, match="column 'b'.*expected bytes"):
        s.encode({"j": 1, "s": "", "b": "text"})


def test_decode_inconsistent_sizes_raise_corruption():
    s = Schema({"a": "str", "b": "uint16[]"})
    good = s.encode({"a": "hi", "b": np.arange(4, dtype=np.uint16)})
    with pytest.raises(CorruptionError):
        s.decode(good, 0, len(good) - 1)          # truncated
    with pytest.raises(CorruptionError):
        s.decode(good + b"x", 0, len(good) + 1)   # trailing bytes
    one = Schema({"t": "uint16[]"})
    enc = one.encode({"t": np.arange(4, dtype=np.uint16)})
    bad = bytearray(enc)
    bad[8] = 9  # dim says 9 elements, payload holds 4
    with pytest.raises(CorruptionError, match="shape"):
        one.decode(bytes(bad), 0, len(bad))
    fixed = Schema({"t": "uint16[4]"})
    with pytest.raises(CorruptionError, match="schema needs 8"):
        fixed.decode(b"\0" * 6, 0, 6)


def test_schema_value_semantics():
    a = Schema({"t": "uint16[]", "s": "str"})
    assert a == pickle.loads(pickle.dumps(a)) and hash(a) == hash(Schema(a.to_json()))
    assert a != Schema({"s": "str", "t": "uint16[]"})  # column order is part of the layout
    with pytest.raises(TypeError):
        a.columns["x"] = "str"  # type: ignore[index]
