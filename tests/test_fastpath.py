"""The columnar fast path for fixed-size schemas returns exactly what per-sample decoding plus
torch's default_collate returns, compressed and uncompressed, in and out of workers."""

from __future__ import annotations

import numpy as np
import pytest
from torch.utils.data import default_collate

from streamshard import ShardWriter, StreamingDataLoader, StreamingDataset, World
from streamshard.testing import batch_key, take

COLUMNS = {"i": "int32", "u": "uint8", "h": "float16", "f": "float64", "b": "bool",
           "tok": "uint16[5]", "img": "float32[2,3]", "m": "bool[4]"}


def sample(i: int) -> dict:
    rng = np.random.default_rng(i)
    return {"i": -i, "u": i % 256, "h": float(np.float16(i / 7)), "f": i / 3, "b": i % 2 == 0,
            "tok": rng.integers(0, 60000, 5).astype(np.uint16),
            "img": rng.random((2, 3)).astype(np.float32), "m": rng.random(4) > 0.5}


@pytest.fixture(scope="module", params=["zstd", None])
def path(request, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("fp") / "ds")
    with ShardWriter(out, columns=COLUMNS, shard_size="3KB", block_size="1KiB",
                     compression=request.param) as w:
        for i in range(150):
            w.write(sample(i))
    return out


@pytest.mark.parametrize("workers", [0, 2])
def test_fast_path_equals_default_collate(path, workers):
    def loader(collate_fn):
        ds = StreamingDataset(path, global_batch_size=8, seed=4, world=World())
        kw = {"multiprocessing_context": "fork"} if workers else {}
        return StreamingDataLoader(ds, num_workers=workers, collate_fn=collate_fn, **kw)

    assert loader(None).streaming_dataset._columns is not None  # the fast path is taken
    fast = [batch_key(b) for b in take(loader(None), 25)]
    slow = [batch_key(b) for b in take(loader(default_collate), 25)]
    assert fast == slow
    first = next(iter(loader(None)))
    assert str(first["i"].dtype) == "torch.int64" and str(first["h"].dtype) == "torch.float64"
    assert tuple(first["img"].shape) == (8, 2, 3) and str(first["tok"].dtype) == "torch.uint16"


def test_variable_schema_takes_the_general_path(id_dataset_factory, tmp_path):
    out = str(tmp_path / "v")
    with ShardWriter(out, columns={"t": "uint16[]"}) as w:
        w.write({"t": np.arange(3, dtype=np.uint16)})
    ds = StreamingDataset(out, global_batch_size=1, world=World())
    assert ds._columns is None
