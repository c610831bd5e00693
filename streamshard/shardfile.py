"""The shard file byte layout (docs/FORMAT.md is the spec; this module is its only implementation).

    header   32 B   magic b"SSHARD\\r\\n" | u16 version=1 | u16 flags (bit0 = zstd) | 20 zero bytes
    blocks          each block stored (zstd frame, or raw when uncompressed)
    table    40 B/block  u64 offset | u64 stored size | u64 raw size | u64 first sample | u64 xxh64
    trailer  40 B   u64 table offset | u32 num_blocks | u32 zero | u64 num_samples |
                    u64 xxh64(table) | end magic b"SSHEND\\r\\n"

A raw block is ``u64 n | u64 offsets[n+1] (relative to payload start) | payload``. All little-endian.
Reading a shard's metadata costs three reads (header, trailer, table): one range request each
on remote storage.
"""

from __future__ import annotations

import functools
import os
import struct
from bisect import bisect_right as _bisect_right
import threading
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import xxhash
import zstandard

from streamshard import blockcheck
from streamshard.errors import CorruptionError, FormatError
from streamshard.shardcheck import (
    check_against_index, check_frame, open_regular, report_fatal_signals,
)

MAGIC = b"SSHARD\r\n"
END_MAGIC = b"SSHEND\r\n"
VERSION = 1
SUPPORTED_VERSIONS = (1,)
FLAG_ZSTD = 0x1
KNOWN_FLAGS = FLAG_ZSTD
HEADER = struct.Struct("<8sHH20s")
TABLE_ENTRY = struct.Struct("<QQQQQ")
TRAILER = struct.Struct("<QIIQQ8s")
TABLE_DTYPE = np.dtype([("offset", "<u8"), ("stored", "<u8"), ("raw", "<u8"),
                        ("first", "<u8"), ("xxh64", "<u8")])
assert HEADER.size == 32 and TABLE_ENTRY.size == 40 and TRAILER.size == 40
_U64 = struct.Struct("<Q")
# Largest raw (decompressed) block a reader accepts, whatever table, frame header or index claim:
# a block is one allocation, so a hostile 100 GB claim must fail before it (docs/FORMAT.md).
# The writer refuses to produce a larger block (a sample that large is a block of one).
MAX_BLOCK_BYTES = 1 << 31
_U64x2 = struct.Struct("<QQ")


def pack_header(compressed: bool) -> bytes:
    return HEADER.pack(MAGIC, VERSION, FLAG_ZSTD if compressed else 0, bytes(20))


def parse_header(data: bytes, name: str) -> bool:
    """Validate a 32-byte header; return whether the shard is zstd-compressed.
    ``FormatError`` on a foreign file, a newer version or unknown flags (all name the file)."""
    if len(data) < HEADER.size:
        raise CorruptionError(f"{name}: file is {len(data)} bytes, shorter than the 32-byte header")
    magic, version, flags, reserved = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise FormatError(f"{name}: not a streamshard shard (magic {magic!r}, expected {MAGIC!r})")
    if version not in SUPPORTED_VERSIONS:
        raise FormatError(f"{name}: shard format version {version} is not supported by this "
                          f"reader (supports {', '.join(map(str, SUPPORTED_VERSIONS))}); "
                          f"upgrade streamshard")
    if flags & ~KNOWN_FLAGS:
        raise FormatError(f"{name}: unknown shard flags 0x{flags:04x} (this reader knows "
                          f"0x{KNOWN_FLAGS:04x}); upgrade streamshard")
    if reserved != bytes(20):
        raise CorruptionError(f"{name}: reserved header bytes are not zero")
    return bool(flags & FLAG_ZSTD)


@dataclass(frozen=True)
class Trailer:
    table_offset: int
    num_blocks: int
    num_samples: int
    table_xxh64: int


