"""Random access to a dataset: ``open_dataset`` -> ``Dataset``; ``LocalSource`` for local dirs.

``ds[i]`` locates sample ``i`` through the index, looks up the open shard reader, then does one
block read (compressed) or an mmap slice (uncompressed). Shard readers are kept in an LRU
(streamshard/lru.py) of ``max_open_shards``; evicting one unpins it in the source (the remote
cache may then evict the file). Decompressed blocks are kept in a byte-bounded LRU of the same
design, shared by the dataset's shard readers; batch gathers of fixed-size rows
(``read_rows``, ``streamshard.fastpath``) keep theirs in a block arena of the same byte budget
instead (streamshard/blockarena.py).
"""

from __future__ import annotations

import os
import threading
from bisect import bisect_right
from typing import Any, Iterator, Protocol, Sequence

import numpy as np

from streamshard import blockarena, blockread
from streamshard.errors import ConfigError, StorageError
from streamshard.flatgather import FlatGather, OutOfRange
from streamshard.index import INDEX_FILE, DatasetIndex, ShardInfo
from streamshard.location import local_path
from streamshard.lru import LRU
from streamshard.schema import Schema
from streamshard.shardcheck import open_regular
from streamshard.shardfile import ReadStats, ShardFileReader
from streamshard.sizes import parse_size

DEFAULT_MAX_OPEN_SHARDS = 64
# Decompressed blocks kept per Dataset (per process): 64 MiB holds the shuffle windows of 8 lanes
# of 8 MiB each; compressed shuffled reads beyond that decompress one block per sample.
DEFAULT_BLOCK_CACHE = "64MiB"
_NO_READER: tuple[Any, Any] = (None, None)  # matches no shard number


class ShardSource(Protocol):
    """Where a dataset's bytes come from. Picklable (it travels to DataLoader workers);
    methods are thread-safe; repr is stable."""

    url: str

    def read_index(self) -> bytes: ...
    # Optional: ``load_index() -> DatasetIndex`` for a source that parses the index itself
    # (``CachedSource`` checks fingerprint and budget): ``Dataset`` then does not parse it again.
    def shard_path(self, shard: ShardInfo) -> str: ...
    def unpin(self, shard: ShardInfo) -> None: ...
    def prefetch(self, shards: Sequence[ShardInfo]) -> None: ...
    def stats(self) -> dict[str, int]: ...


class LocalSource:
    """A dataset directory on the local file system. Returns paths inside it; never copies,
    never pins (local files are not evictable). Picklable, thread-safe, stable repr."""

    def __init__(self, root: str):
        self.root = os.path.abspath(os.fspath(root))
        self.url = self.root

    def read_index(self) -> bytes:
        path = os.path.join(self.root, INDEX_FILE)
        if not os.path.exists(path):
            hint = "" if os.path.isdir(self.root) else " (the directory does not exist)"
            raise StorageError(f"{path}: no index file{hint}. Are you passing a streamshard "
                               f"directory?", url=path)
        with open_regular(path, INDEX_FILE) as f:  # a FIFO or device is refused, never read
            return f.read()

    def shard_path(self, shard: ShardInfo) -> str:
        path = os.path.join(self.root, *shard.file.split("/"))
        if not os.path.exists(path):
            raise StorageError(f"{path}: shard {shard.index} ({shard.file}) is missing", url=path)
        return path

    def unpin(self, shard: ShardInfo) -> None:
        """Nothing to release: local files are never evicted."""

    def prefetch(self, shards: Sequence[ShardInfo]) -> None:
        """Nothing to fetch: the files are already local."""

    def stats(self) -> dict[str, int]:
        return {}

    def __repr__(self) -> str:
        return f"LocalSource({self.root!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LocalSource) and other.root == self.root

    def __hash__(self) -> int:
        return hash(self.root)


