"""Helpers shared by the format tests (no tests here): a hypothesis strategy per column type,
a typed sample comparison, a one-call dataset writer and random token samples."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from streamshard import ShardWriter
from streamshard.schema import ColumnType, Schema

# Every column kind of docs/FORMAT.md, the default columns of ``write``.
COLUMNS = {
    "tokens": "uint16[]", "text": "str", "raw": "bytes", "meta": "json", "label": "int64",
    "score": "float32", "flag": "bool", "img": "uint8[2,3]", "pts": "float32[*,3]",
    "any": "int32[...]", "fixed": "float64[4]",
}


def values_of(ct: ColumnType):
    if ct.kind == "bytes":
        return st.binary(max_size=64)
    if ct.kind == "str":
        return st.text(max_size=32)  # includes "", astral-plane and combining characters
    if ct.kind == "json":
        leaf = st.none() | st.booleans() | st.integers(-2**53, 2**53) | st.text(max_size=8) | \
            st.floats(allow_nan=False, allow_infinity=False)
        return st.recursive(leaf, lambda c: st.lists(c, max_size=3) |
                            st.dictionaries(st.text(max_size=5), c, max_size=3), max_leaves=8)
    dtype = np.dtype(ct.dtype)
    if ct.kind == "scalar":
        return hnp.from_dtype(dtype, allow_nan=False).map(lambda x: x.item())
    if ct.dims is None:
        shape = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4)
    else:
        shape = st.tuples(*[st.integers(0, 5) if d is None else st.just(d) for d in ct.dims])
    return hnp.arrays(dtype, shape, elements=hnp.from_dtype(dtype, allow_nan=False))


def assert_sample_equal(got: dict, want: dict, schema: Schema) -> None:
    assert list(got) == list(schema.columns)
    for name, ct in schema.columns.items():
        g, w = got[name], want[name]
        if ct.kind == "array":
            assert isinstance(g, np.ndarray) and g.flags.writeable
            assert g.dtype == np.dtype(ct.dtype) and g.shape == np.shape(w), name
            np.testing.assert_array_equal(g, w)
        elif ct.kind == "scalar" and ct.dtype.startswith("float"):
            assert type(g) is float and g == float(np.asarray(w, dtype=ct.dtype)), name
        else:
            assert type(g) is type(w) and g == w, name


def write(path, samples, **kw):
    kw.setdefault("columns", COLUMNS)
    with ShardWriter(str(path), **kw) as w:
        for s in samples:
            w.write(s)
    return w


def token_samples(n, length=100, seed=0):
    """Random tokens (incompressible enough that shard counts follow the sizes)."""
    rng = np.random.default_rng(seed)
    return [{"tokens": rng.integers(0, 65536, length, dtype=np.uint16)} for _ in range(n)]
