"""Prefetch hints of batch keys (streamshard/batch_keys.py): the shards a chunk of steps reads,
in reading order, found once per chunk (vectorized) and united over the chunks ahead."""

from __future__ import annotations

import types

import numpy as np
from hypothesis import given, settings, strategies as st

from streamshard.batch_keys import _shards


def reference(dataset, chunk):
    """The per-sample definition: step by step, stream by stream (ascending), sample order."""
    out, seen = [], set()
    for _, streams, samples in chunk:
        for stream in np.unique(streams).tolist():
            if not dataset.is_remote(stream):
                continue
            offsets = dataset.datasets[stream].index.offsets
            for shard in (np.searchsorted(offsets, samples[streams == stream], side="right") - 1).tolist():
                if (stream, shard) not in seen:
                    seen.add((stream, shard))
                    out.append((stream, shard))
    return tuple(out)


def fake_dataset(shard_sizes, remote):
    datasets = [types.SimpleNamespace(index=types.SimpleNamespace(
        offsets=np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64))) for sizes in shard_sizes]
    return types.SimpleNamespace(datasets=datasets, is_remote=lambda s: remote[s])


@settings(max_examples=60, deadline=None)
@given(data=st.data(), streams=st.integers(1, 3), steps=st.integers(0, 6), batch=st.integers(1, 9))
def test_vectorized_shards_equal_the_per_sample_definition(data, streams, steps, batch):
    sizes = [data.draw(st.lists(st.integers(1, 7), min_size=1, max_size=6)) for _ in range(streams)]
    remote = [data.draw(st.booleans()) for _ in range(streams)]
    dataset = fake_dataset(sizes, remote)
    chunk = []
    for step in range(steps):
        ids = np.asarray(data.draw(st.lists(st.integers(0, streams - 1), min_size=batch,
                                            max_size=batch)), dtype=np.int64)
        samples = np.asarray([data.draw(st.integers(0, sum(sizes[s]) - 1)) for s in ids.tolist()],
                             dtype=np.int64)
        chunk.append((step, ids, samples))
    assert _shards(dataset, chunk) == reference(dataset, chunk)
    # the hint over several chunks is the ordered union of each chunk's shards
    cut = len(chunk) // 2
    union = tuple(dict.fromkeys(_shards(dataset, chunk[:cut]) + _shards(dataset, chunk[cut:])))
    assert union == reference(dataset, chunk)
