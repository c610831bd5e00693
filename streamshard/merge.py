"""``merge_datasets``: one index over several part datasets that live inside ``dest``.

Parallel conversion writes ``dest/parts/chunk-000000/``, ``dest/parts/chunk-000001/``, ... each a
complete dataset; the merge writes ``dest/index.json`` whose shard files are
``parts/chunk-000000/shard-000000.sss`` etc.
No shard data is copied or rewritten; the part indexes may stay.
"""

from __future__ import annotations

import posixpath
from typing import Sequence

from streamshard.errors import ConfigError, DatasetExistsError, SchemaError
from streamshard.index import INDEX_FILE, DatasetIndex, ShardInfo
from streamshard.location import resolve
from streamshard.writer import write_index


def merge_datasets(parts: Sequence[str], dest: str, *, overwrite: bool = False,
                   metadata: dict | None = None,
                   storage_options: dict | None = None) -> DatasetIndex:
    """Write ``dest/index.json`` over the shards of ``parts`` (in the given order) and return it.

    Each part must be a dataset directory inside ``dest`` (same file system). Parts must share
    columns (``SchemaError`` otherwise, showing both) and compression (``ConfigError``).
    ``metadata`` defaults to the first part's. ``DatasetExistsError`` if ``dest`` already has an
    index and ``overwrite`` is false.
    """
    if not parts:
        raise ConfigError("merge_datasets needs at least one part, got none")
    opts = storage_options or {}
    loc = resolve(dest, opts)
    fs, root = loc.fs, loc.root
    index_path = f"{root}/{INDEX_FILE}"
    if fs.exists(index_path) and not overwrite:
        raise DatasetExistsError(f"{dest} already holds a dataset ({index_path}); "
                                 f"pass overwrite=True to replace it")
    first: DatasetIndex | None = None
    shards: list[ShardInfo] = []
    for part in parts:
        part_loc = resolve(part, opts)
        part_root = part_loc.root
        if type(part_loc.fs) is not type(fs) or not part_root.startswith(root.rstrip("/") + "/"):
            raise ConfigError(f"part {part} is not inside the merge destination {dest}; "
                              f"parts must be dataset directories under it")
        rel = part_root[len(root.rstrip("/")) + 1:]
        part_index_path = f"{part_root}/{INDEX_FILE}"
        idx = DatasetIndex.from_bytes(fs.cat_file(part_index_path), part_index_path)
        if first is None:
            first = idx
        elif idx.schema != first.schema:
            raise SchemaError(f"part {part} has columns {idx.schema.to_json()}, but part "
                              f"{parts[0]} has {first.schema.to_json()}")
        elif idx.compression != first.compression:
            raise ConfigError(f"part {part} uses compression {idx.compression!r}, but part "
                              f"{parts[0]} uses {first.compression!r}")
        for s in idx.shards:
            shards.append(ShardInfo(len(shards), posixpath.join(rel, s.file), s.samples,
                                    s.bytes, s.raw_bytes, s.xxh64, s.table_xxh64))
    assert first is not None
    merged = DatasetIndex.build(first.schema, shards, compression=first.compression,
                                compression_level=first.compression_level,
                                block_size=first.block_size, shard_size=first.shard_size,
                                metadata=first.metadata if metadata is None else metadata)
    write_index(merged, fs, loc.join(INDEX_FILE))
    return merged