def parse_trailer(data: bytes, file_size: int, name: str) -> Trailer:
    """Validate the 40-byte trailer of a ``file_size``-byte shard (``CorruptionError`` naming it)."""
    if file_size < HEADER.size + TRAILER.size or len(data) != TRAILER.size:
        raise CorruptionError(f"{name}: file is {file_size} bytes, too short for header and "
                              f"trailer (truncated?)")
    table_offset, num_blocks, reserved, num_samples, table_hash, end = TRAILER.unpack(data)
    if end != END_MAGIC:
        raise CorruptionError(f"{name}: end magic is {end!r}, expected {END_MAGIC!r} "
                              f"(truncated or overwritten shard)")
    if reserved != 0:
        raise CorruptionError(f"{name}: reserved trailer field is {reserved}, expected 0")
    if table_offset + num_blocks * TABLE_ENTRY.size + TRAILER.size != file_size \
            or table_offset < HEADER.size:
        raise CorruptionError(f"{name}: table at {table_offset} with {num_blocks} blocks does "
                              f"not fit a file of {file_size} bytes")
    return Trailer(table_offset, num_blocks, num_samples, table_hash)


def parse_table(data: bytes, trailer: Trailer, name: str) -> np.ndarray:
    """Check the table against its xxh64 and the trailer; return it as a ``TABLE_DTYPE`` array."""
    if xxhash.xxh64_intdigest(data) != trailer.table_xxh64:
        raise CorruptionError(f"{name}: block table checksum mismatch")
    table = np.frombuffer(data, TABLE_DTYPE, trailer.num_blocks).copy()
    end = table["offset"] + table["stored"]
    if trailer.num_blocks and (
            int(table["offset"][0]) != HEADER.size
            or np.any(table["offset"][1:] != end[:-1])
            or int(end[-1]) != trailer.table_offset
            or int(table["first"][0]) != 0
            or np.any(table["first"][1:] <= table["first"][:-1])
            or int(table["first"][-1]) >= trailer.num_samples):
        raise CorruptionError(f"{name}: block table is inconsistent (offsets or sample counts)")
    if trailer.num_blocks == 0 and (trailer.num_samples or trailer.table_offset != HEADER.size):
        raise CorruptionError(f"{name}: no blocks but {trailer.num_samples} samples")
    if trailer.num_blocks and int(table["raw"].max()) > MAX_BLOCK_BYTES:
        b = int(np.argmax(table["raw"]))
        raise CorruptionError(f"{name} block {b}: raw size {int(table['raw'][b])} exceeds the "
                              f"{MAX_BLOCK_BYTES}-byte block limit")
    return table


class ShardFileWriter:
    """Appends finished blocks to one shard file and closes it with the table and trailer.

    ``f`` is a binary file opened for writing; the writer computes the whole-file xxh64 while
    writing so nobody reads the file back. Not thread-safe. Deterministic: same blocks, same bytes.
    """

    def __init__(self, f: Any, *, compressed: bool):
        self._f = f
        self._hash = xxhash.xxh64()
        self._entries: list[bytes] = []
        self._pos = 0
        self.num_samples = 0
        self.raw_bytes = 0
        self._put(pack_header(compressed))

    def _put(self, data: bytes) -> None:
        self._f.write(data)
        self._hash.update(data)
        self._pos += len(data)

    @property
    def size(self) -> int:
        """Bytes the file would have if closed now (header + blocks + table + trailer)."""
        return self._pos + TABLE_ENTRY.size * len(self._entries) + TRAILER.size

    @property
    def num_blocks(self) -> int:
        return len(self._entries)

    def add_block(self, stored: bytes, raw_size: int, num_samples: int) -> None:
        self._entries.append(TABLE_ENTRY.pack(self._pos, len(stored), raw_size, self.num_samples,
                                              xxhash.xxh64_intdigest(stored)))
        self._put(stored)
        self.num_samples += num_samples
        self.raw_bytes += raw_size

    def finish(self) -> tuple[int, str]:
        """Write table and trailer; return ``(file size, xxh64 hex of the whole file)``.
        ``table_xxh64`` (16 hex digits) is then the shard's identity recorded in the index."""
        table = b"".join(self._entries)
        table_offset = self._pos
        self._put(table)
        table_hash = xxhash.xxh64_intdigest(table)
        self.table_xxh64 = f"{table_hash:016x}"
        self._put(TRAILER.pack(table_offset, len(self._entries), 0, self.num_samples,
                               table_hash, END_MAGIC))
        return self._pos, self._hash.hexdigest()


