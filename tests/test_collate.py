"""streamshard.collate.collate returns exactly what torch's default_collate returns."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import default_collate

from streamshard.collate import collate
from streamshard.testing import batch_key

ROWS = [
    # same-shape arrays: the fast path
    [{"x": np.arange(4, dtype=np.uint16)}, {"x": np.arange(4, dtype=np.uint16) + 1}],
    # 2-D float arrays and Python scalars of each kind
    [{"a": np.ones((2, 3), np.float32), "i": 1, "f": 0.5, "b": True}] * 3,
    # text and bytes stay lists
    [{"t": "x", "y": b"\x00"}, {"t": "é", "y": b""}],
    # json values (dicts) fall back to default_collate
    [{"j": {"k": 1}}, {"j": {"k": 2}}],
    # bool arrays and a single sample
    [{"m": np.array([True, False])}],
    # int scalars that mix with bools fall back (default_collate decides)
    [{"v": 1}, {"v": 2}],
]


@pytest.mark.parametrize("samples", ROWS)
def test_equal_to_default_collate(samples):
    assert batch_key(collate(samples)) == batch_key(default_collate(samples))
    got, want = collate(samples), default_collate(samples)
    for k in want:
        if isinstance(want[k], torch.Tensor):
            assert got[k].dtype == want[k].dtype


def test_variable_shapes_fail_like_default_collate():
    samples = [{"x": np.arange(3)}, {"x": np.arange(4)}]
    with pytest.raises(RuntimeError):
        default_collate(samples)
    with pytest.raises(RuntimeError):
        collate(samples)


dtypes = st.sampled_from([np.uint8, np.int16, np.uint16, np.int32, np.uint32, np.int64, np.float16,
                          np.float32, np.float64])


@settings(max_examples=60, deadline=None)
@given(dtype=dtypes, n=st.integers(1, 6), shape=st.lists(st.integers(0, 4), max_size=3),
       seed=st.integers(0, 1000))
def test_property_arrays(dtype, n, shape, seed):
    rng = np.random.default_rng(seed)
    samples = [{"x": (rng.random(shape) * 100).astype(dtype), "s": int(rng.integers(9))} for _ in range(n)]
    got, want = collate(samples), default_collate(samples)
    assert got["x"].dtype == want["x"].dtype and torch.equal(got["x"], want["x"])
    assert torch.equal(got["s"], want["s"])