class Dataset:
    """A random-access view of a dataset. ``len``, ``ds[i]`` (negative allowed), ``iter`` (in
    order), ``read(shard, offset)``, ``locate(i)``, ``schema``, ``index``, ``fingerprint``,
    ``num_shards``, ``stats``, ``close()``.

    Picklable: a pickled copy holds the source and index only and reopens shards lazily.
    Reads are thread-safe (per-thread zstd contexts; opening/evicting shard readers is locked).
    """

    def __init__(self, source: ShardSource, index: DatasetIndex | None = None, *,
                 max_open_shards: int = DEFAULT_MAX_OPEN_SHARDS,
                 block_cache: int | str = DEFAULT_BLOCK_CACHE, verify_blocks: bool = True):
        if not isinstance(max_open_shards, int) or max_open_shards < 1:
            raise ConfigError(f"max_open_shards must be positive, got {max_open_shards!r}")
        self.block_cache_bytes = 0 if block_cache in (0, "0") else parse_size(block_cache, name="block_cache")
        self.source = source
        if index is None:
            load = getattr(source, "load_index", None)  # optional: a source that parses anyway
            index = (load() if load is not None else
                     DatasetIndex.from_bytes(source.read_index(), f"{source.url}/{INDEX_FILE}"))
        self.index = index
        self.max_open_shards = max_open_shards
        if not isinstance(verify_blocks, bool):
            raise ConfigError(f"verify_blocks must be True or False, got {verify_blocks!r}")
        self.verify_blocks = verify_blocks
        self._init_runtime()

    def _init_runtime(self) -> None:
        self._readers: LRU[int, ShardFileReader] = LRU(self.max_open_shards, on_evict=self._release)
        self._lock = threading.Lock()  # held while opening a shard: one reader per shard
        self._stats = ReadStats()
        self._opened = 0
        self._len = self.index.num_samples
        self._starts = self.index.offsets.tolist()  # bisect on a list: ~4x a numpy search
        # (shard, reader) of the last read: ds[i] in the same shard skips the LRU (its lock and
        # reordering: ~0.3 us of a ~3 us read). Set only by _reader, cleared on every eviction,
        # so it is always an open reader that is also the LRU's most recent entry.
        self._last = _NO_READER
        self._generation = 0  # bumped when a reader is evicted or closed (reader_generation)
        self._decode = self.index.schema.decode
        self._blocks = (LRU(self.block_cache_bytes, size=_block_bytes)
                        if self.block_cache_bytes else None)

    # -- pickling: drop open files and maps ------------------------------------------------
    def __getstate__(self) -> dict:
        return {"source": self.source, "index": self.index, "max_open_shards": self.max_open_shards,
                "block_cache_bytes": self.block_cache_bytes, "verify_blocks": self.verify_blocks}

    def __setstate__(self, state: dict) -> None:
        self.source = state["source"]
        self.index = state["index"]
        self.max_open_shards = state["max_open_shards"]
        self.block_cache_bytes = state["block_cache_bytes"]
        self.verify_blocks = state.get("verify_blocks", True)
        self._init_runtime()

    # -- properties ------------------------------------------------------------------------
    @property
    def schema(self) -> Schema:
        return self.index.schema

    @property
    def fingerprint(self) -> str:
        return self.index.fingerprint

    @property
    def num_shards(self) -> int:
        return len(self.index.shards)

    @property
    def stats(self) -> dict[str, int]:
        """``blocks_read``, ``block_cache_hits``, ``bytes_read`` (decompressed),
        ``stored_bytes_read``, ``shards_opened``, ``open_shards``."""
        d = self._stats.as_dict()
        if self._blocks is not None:
            d.update(self._blocks.stats(prefix="block_lru_"))
        d["shards_opened"] = self._opened
        d["open_shards"] = len(self._readers)
        return d

    def __len__(self) -> int:
        return self._len

    def reserve_block_cache(self, nbytes: int) -> None:
        """Grow the decompressed-block cache to at least ``nbytes`` (the block-aware shuffle
        sizes it to the blocks its lanes keep in flight); never shrinks it."""
        if nbytes > self.block_cache_bytes:
            self.block_cache_bytes = int(nbytes)
            if self._blocks is None:  # readers opened before keep reading uncached
                self._blocks = LRU(self.block_cache_bytes, size=_block_bytes)
            else:
                self._blocks.capacity = self.block_cache_bytes

    def __repr__(self) -> str:
        return (f"Dataset({self.source!r}, samples={self._len}, shards={self.num_shards}, "
                f"fingerprint={self.index.fingerprint!r})")

    # -- reading ---------------------------------------------------------------------------
    def locate(self, i: int) -> tuple[int, int]:
        """Global sample ``i`` -> ``(shard index, offset in shard)``."""
        return self.index.locate(i)

    def __getitem__(self, i: int) -> dict:
        if type(i) is int and 0 <= i < self._len:  # the common case of index.locate, inlined
            starts = self._starts
            s = bisect_right(starts, i) - 1
            k = i - starts[s]
        else:
            s, k = self.index.locate(i)
        last = self._last
        r = last[1] if last[0] == s else self._reader(s)
        return r.read(k)

    def _reader(self, s: int) -> ShardFileReader:
        """The open reader of shard ``s`` (opened if needed), now the most recent in the LRU
        and remembered as the last one used."""
        r = self._readers.get(s) or self._open(s)
        self._last = (s, r)
        if self._readers.peek(s) is not r:  # evicted by another thread meanwhile: forget it
            self._last = _NO_READER
        return r

    def read(self, shard: int, offset: int) -> dict:
        """Sample ``offset`` of shard ``shard`` (``ds[i]`` is ``read(*ds.locate(i))``)."""
        r = self.shard_reader(shard)
        if not 0 <= offset < r.num_samples:
            raise IndexError(f"offset {offset} out of range for shard {shard} "
                             f"({r.num_samples} samples)")
        return r.read(offset)

    def shard_reader(self, shard: int) -> ShardFileReader:
        """The open reader of ``shard`` (opened if needed; counts as a use for the LRU)."""
        last = self._last
        if last[0] == shard:
            return last[1]
        if not 0 <= shard < len(self.index.shards):
            raise IndexError(f"shard {shard} out of range ({self.num_shards} shards)")
        return self._reader(shard)

    def read_rows(self, ids: Sequence[int], out: memoryview) -> None:
        """Copy the encoded bytes of samples ``ids`` into consecutive rows of ``out`` (a writable
        byte buffer of ``len(ids) * schema.fixed_size`` bytes). Only for fixed-size schemas,
        whose encoding is the columns' little-endian bytes back to back (docs/FORMAT.md)."""
        size = self.index.schema.fixed_size
        if size is None:
            raise ConfigError("read_rows needs a schema whose columns all have a fixed size")
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if not len(ids):
            return
        dest = np.frombuffer(out, np.uint8, len(ids) * size).reshape(len(ids), size)
        rows, order = self.gather_rows(ids, size, np.dtype(np.uint8), size)
        if order is None:
            dest[...] = rows
        else:
            dest[order] = rows

    def gather_rows(self, ids: np.ndarray, row: int, dtype: np.dtype, items: int
                    ) -> tuple[np.ndarray, np.ndarray | None]:
        """``(rows, order)`` of a fixed-size schema's samples ``ids`` (int64; negative ids count
        from the end, others outside the dataset are an ``IndexError``): ``rows[i]``
        (``items`` values of ``dtype``, ``row`` bytes) is sample ``ids[order[i]]``, or
        ``ids[i]`` when ``order`` is ``None``. Uncompressed shards of uniform rows: one fancy
        index for the whole batch (:mod:`streamshard.flatgather`); compressed shards: one fancy
        index over the decompressed blocks (:mod:`streamshard.blockarena`); otherwise shard
        after shard in offset order, block by block (:mod:`streamshard.blockread`). The one row
        gather of the columnar fast path and of NumpyBatchIterator."""
        if self.index.compression is None:
            flat = self.__dict__.get("_flat_gather")  # never pickled (__getstate__)
            if flat is None or flat.row != row:
                flat = self.__dict__["_flat_gather"] = FlatGather(self, row)
            try:
                rows = flat.gather(ids, dtype, items)
            except OutOfRange:
                ids = self._checked_ids(ids)
                rows = flat.gather(ids, dtype, items)
            if rows is not None:
                return rows, None
        else:
            ids = self._checked_ids(ids)
            rows = blockarena.arena_rows(self, ids, row)  # one fancy index over the blocks
            if rows is not None:
                return rows.view(dtype).reshape(len(ids), items), None
        rows, order = blockread.sorted_rows(self, ids, row)
        return rows.view(dtype).reshape(len(ids), items), order

    def _checked_ids(self, ids: np.ndarray) -> np.ndarray:
        """``ids`` with negative ids counted from the end; an ``IndexError`` names an id outside
        the dataset."""
        if len(ids) and (int(ids.min()) < 0 or int(ids.max()) >= self._len):
            _, _ = self.index.locate(ids)  # IndexError naming the id (negative ids count from the end)
            ids = np.where(ids < 0, ids + self._len, ids)
        return ids

    def __iter__(self) -> Iterator[dict]:
        for s, info in enumerate(self.index.shards):
            if not info.samples:
                continue
            r = self._reader(s)
            read = r.read
            for k in range(info.samples):
                yield read(k)

    def _open(self, s: int) -> ShardFileReader:
        with self._lock:
            r = self._readers.get(s)
            if r is not None:
                return r
            info = self.index.shards[s]
            self._readers.capacity = self.max_open_shards  # the loader may lower it after open
            self._readers.make_room(1)  # unpin first: a bounded remote cache may need the room
            path = self.source.shard_path(info)
            try:
                r = ShardFileReader(path, decode=self._decode, stats=self._stats,
                                    block_cache=self._blocks, name=f"shard {s} ({info.file})",
                                    expected=info, verify_blocks=self.verify_blocks)
            except BaseException:
                self.source.unpin(info)
                raise
            self._readers.put(s, r)
            self._opened += 1
            return r

    def _release(self, s: int, reader: ShardFileReader) -> None:
        """An evicted reader: unpin its shard. References are dropped instead of closing:
        another thread may be mid-read on it; the file and map close when the last reference
        goes (POSIX keeps unlinked files readable, so unpinning now is safe even if the cache
        evicts the file)."""
        self._last = _NO_READER
        self._generation += 1
        self.source.unpin(self.index.shards[s])

    # -- for gathers that keep the maps of open shards (streamshard/flatgather.py) ----------
    @property
    def reader_generation(self) -> int:
        """Changes whenever an open shard reader is evicted or the dataset is closed."""
        return self._generation

    def peek_reader(self, shard: int) -> ShardFileReader | None:
        """The open reader of ``shard`` or ``None``, without counting a use."""
        return self._readers.peek(shard)

    def touch_readers(self, shards: Sequence[int]) -> None:
        """Count a use of each open reader of ``shards`` (LRU order), in one locked pass."""
        self._readers.touch(shards)

    def close(self) -> None:
        """Close every open shard and unpin it. The dataset stays usable (reopens lazily)."""
        with self._lock:
            for s, r in self._readers.drain():
                r.close()
                self.source.unpin(self.index.shards[s])
            self._last = _NO_READER  # after the drain: a concurrent _reader then sees it gone
            self._generation += 1

    def __enter__(self) -> "Dataset":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def open_dataset(path_or_url: str, *, cache_dir: str | None = None, cache_limit: Any = None,
                 storage_options: dict | None = None, source: ShardSource | None = None,
                 max_open_shards: int = DEFAULT_MAX_OPEN_SHARDS,
                 block_cache: int | str = DEFAULT_BLOCK_CACHE, verify_blocks: bool = True) -> Dataset:
    """Open a dataset. Local path or ``file://`` -> ``LocalSource``; any other URL ->
    ``streamshard.remote.CachedSource`` (needs ``cache_dir`` or the cache's default).
    ``source`` overrides both. Raises ``FormatError`` for a foreign or newer index.
    ``verify_blocks=False`` skips the first-touch xxh64 check of uncompressed blocks (only for
    data checked offline with ``streamshard verify``)."""
    if source is None:
        local = local_path(path_or_url)
        if local is not None:
            source = LocalSource(local)
        else:
            from streamshard.remote import CachedSource  # lazy: local reading needs no remote code

            source = CachedSource(os.fspath(path_or_url), cache_dir=cache_dir,
                                  cache_limit=cache_limit, storage_options=storage_options)
    return Dataset(source, max_open_shards=max_open_shards, block_cache=block_cache,
                   verify_blocks=verify_blocks)


def _block_bytes(entry: tuple[bytes, int]) -> int:
    """Size of a decompressed block in the block LRU (``(raw bytes, payload start)``)."""
    return len(entry[0])
