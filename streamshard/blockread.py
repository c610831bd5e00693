"""Batch reads out of compressed shards: a batch's rows copied block by block, not sample by sample.

A batch gather of a fixed-size schema over zstd shards needs, per shard, the samples' blocks:
one vectorized search finds each sample's block, and each block a batch touches is fetched once
(``ShardFileReader.block_rows``: decompressed or taken from the block cache, its xxh64, frame and
header checked on decompression, its sample sizes checked once) and its rows copied in one
operation (one slice, or one fancy index when the batch takes several rows of the block).
"""

from __future__ import annotations

import numpy as np

from streamshard.errors import CorruptionError


def copy_rows(reader, offsets: np.ndarray, row: int, dest: np.ndarray) -> None:
    """``dest[i] = `` the ``row`` encoded bytes of sample ``offsets[i]`` of the compressed shard
    read by ``reader``. ``offsets``: sorted ascending, in range (a located batch); ``dest``: a
    C-contiguous ``(len(offsets), row)`` uint8 array. The reader's stats count what a
    sample-by-sample read in that order would (one fetch per block, hits for the rest)."""
    n = len(offsets)
    if n == 0:
        return
    starts = reader.block_starts
    blocks = np.searchsorted(starts, offsets, side="right") - 1
    within = offsets - starts[blocks]
    cuts = np.flatnonzero(blocks[1:] != blocks[:-1]) + 1
    bounds = [0, *cuts.tolist(), n]
    block_of = blocks[bounds[:-1]].tolist()
    first_j = within[bounds[:-1]].tolist()
    flat = memoryview(dest).cast("B")
    block_rows = reader.block_rows
    for b, j, a, e in zip(block_of, first_j, bounds[:-1], bounds[1:]):
        raw, head = block_rows(b, row, e - a)
        if e - a == 1:  # the common case of a shuffled batch: one row of this block
            start = head + j * row
            flat[a * row:(a + 1) * row] = raw[start:start + row]
        else:
            rows = np.frombuffer(raw, np.uint8, (len(raw) - head) // row * row, head)
            dest[a:e] = rows.reshape(-1, row)[within[a:e]]


def sorted_rows(dataset, ids: np.ndarray, row: int) -> tuple[np.ndarray, np.ndarray]:
    """``(rows, order)``: ``rows[i]`` (``row`` uint8) is the encoding of sample
    ``ids[order[i]]`` (``ids``: int64, in ``[0, len(dataset))``; ``order`` sorts them), read
    shard by shard in offset order: compressed shards block by block (:func:`copy_rows`), an
    uncompressed shard sample by sample out of its map (what a flat gather declined)."""
    order = np.argsort(ids, kind="stable")  # by shard, then offset: a block's samples in a row
    shards, within = dataset.index.locate(ids[order])
    cuts = (np.flatnonzero(shards[1:] != shards[:-1]) + 1).tolist()
    bounds = [0, *cuts, len(ids)]
    rows = np.empty((len(ids), row), np.uint8)
    for a, b in zip(bounds[:-1], bounds[1:]):
        reader = dataset.shard_reader(int(shards[a]))
        if reader.compressed:
            copy_rows(reader, within[a:b], row, rows[a:b])
        else:
            _span_copy(reader, within[a:b], row, rows[a:b])
    return rows, order


def _span_copy(reader, offsets: np.ndarray, row: int, dest: np.ndarray) -> None:
    """``dest[i] =`` sample ``offsets[i]``'s bytes, copied one by one (``reader.span``)."""
    flat = memoryview(dest).cast("B")
    pos = 0
    span = reader.span
    for k in offsets.tolist():
        buf, start, length = span(k)
        if length != row:
            raise CorruptionError(f"{reader.name} sample {k}: {length} bytes, the schema "
                                  f"needs {row}")
        flat[pos:pos + row] = buf[start:start + row]
        pos += row