def pack_raw_block(samples: list[bytes]) -> bytes:
    """``u64 n | u64 offsets[n+1] | payload`` for encoded samples."""
    offsets = [0]
    total = 0
    for s in samples:
        total += len(s)
        offsets.append(total)
    return struct.pack(f"<{len(offsets) + 1}Q", len(samples), *offsets) + b"".join(samples)


def block_header(buf: Any, off: int, raw_size: int, expected: int, where: str) -> int:
    """Check the ``u64 n`` header of the raw block at ``buf[off:off+raw_size]`` against the
    ``expected`` sample count and the block size; return the payload start (``8 + 8*(n+1)``)."""
    n = _U64.unpack_from(buf, off)[0] if raw_size >= 8 else -1
    head = 8 + 8 * (n + 1)
    if n != expected or head > raw_size:
        raise CorruptionError(f"{where}: block header says {n} samples, table says {expected}")
    return head


def block_offsets(buf: Any, off: int, raw_size: int, expected: int, where: str) -> np.ndarray:
    """Check the header of the raw block at ``buf[off:off+raw_size]`` holding ``expected``
    samples; return its ``n+1`` payload-relative sample offsets (uint64, a view of ``buf``)."""
    head = block_header(buf, off, raw_size, expected, where)
    rel = np.frombuffer(buf, "<u8", expected + 1, off + 8)
    if rel[0] != 0 or np.any(rel[1:] < rel[:-1]) or head + int(rel[-1]) != raw_size:
        raise CorruptionError(f"{where}: sample offsets are inconsistent")
    return rel


@functools.lru_cache(maxsize=64)
def _row_offsets(row: int, n: int) -> bytes:
    """The raw-block offsets of ``n`` samples of ``row`` bytes each: ``0, row, ..., n*row``."""
    return (np.arange(n + 1, dtype="<u8") * row).tobytes()


_tls = threading.local()


def _decompressor() -> zstandard.ZstdDecompressor:
    # zstandard objects are not thread-safe; one per thread, reused (creating one costs ~10 us).
    d = getattr(_tls, "dctx", None)
    if d is None:
        d = _tls.dctx = zstandard.ZstdDecompressor()
    return d


