"""``ShardWriter``: samples in, fixed-size checksummed shards and an index out.

Samples are encoded (schema.py), packed into raw blocks of ~``block_size`` bytes, each block is
compressed on its own and appended to the current shard; a shard is closed when the next block
would push its file past ``shard_size``. The index is written last, atomically, so a directory
with an ``index.json`` always describes complete shards.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Mapping

import zstandard

from streamshard.atomic import create_exclusive, put_atomic, temp_name
from streamshard.destlock import DestLock, RemoteDestLock, clean_stale_temps
from streamshard.errors import ConfigError, DatasetExistsError
from streamshard.index import INDEX_FILE, DatasetIndex, ShardInfo
from streamshard.indexcheck import shard_name_problem
from streamshard.location import resolve
from streamshard.schema import ColumnType, Schema
from streamshard.shardfile import TABLE_ENTRY, ShardFileWriter, pack_raw_block
from streamshard.sizes import format_size, parse_size

log = logging.getLogger(__name__)
SHARD_SUFFIX = ".sss"
log = logging.getLogger(__name__)
# False while a caller that already warned about the sizes (convert's driver) runs its writers.
SIZE_WARNING: ContextVar[bool] = ContextVar("streamshard_size_warning", default=True)
# The writer defaults, set here only: ShardWriter, convert(), packing and the CLI all use them.
DEFAULT_SHARD_SIZE = 64 * 10**6  # "64MB"
DEFAULT_BLOCK_SIZE = 64 * 2**10  # 64 KiB: see docs/FORMAT.md "Block size" for the measurement
DEFAULT_COMPRESSION_LEVEL = 3
# zstd accepts "fast" negative levels down to -131072 but below -100 nothing changes measurably.
_MIN_LEVEL, _MAX_LEVEL = -100, zstandard.MAX_COMPRESSION_LEVEL


@dataclass(frozen=True)
class WriterConfig:
    """Validated writer settings (sizes in bytes)."""

    shard_size: int = DEFAULT_SHARD_SIZE
    block_size: int = DEFAULT_BLOCK_SIZE
    compression: str | None = "zstd"
    compression_level: int | None = DEFAULT_COMPRESSION_LEVEL
    shard_prefix: str = ""

    def __post_init__(self) -> None:
        for name in ("shard_size", "block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be positive, got {value!r}")
        if self.compression not in (None, "zstd"):
            raise ConfigError(f"compression must be 'zstd' or None/'none', got {self.compression!r}")
        if self.compression == "zstd":
            lvl = self.compression_level
            if not isinstance(lvl, int) or isinstance(lvl, bool) or not _MIN_LEVEL <= lvl <= _MAX_LEVEL:
                raise ConfigError(f"compression_level must be an int in [{_MIN_LEVEL}, "
                                  f"{_MAX_LEVEL}], got {lvl!r}")
        warn_small_shards(self.shard_size, self.block_size)
        p = self.shard_prefix
        problem = shard_name_problem(f"{p}shard-000000.sss") if isinstance(p, str) else "is not a str"
        if problem is not None:
            raise ConfigError(f"shard_prefix must be a relative posix prefix of safe characters "
                              f"([A-Za-z0-9._-+=,@~] and '/'), got {p!r}: the shard name {problem}")


def warn_small_shards(shard_size: int, block_size: int) -> None:
    """Log a warning when ``shard_size < block_size``: a shard always holds at least one whole
    block, so such shards come out about ``block_size`` bytes each, not ``shard_size``. Silent
    while :data:`SIZE_WARNING` is false."""
    if shard_size >= block_size or not SIZE_WARNING.get():
        return
    log.warning("shard size %s is below the block size %s: a shard holds at least one block, so "
                "shards will be about %s each; lower the block size (--block-size) to get "
                "smaller shards", format_size(shard_size), format_size(block_size),
                format_size(block_size))


@dataclass(frozen=True)
class WriteSummary:
    """What a finished writer produced. ``raw_bytes`` counts uncompressed block bytes."""

    samples: int
    shards: int
    raw_bytes: int
    stored_bytes: int
    seconds: float


class ShardWriter:
    """Write a dataset to ``dest`` (local path or fsspec URL). See docs/API.md.

    Use as a context manager; ``write(sample)`` per sample; ``close()`` writes the index. If the
    ``with`` body raises, no index is written and every file this writer created is removed.
    Output is deterministic: the same samples in the same order give byte-identical files.
    Not thread-safe.
    """

    def __init__(self, dest: str, *, columns: Mapping[str, ColumnType | str],
                 shard_size: int | str = DEFAULT_SHARD_SIZE,
                 block_size: int | str = DEFAULT_BLOCK_SIZE, compression: str | None = "zstd",
                 compression_level: int | None = DEFAULT_COMPRESSION_LEVEL,
                 overwrite: bool = False, storage_options: dict | None = None,
                 metadata: dict | None = None, shard_prefix: str = ""):
        if compression == "none":
            compression = None
        self.config = WriterConfig(
            shard_size=parse_size(shard_size, name="shard_size"),
            block_size=parse_size(block_size, name="block_size"),
            compression=compression,
            compression_level=compression_level if compression else None,
            shard_prefix=shard_prefix,
        )
        self.schema = columns if isinstance(columns, Schema) else Schema(columns)
        self.dest = str(dest)
        try:  # fail now, not at close() after all shards are written
            self.metadata = json.loads(json.dumps(dict(metadata or {}), allow_nan=False))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"metadata must be JSON-serializable: {exc}") from None
        self.summary: WriteSummary | None = None
        self._t0 = time.perf_counter()
        self._cctx = (zstandard.ZstdCompressor(level=self.config.compression_level)
                      if compression else None)
        self._encode = self.schema.encode
        self._block: list[bytes] = []
        self._block_raw = 16  # u64 n + the final offset; each sample adds 8 + its length
        self._count = 0
        self._shard: ShardFileWriter | None = None
        self._shard_file: Any = None
        self._shard_tmp = ""
        self._shards: list[ShardInfo] = []
        self._written: list[str] = []  # final paths this writer created (removed on abort)
        self._closed = False
        self._lock: DestLock | RemoteDestLock | None = None
        try:
            self._open_dest(overwrite, storage_options or {})
        except BaseException:
            self._release()
            raise

    # -- destination -----------------------------------------------------------------------
    def _open_dest(self, overwrite: bool, storage_options: dict) -> None:
        self._loc = resolve(self.dest, storage_options)
        self._fs, self._root, self._local = self._loc.fs, self._loc.root, self._loc.local
        if not self._local:  # a conditional create where the store has one (docs/FORMAT.md)
            self._lock = RemoteDestLock(self._fs, self._root, self.dest)
        else:  # one writer per destination
            self._lock = DestLock(self._root)
            prefix_dir = os.path.dirname(self._join(self.config.shard_prefix + "x"))
            for path in clean_stale_temps(self._root, prefix_dir):
                log.info("removed %s, left by a writer that died", path)
        index_path = self._join(INDEX_FILE)
        if self._fs.exists(index_path):
            if not overwrite:
                raise DatasetExistsError(f"{self.dest} already holds a dataset ({index_path}); "
                                         f"pass overwrite=True to replace it")
            # Remove the old index first: until the new one lands, dest is not a dataset, so a
            # crash mid-write can never pair the old index with half-rewritten shards.
            self._fs.rm_file(index_path)
        if self._local:
            os.makedirs(self._root, exist_ok=True)
            self._tmpdir = None
        else:
            self._tmpdir = tempfile.mkdtemp(prefix="streamshard-write-")

    def _join(self, rel: str) -> str:
        return self._loc.join(rel)

    # -- writing ---------------------------------------------------------------------------
    def write(self, sample: Mapping[str, Any]) -> None:
        """Validate, encode and append one sample (``SchemaError`` names column and sample)."""
        if self._closed:
            raise ConfigError(f"ShardWriter for {self.dest} is closed")
        data = self._encode(sample, self._count)
        size = len(data) + 8
        if self._block and self._block_raw + size > self.config.block_size:
            self._flush_block()
        self._block.append(data)
        self._block_raw += size
        self._count += 1
        if self._block_raw >= self.config.block_size:
            self._flush_block()

    def _flush_block(self) -> None:
        raw = pack_raw_block(self._block)
        stored = self._cctx.compress(raw) if self._cctx is not None else raw
        shard = self._shard
        # Roll over before a block that would push a non-empty shard past shard_size, so shard
        # files never exceed the target unless a single block is larger than it.
        if shard is not None and shard.num_blocks and \
                shard.size + len(stored) + TABLE_ENTRY.size > self.config.shard_size:
            self._finish_shard()
            shard = None
        if shard is None:
            shard = self._start_shard()
        shard.add_block(stored, len(raw), len(self._block))
        self._block = []
        self._block_raw = 16

    def _start_shard(self) -> ShardFileWriter:
        name = f"{self.config.shard_prefix}shard-{len(self._shards):06d}{SHARD_SUFFIX}"
        if self._local:
            final = self._join(name)
            os.makedirs(os.path.dirname(final), exist_ok=True)
            self._shard_tmp = temp_name(final)
        else:
            self._shard_tmp = os.path.join(self._tmpdir, f"shard-{len(self._shards):06d}.tmp")
        self._shard_name = name
        # O_EXCL|O_NOFOLLOW: never write through a symlink planted at the temp name
        self._shard_file = os.fdopen(create_exclusive(self._shard_tmp), "wb")
        self._shard = ShardFileWriter(self._shard_file, compressed=self._cctx is not None)
        return self._shard

    def _finish_shard(self) -> None:
        shard, f = self._shard, self._shard_file
        size, digest = shard.finish()
        f.flush()
        os.fsync(f.fileno())  # the index promises complete shards; make that survive a crash
        f.close()
        final = self._join(self._shard_name)
        if self._local:
            os.replace(self._shard_tmp, final)
        else:
            self._fs.put_file(self._shard_tmp, final)
            os.remove(self._shard_tmp)
        self._written.append(final)
        self._shards.append(ShardInfo(len(self._shards), self._shard_name, shard.num_samples,
                                      size, shard.raw_bytes, digest, shard.table_xxh64))
        self._shard = self._shard_file = None
        self._shard_tmp = ""

    # -- closing ---------------------------------------------------------------------------
    def close(self) -> WriteSummary:
        """Flush, finish the last shard, write the index atomically; return the summary."""
        if self._closed:
            return self.summary  # type: ignore[return-value]
        if self._block:
            self._flush_block()
        if self._shard is not None:
            self._finish_shard()
        cfg = self.config
        index = DatasetIndex.build(self.schema, self._shards, compression=cfg.compression,
                                   compression_level=cfg.compression_level,
                                   block_size=cfg.block_size, shard_size=cfg.shard_size,
                                   metadata=self.metadata)
        write_index(index, self._fs, self._join(INDEX_FILE))
        self._cleanup_tmpdir()
        self._release()
        self._closed = True
        self.summary = WriteSummary(
            samples=self._count, shards=len(self._shards),
            raw_bytes=sum(s.raw_bytes for s in self._shards),
            stored_bytes=sum(s.bytes for s in self._shards),
            seconds=time.perf_counter() - self._t0)
        self.index = index
        return self.summary

    def abort(self) -> None:
        """Stop without writing an index and remove every file this writer created."""
        if self._closed:
            return
        self._closed = True
        if self._shard_file is not None:
            self._shard_file.close()
        if self._shard_tmp and os.path.exists(self._shard_tmp):
            os.remove(self._shard_tmp)
        for path in self._written:
            try:
                if self._local:
                    os.remove(path)
                else:
                    self._fs.rm_file(path)
            except OSError:
                pass  # best effort: without an index the leftovers are not a dataset
        self._cleanup_tmpdir()
        self._release()

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _cleanup_tmpdir(self) -> None:
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
            return
        try:
            self.close()
        except BaseException:
            self.abort()  # close() failed before the index landed: leave nothing half-written
            raise

    def __repr__(self) -> str:
        return f"ShardWriter({self.dest!r}, samples={self._count}, shards={len(self._shards)})"


def write_index(index: DatasetIndex, fs: Any, path: str) -> None:
    """Write ``index`` to ``path`` atomically (``atomic.put_atomic``: temp file + fsync + rename
    locally, a single put on object stores)."""
    put_atomic(path, index.to_bytes(), fs=fs)
