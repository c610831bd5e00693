"""``verify_dataset``: check every byte of a dataset against its checksums and declared sizes.

It reports instead of raising: each problem is one line naming the shard file and, where it
applies, the block and sample. It raises ``FormatError`` only when the index itself cannot be
understood (not JSON, wrong magic, newer version, missing fields).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import xxhash
import zstandard

from streamshard.location import resolve
from streamshard.errors import CorruptionError, FormatError, StreamshardError
from streamshard.index import INDEX_FILE, DatasetIndex, ShardInfo
from streamshard.shardcheck import check_frame
from streamshard.shardfile import (
    HEADER, TABLE_ENTRY, TRAILER, block_offsets, parse_header, parse_table, parse_trailer,
)


@dataclass
class VerifyReport:
    """Outcome of ``verify_dataset``. ``ok`` is true iff ``problems`` is empty."""

    ok: bool = True
    shards_checked: int = 0
    blocks_checked: int = 0
    samples_checked: int = 0
    problems: list[str] = field(default_factory=list)

    def add(self, problem: str) -> None:
        self.problems.append(problem)
        self.ok = False


def verify_dataset(path: str, *, progress: Callable[[ShardInfo], None] | None = None,
                   storage_options: dict | None = None,
                   decode_samples: bool = True) -> VerifyReport:
    """Check index magic/version/fingerprint; every shard's presence, size and whole-file
    xxh64; header, trailer and table; every block's xxh64, decompression and sample offsets;
    sample counts; and (``decode_samples``) that every sample decodes under the schema.
    ``progress(shard_info)`` is called after each shard. ``path`` may be any fsspec URL."""
    loc = resolve(path, storage_options)
    fs, root = loc.fs, loc.root
    index_path = f"{root}/{INDEX_FILE}"
    try:
        if fs.info(index_path).get("type") != "file":
            raise FormatError(f"{index_path}: not a regular file")
        data = fs.cat_file(index_path)
    except FileNotFoundError:
        raise FormatError(f"{index_path}: no index file. Are you passing a streamshard "
                          f"directory?") from None
    report = VerifyReport()
    try:
        index = DatasetIndex.from_bytes(data, index_path)
    except CorruptionError as exc:
        report.add(str(exc))
        try:  # keep checking shards against what the (damaged) index still says
            index = DatasetIndex.from_bytes(data, index_path, check_fingerprint=False)
        except CorruptionError:
            return report
    decode = index.schema.decode if decode_samples else None
    for info in index.shards:
        _verify_shard(fs, f"{root}/{info.file}", info, report, decode)
        report.shards_checked += 1
        if progress is not None:
            progress(info)
    return report


def _verify_shard(fs: Any, path: str, info: ShardInfo, report: VerifyReport,
                  decode: Callable | None) -> None:
    """Check one shard reading it block by block in file order (header, blocks, table,
    trailer), so memory stays at one stored plus one raw block, never the whole file."""
    name = f"shard {info.index} ({info.file})"
    try:
        st = fs.info(path)
        if st.get("type") != "file":  # a directory, FIFO or device is never opened
            report.add(f"{name}: {path} is not a regular file ({st.get('type')})")
            return
        size = int(st["size"])
        f = fs.open(path, "rb")
    except FileNotFoundError:
        report.add(f"{name}: missing ({path})")
        return
    except OSError as exc:
        report.add(f"{name}: cannot read {path}: {exc}")
        return
    with f:
        try:
            _verify_open_shard(f, size, name, info, report, decode)
        except OSError as exc:
            report.add(f"{name}: cannot read {path}: {exc}")


def _read_at(f: Any, offset: int, size: int) -> bytes:
    f.seek(offset)
    return f.read(size)


def _verify_open_shard(f: Any, size: int, name: str, info: ShardInfo, report: VerifyReport,
                       decode: Callable | None) -> None:
    whole = xxhash.xxh64()
    if size != info.bytes:
        report.add(f"{name}: size is {size} bytes, the index says {info.bytes} "
                   f"({'truncated' if size < info.bytes else 'extended'})")
    try:
        header = _read_at(f, 0, HEADER.size)
        compressed = parse_header(header, name)
        trailer_bytes = _read_at(f, max(size - TRAILER.size, 0), TRAILER.size)
        trailer = parse_trailer(trailer_bytes, size, name)
        table_bytes = _read_at(f, trailer.table_offset, trailer.num_blocks * TABLE_ENTRY.size)
        table = parse_table(table_bytes, trailer, name)
    except StreamshardError as exc:  # FormatError or CorruptionError: the shard is unreadable
        report.add(str(exc))
        _whole_file_hash(f, size, info, name, report)
        return
    if trailer.num_samples != info.samples:
        report.add(f"{name}: holds {trailer.num_samples} samples, the index says {info.samples}")
    if info.table_xxh64 is not None and f"{trailer.table_xxh64:016x}" != info.table_xxh64:
        report.add(f"{name}: shard identity mismatch (block table hash "
                   f"{trailer.table_xxh64:016x}, the index says {info.table_xxh64})")
    raw_total = sum(int(r) for r in table["raw"])
    if raw_total != info.raw_bytes:
        report.add(f"{name}: blocks declare {raw_total} raw bytes, the index says "
                   f"{info.raw_bytes}")
        decode_ok = False  # never decompress what the index does not declare (a zstd bomb)
    else:
        decode_ok = True
    whole.update(header)
    dctx = zstandard.ZstdDecompressor()
    entries = table.tolist()
    f.seek(HEADER.size)
    for b, (off, stored_size, raw_size, first, digest) in enumerate(entries):
        report.blocks_checked += 1
        where = f"{name} block {b}"
        stored = f.read(stored_size)  # blocks are contiguous from offset 32 (parse_table)
        whole.update(stored)
        if len(stored) != stored_size:
            report.add(f"{where}: read {len(stored)} of {stored_size} bytes (truncated)")
            return
        if xxhash.xxh64_intdigest(stored) != digest:
            report.add(f"{where}: xxh64 checksum mismatch (corrupted data)")
            continue
        if not decode_ok:
            continue
        if compressed:
            try:
                check_frame(stored, raw_size, where)
                raw = dctx.decompress(stored, max_output_size=raw_size)
            except CorruptionError as exc:
                report.add(str(exc))
                continue
            except zstandard.ZstdError as exc:
                report.add(f"{where}: zstd cannot decompress: {exc}")
                continue
        else:
            raw = stored
        del stored
        if len(raw) != raw_size:
            report.add(f"{where}: {len(raw)} raw bytes, the table says {raw_size}")
            continue
        nxt = entries[b + 1][3] if b + 1 < len(entries) else trailer.num_samples
        try:
            rel = block_offsets(raw, 0, raw_size, nxt - first, where).tolist()
        except CorruptionError as exc:
            report.add(str(exc))
            continue
        report.samples_checked += len(rel) - 1
        if decode is None:
            continue
        head = 8 * (len(rel) + 1)
        for j in range(len(rel) - 1):
            try:
                decode(raw, head + rel[j], rel[j + 1] - rel[j])
            except (CorruptionError, ValueError) as exc:
                report.add(f"{where} sample {first + j}: does not decode: {exc}")
                break
    whole.update(table_bytes)
    whole.update(trailer_bytes)
    if size == info.bytes and whole.hexdigest() != info.xxh64:
        report.add(f"{name}: whole-file xxh64 mismatch (index {info.xxh64}, file "
                   f"{whole.hexdigest()})")


def _whole_file_hash(f: Any, size: int, info: ShardInfo, name: str, report: VerifyReport) -> None:
    """Hash an unparseable shard in 4 MiB chunks to report a whole-file mismatch too."""
    if size != info.bytes:
        return
    h = xxhash.xxh64()
    f.seek(0)
    while chunk := f.read(4 << 20):
        h.update(chunk)
    if h.hexdigest() != info.xxh64:
        report.add(f"{name}: whole-file xxh64 mismatch (index {info.xxh64}, file {h.hexdigest()})")