class ShardFileReader:
    """Random access to the samples of one local, complete shard file.

    ``read(k) -> dict`` decodes sample ``k`` of the shard. Compressed shards: every fetch of a
    block checks its stored bytes (a view of the shard's mmap) against the xxh64, checks the
    frame and decompresses it; the last decoded block is kept (in-order reads decode each block
    once). Uncompressed shards are mmapped; each block's xxh64 is checked the first time this
    process touches it (``verify_blocks=False`` skips that, for data verified
    offline). ``expected`` (the index's ``ShardInfo``) is checked at open: file size, sample
    count, raw bytes and identity. Thread-safe for reads. ``name`` is in every error message.
    """

    def __init__(self, path: str, *, decode: Callable[[Any, int, int], dict], name: str,
                 stats: Any = None, expected_samples: int | None = None,
                 block_cache: Any = None, expected: Any = None, verify_blocks: bool = True):
        self.name = name
        self._shared = block_cache  # an LRU of blocks shared with the dataset's other shards, or None
        self._decode = decode
        self._stats = stats if stats is not None else ReadStats()
        self._expected = expected
        self._verify_blocks = verify_blocks
        self._file = open_regular(path, name)
        self._mm = None
        self._zmm = self._zview = None  # the map of a compressed shard and its view
        self._checked: bytearray | None = None  # per-block first-touch flags (uncompressed)
        self._block = (-1, b"", 0)  # (block number, raw bytes, payload start)
        try:
            self._open(expected_samples)
        except BaseException:
            self.close()
            raise

    def _pread(self, size: int, offset: int) -> bytes:
        return os.pread(self._fd, size, offset)

    def _open(self, expected_samples: int | None) -> None:
        self._fd = self._file.fileno()
        self._stat = os.fstat(self._fd)
        size = self._stat.st_size
        info = self._expected
        if info is not None and size != info.bytes:
            raise CorruptionError(f"{self.name}: file is {size} bytes, the index says "
                                  f"{info.bytes} ({'truncated' if size < info.bytes else 'extended'}"
                                  f" or replaced shard)")
        self.compressed = parse_header(self._pread(HEADER.size, 0), self.name)
        if size < HEADER.size + TRAILER.size:
            raise CorruptionError(f"{self.name}: file is {size} bytes, too short for header and "
                                  f"trailer (truncated?)")
        trailer = parse_trailer(self._pread(TRAILER.size, size - TRAILER.size), size, self.name)
        table = parse_table(self._pread(trailer.num_blocks * TABLE_ENTRY.size,
                                        trailer.table_offset), trailer, self.name)
        self.num_samples = trailer.num_samples
        self.num_blocks = trailer.num_blocks
        if info is not None:
            check_against_index(table, trailer, info, self.name)
        if expected_samples is not None and expected_samples != self.num_samples:
            raise CorruptionError(f"{self.name}: shard holds {self.num_samples} samples, the "
                                  f"index says {expected_samples}")
        self._table = table  # kept for batch gathers (the ``table`` property)
        # Python lists: indexing a list is ~4x faster than indexing a numpy array on the hot path.
        self._first = table["first"].tolist()
        if self.compressed:
            self._offsets = table["offset"].tolist()
            self._stored = table["stored"].tolist()
            self._raw = table["raw"].tolist()
            self._hashes = table["xxh64"].tolist()
            # Per block: the sample size every sample of it was found to have (0: not checked
            # yet), so a batch gather of fixed-size rows checks each block once (block_rows).
            self._row_sizes = [0] * self.num_blocks
            self._map_compressed()
            self.read = self._read_compressed
        else:
            self._map_uncompressed(table)
            self.read = self._read_mmap

    def _map_compressed(self) -> None:
        """Map a compressed shard: a block's stored bytes are then checked and decompressed
        straight from the page cache. A ``pread`` copied them first: fetching every block of
        200 MB of 100-200 KB incompressible samples (zstd stores them raw) took 87 ms that way
        against 45 ms from a map already touched (about even on a fresh map, whose first touch
        of each page faults); token blocks measured the same either way."""
        import mmap

        report_fatal_signals()  # truncation races the fstat check in _stored_block: SIGBUS
        self._zmm = mmap.mmap(self._fd, 0, access=mmap.ACCESS_READ)
        self._zview = memoryview(self._zmm)

    def _map_uncompressed(self, table: np.ndarray) -> None:
        import mmap

        report_fatal_signals()  # a shard truncated after this point can only end in SIGBUS
        self._mm = mmap.mmap(self._fd, 0, access=mmap.ACCESS_READ)
        bad = np.flatnonzero((table["stored"] != table["raw"]) | (table["stored"] < 16))
        if bad.size:
            b = int(bad[0])
            raise CorruptionError(f"{self.name} block {b}: uncompressed block with stored size "
                                  f"{int(table['stored'][b])} and raw size {int(table['raw'][b])}")
        # Each block's absolute sample offsets are parsed (and checked) on its first read, so
        # opening a 64 MB shard of ~1,000 blocks costs a table read, not ~10 ms of header parsing.
        self._block_offsets: list[list[int] | None] = [None] * self.num_blocks
        self._offsets = table["offset"].tolist()
        self._raw = table["raw"].tolist()
        self._hashes = table["xxh64"].tolist()
        self._checked = (blockcheck.record_for(self._stat, self.num_blocks)
                         if self._verify_blocks else None)

    def check_blocks(self, blocks: Any) -> None:
        """First-touch check of ``blocks`` (an int or an int array) of an uncompressed shard: what
        a batch gather that slices the mmap itself must call for the blocks it reads. A no-op for
        compressed shards (checked on every read), with ``verify_blocks=False``, and for blocks
        this process checked before (one vectorized lookup)."""
        checked = self._checked
        if checked is None:
            return
        idx = np.asarray(blocks, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= self.num_blocks):
            raise IndexError(f"{self.name}: block out of range (shard has {self.num_blocks})")
        if np.frombuffer(checked, np.uint8)[idx].all():
            return
        for b in np.unique(idx).tolist():
            if not checked[b]:
                self._check_block(b)

    def _check_block(self, b: int) -> None:
        """First touch of mmapped block ``b`` in this process: check its xxh64 once."""
        off, size = self._offsets[b], self._raw[b]
        with memoryview(self._mm) as view:  # released at once: close() must not see an export
            digest = xxhash.xxh64_intdigest(view[off:off + size])
        if digest != self._hashes[b]:
            raise CorruptionError(f"{self.name} block {b}: xxh64 checksum mismatch (corrupted "
                                  f"data in an uncompressed shard)")
        self._checked[b] = 1  # type: ignore[index]
        blockcheck.count(size)

    def _mmap_offsets(self, b: int) -> list[int]:
        """Absolute file offsets of block ``b``'s samples and of its end (``n + 1`` ints)."""
        offs = self._block_offsets[b]
        if offs is None:
            checked = self._checked
            if checked is not None and not checked[b]:
                self._check_block(b)
            off = self._offsets[b]
            rel = block_offsets(self._mm, off, self._raw[b], self._block_samples(b),
                                f"{self.name} block {b}")
            offs = (rel + np.uint64(off + 8 * (len(rel) + 1))).tolist()
            self._block_offsets[b] = offs
        return offs

    def _mmap_span(self, k: int) -> tuple[Any, int, int]:
        first = self._first
        b = _bisect_right(first, k) - 1
        offs = self._block_offsets[b] or self._mmap_offsets(b)
        j = k - first[b]
        start = offs[j]
        length = offs[j + 1] - start
        self._stats.bytes_read += length
        return self._mm, start, length

    def _read_mmap(self, k: int) -> dict:
        # _mmap_span inlined (one call less on the ds[i] path); the first touch of a block
        # still goes through _mmap_offsets, which checks its xxh64.
        first = self._first
        b = _bisect_right(first, k) - 1
        offs = self._block_offsets[b] or self._mmap_offsets(b)
        j = k - first[b]
        start = offs[j]
        length = offs[j + 1] - start
        self._stats.bytes_read += length
        try:
            return self._decode(self._mm, start, length)
        except CorruptionError as exc:
            raise CorruptionError(f"{self.name} sample {k}: {exc}") from None

    @property
    def table(self) -> np.ndarray:
        """The block table (``TABLE_DTYPE`` array, checked at open; do not modify)."""
        return self._table

    @property
    def mapped(self) -> Any:
        """The read-only mmap of an uncompressed shard (``None`` when compressed or closed)."""
        return self._mm

    def sample_offsets(self, b: int) -> list[int]:
        """Absolute file offsets of mmapped block ``b``'s samples and its end (``n + 1`` ints),
        with the block checked as on any first touch (what a batch gather calls per block)."""
        return self._block_offsets[b] or self._mmap_offsets(b)

    def span(self, k: int) -> tuple[Any, int, int]:
        """``(buffer, start, length)`` of sample ``k``'s encoded bytes (checked like ``read``)."""
        if self._mm is not None:
            return self._mmap_span(k)
        raw, start, length, _ = self._compressed_span(k)
        return raw, start, length

    def block(self, b: int) -> tuple[bytes, int]:
        """Return ``(raw block bytes, payload start)`` of block ``b``, checked and decompressed."""
        cached = self._block
        st = self._stats
        if cached[0] == b:
            st.block_cache_hits += 1
            return cached[1], cached[2]
        shared = self._shared
        if shared is not None:
            hit = shared.get((self.name, b))
            if hit is not None:
                st.block_cache_hits += 1
                self._block = (b, hit[0], hit[1])
                return hit
        raw, head = self.fetch_block(b)
        self._block = (b, raw, head)
        if shared is not None:
            shared.put((self.name, b), (raw, head))
        return raw, head

    def fetch_block(self, b: int) -> tuple[bytes, int]:
        """``(raw bytes, payload start)`` of compressed block ``b`` read, checked (xxh64 of the
        stored bytes, frame, size, header) and decompressed, bypassing every cache (counted in
        ``blocks_read``)."""
        stored = self._checked_stored(b)
        try:
            raw = _decompressor().decompress(stored, max_output_size=self._raw[b])
        except zstandard.ZstdError as exc:
            raise CorruptionError(f"{self.name} block {b}: zstd cannot decompress: {exc}") from None
        return raw, self._check_raw(b, raw, len(raw))

    def fetch_block_into(self, b: int, dest: Any) -> int:
        """:meth:`fetch_block` decompressing straight into ``dest`` (a writable buffer of at
        least the block's raw size); returns the payload start."""
        stored = self._checked_stored(b)
        size = self._raw[b]
        view = memoryview(dest)[:size]
        got = 0
        try:
            reader = _decompressor().stream_reader(stored, read_across_frames=False)
            while got < size:
                n = reader.readinto(view[got:])
                if not n:
                    break
                got += n
        except zstandard.ZstdError as exc:
            raise CorruptionError(f"{self.name} block {b}: zstd cannot decompress: {exc}") from None
        return self._check_raw(b, view, got)

    def _checked_stored(self, b: int) -> Any:
        """Compressed block ``b``'s stored bytes, counted and checked (xxh64, frame header)."""
        st = self._stats
        stored = self._stored_block(b)
        st.blocks_read += 1
        st.stored_bytes_read += len(stored)
        if xxhash.xxh64_intdigest(stored) != self._hashes[b]:
            raise CorruptionError(f"{self.name} block {b}: xxh64 checksum mismatch "
                                  f"(corrupted data)")
        check_frame(stored, self._raw[b], f"{self.name} block {b}")
        return stored

    def _block_samples(self, b: int) -> int:
        """Samples in block ``b`` (from the block table's first samples)."""
        end = self._first[b + 1] if b + 1 < self.num_blocks else self.num_samples
        return end - self._first[b]

    def _check_raw(self, b: int, raw: Any, got: int) -> int:
        """Check decompressed block ``b`` (``got`` bytes at ``raw``): its size and header;
        return its payload start."""
        if got != self._raw[b]:
            raise CorruptionError(f"{self.name} block {b}: decompressed to {got} bytes, "
                                  f"table says {self._raw[b]}")
        head = block_header(raw, 0, got, self._block_samples(b), f"{self.name} block {b}")
        self._stats.bytes_read += got
        return head

    def _stored_block(self, b: int) -> Any:
        """The stored bytes of compressed block ``b``: a view of the shard's map (no copy; the
        table was checked to fit the file at open). A shard truncated since is refused here
        (one ``fstat``) rather than ending the process with SIGBUS on the map."""
        view = self._zview
        off, size = self._offsets[b], self._stored[b]
        if view is None:
            raise CorruptionError(f"{self.name} block {b}: read after the reader was closed")
        have = os.fstat(self._fd).st_size
        if have < off + size:
            raise CorruptionError(f"{self.name} block {b}: read {max(0, have - off)} of {size} "
                                  f"bytes (truncated shard)")
        return view[off:off + size]

    def block_rows(self, b: int, row: int, uses: int = 1) -> tuple[bytes, int]:
        """``(raw block bytes, payload start)`` of compressed block ``b``, all of whose samples
        are ``row`` bytes (checked once per block per reader: sample ``j`` is then
        ``raw[start + j * row:][:row]``), for ``uses`` sample reads: the stats count one block
        fetch (a decompression or a hit) and ``uses - 1`` hits, as ``uses`` ``span`` calls
        in a row would. ``CorruptionError`` names the first sample of another size."""
        raw, head = self.block(b)
        if uses > 1:
            self._stats.block_cache_hits += uses - 1
        if self._row_sizes[b] != row:
            self.check_rows(b, raw, head, row)
        return raw, head

    def check_rows(self, b: int, raw: Any, head: int, row: int) -> None:
        """Check that every sample of block ``b`` (``raw``, payload at ``head``, as
        :meth:`fetch_block` returns it) is ``row`` bytes, back to back from ``head``
        (``CorruptionError`` naming the first that is not)."""
        n = self._block_samples(b)
        # One comparison of the stored offsets with 0, row, 2*row, ... (block_header checked
        # that they fit); the search for the first wrong one only on a mismatch.
        if raw[8:16 + 8 * n] == _row_offsets(row, n) and head + n * row <= len(raw):
            self._row_sizes[b] = row
            return
        rel = np.frombuffer(raw, "<u8", n + 1, 8)
        bad = np.flatnonzero(np.diff(rel) != row)
        if rel[0] != 0 or bad.size or head + n * row > len(raw):
            j = int(bad[0]) if bad.size else 0
            raise CorruptionError(f"{self.name} block {b} sample {self._first[b] + j}: "
                                  f"{int(rel[j + 1]) - int(rel[j])} bytes at offset "
                                  f"{int(rel[j])}, the schema needs {row}")
        self._row_sizes[b] = row

    def note_hits(self, n: int) -> None:
        """Count ``n`` sample reads served from decompressed blocks held elsewhere (a batch
        gather's own block store, :mod:`streamshard.blockarena`)."""
        self._stats.block_cache_hits += n

    @property
    def block_starts(self) -> np.ndarray:
        """First sample of each block (int64; ``block_starts[b] <= k`` for block ``b``'s
        samples ``k``)."""
        starts = self.__dict__.get("_block_starts")
        if starts is None:
            starts = self._block_starts = self._table["first"].astype(np.int64)
        return starts

    def _compressed_span(self, k: int) -> tuple[bytes, int, int, int]:
        """``(raw block, start, length, block number)`` of sample ``k`` in a compressed shard."""
        first = self._first
        b = _bisect_right(first, k) - 1
        cached = self._block  # read once: another thread may replace it between two reads
        if cached[0] == b:  # inlined cache hit: the in-order iteration case
            raw, head = cached[1], cached[2]
            self._stats.block_cache_hits += 1
        else:
            raw, head = self.block(b)
        start, end = _U64x2.unpack_from(raw, 8 + 8 * (k - first[b]))
        if end < start or head + end > len(raw):
            raise CorruptionError(f"{self.name} block {b} sample {k}: offsets out of range")
        return raw, head + start, end - start, b

    def _read_compressed(self, k: int) -> dict:
        raw, start, length, b = self._compressed_span(k)
        try:
            return self._decode(raw, start, length)
        except CorruptionError as exc:
            raise CorruptionError(f"{self.name} block {b} sample {k}: {exc}") from None

    def close(self) -> None:
        """Release the mmap and file. Safe to call twice."""
        self._block = (-1, b"", 0)
        if self._zmm is not None:
            view, self._zview = self._zview, None
            try:
                view.release()
                self._zmm.close()
            except BufferError:
                pass  # a block being read in another thread holds a view; GC closes the map
            self._zmm = None
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:
                pass  # a numpy view of the map is still alive; GC closes the map with it
            self._mm = None
        self._file.close()


class ReadStats:
    """Counters a reader keeps about its own work (see ``Dataset.stats``)."""

    __slots__ = ("blocks_read", "block_cache_hits", "bytes_read", "stored_bytes_read")

    def __init__(self) -> None:
        self.blocks_read = self.block_cache_hits = self.bytes_read = self.stored_bytes_read = 0

    def as_dict(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in self.__slots__}

