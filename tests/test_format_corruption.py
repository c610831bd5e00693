"""Every kind of damage is detected: the reader raises a clear error naming shard and block,
``verify_dataset`` reports it (and never raises on shard damage)."""

from __future__ import annotations

import json
import os
import shutil
import struct

import numpy as np
import pytest

from streamshard import open_dataset, verify_dataset
from streamshard.errors import CorruptionError, FormatError, StorageError, StreamshardError
from streamshard.shardfile import HEADER, TABLE_ENTRY, TRAILER

from tests.format_helpers import token_samples, write


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """Two small datasets (zstd and uncompressed) of 3 shards x several blocks each."""
    root = tmp_path_factory.mktemp("pristine")
    for comp in ("zstd", None):
        write(root / str(comp), token_samples(60), columns={"tokens": "uint16[]"},
              compression=comp, shard_size="5KB", block_size="1KiB")
    return root


@pytest.fixture(params=["zstd", None], ids=["zstd", "none"])
def ds_dir(request, pristine, tmp_path):
    dest = tmp_path / "ds"
    shutil.copytree(pristine / str(request.param), dest)
    return dest


def read_all(path):
    ds = open_dataset(path)
    return [ds[i] for i in range(len(ds))]


def table(path):
    data = open(path, "rb").read()
    off, nblocks = struct.unpack_from("<QI", data, len(data) - TRAILER.size)
    return [TABLE_ENTRY.unpack_from(data, off + 40 * b) for b in range(nblocks)]


def flip(path, pos):
    data = bytearray(open(path, "rb").read())
    data[pos] ^= 0x40
    open(path, "wb").write(bytes(data))


def test_pristine_verifies(ds_dir):
    report = verify_dataset(str(ds_dir))
    assert report.ok and report.problems == [] and report.shards_checked >= 3
    assert report.blocks_checked >= 9 and report.samples_checked == 60


def test_flipped_byte_in_block(ds_dir):
    shard = ds_dir / "shard-000001.sss"
    off, stored, *_ = table(shard)[2]
    flip(shard, off + stored // 2)
    report = verify_dataset(str(ds_dir))
    assert not report.ok
    assert any("shard 1 (shard-000001.sss) block 2: xxh64 checksum mismatch" in p
               for p in report.problems)
    assert any("whole-file xxh64 mismatch" in p for p in report.problems)
    if json.loads((ds_dir / "index.json").read_bytes())["compression"] == "zstd":
        with pytest.raises(CorruptionError, match=r"shard 1 \(shard-000001.sss\) block 2: xxh64"):
            read_all(ds_dir)


def test_truncated_shard(ds_dir):
    shard = ds_dir / "shard-000002.sss"
    data = shard.read_bytes()
    shard.write_bytes(data[:-7])
    report = verify_dataset(str(ds_dir))
    assert any("shard 2 (shard-000002.sss): size is" in p and "truncated" in p
               for p in report.problems)
    with pytest.raises(CorruptionError, match=r"shard 2 \(shard-000002.sss\).*(truncated|end magic)"):
        read_all(ds_dir)


def test_missing_shard(ds_dir):
    os.remove(ds_dir / "shard-000000.sss")
    report = verify_dataset(str(ds_dir))
    assert report.problems[0].startswith("shard 0 (shard-000000.sss): missing")
    assert report.shards_checked >= 3  # kept going after the missing one
    with pytest.raises(StorageError, match="shard-000000.sss"):
        open_dataset(ds_dir)[0]


def test_edited_index_fingerprint_mismatch(ds_dir):
    path = ds_dir / "index.json"
    edited = path.read_bytes().replace(b'"metadata": {}', b'"metadata": {"a": 1}')
    assert edited != path.read_bytes()
    path.write_bytes(edited)
    with pytest.raises(CorruptionError, match="index.json: fingerprint mismatch"):
        open_dataset(ds_dir)
    report = verify_dataset(str(ds_dir))
    assert not report.ok and "fingerprint mismatch" in report.problems[0]
    assert report.shards_checked >= 3 and len(report.problems) == 1  # shards themselves are fine


def test_edited_sample_count_with_recomputed_fingerprint(ds_dir):
    """A consistent-looking index that lies about a shard: caught when the shard is opened."""
    from streamshard.index import fingerprint_of

    doc = json.loads((ds_dir / "index.json").read_bytes())
    doc["shards"]["samples"][0] += 1
    doc["num_samples"] += 1
    doc["fingerprint"] = fingerprint_of(doc)
    (ds_dir / "index.json").write_text(json.dumps(doc))
    with pytest.raises(CorruptionError, match="shard 0 .* holds \\d+ samples, the index says"):
        open_dataset(ds_dir)[0]
    assert any("the index says" in p for p in verify_dataset(str(ds_dir)).problems)


@pytest.mark.parametrize("content, message", [
    (b"not json at all", "not a streamshard index \\(not JSON"),
    (b'{"magic": "parquet"}', "magic 'parquet'"),
    (b"[1, 2]", "not a streamshard index"),
])
def test_foreign_index_has_hint(tmp_path, content, message):
    (tmp_path / "index.json").write_bytes(content)
    for call in (lambda: open_dataset(tmp_path), lambda: verify_dataset(str(tmp_path))):
        with pytest.raises(FormatError, match=message) as exc:
            call()
        assert "index.json" in str(exc.value) and "Are you passing a streamshard directory?" \
            in str(exc.value)


def test_no_index_has_hint(tmp_path):
    with pytest.raises(StorageError, match="no index file.*Are you passing a streamshard"):
        open_dataset(tmp_path)
    with pytest.raises(FormatError, match="Are you passing a streamshard"):
        verify_dataset(str(tmp_path))


def test_newer_index_version(ds_dir):
    path = ds_dir / "index.json"
    edited = path.read_bytes().replace(b'"version": 1,', b'"version": 2,')
    assert edited != path.read_bytes()
    path.write_bytes(edited)
    with pytest.raises(FormatError, match=r"index.json: index version 2 is not supported by this "
                                          r"reader \(supports 1\)"):
        open_dataset(ds_dir)
    with pytest.raises(FormatError, match="version 2"):
        verify_dataset(str(ds_dir))


@pytest.mark.parametrize("pos, value, error, message", [
    (0, b"PK\x03\x04", FormatError, "not a streamshard shard \\(magic"),          # foreign file
    (8, struct.pack("<H", 7), FormatError, "shard format version 7 is not supported .*supports 1"),
    (10, struct.pack("<H", 0x8001), FormatError, "unknown shard flags 0x8001"),
    (20, b"\x01", CorruptionError, "reserved header bytes"),
])
def test_shard_header_damage(ds_dir, pos, value, error, message):
    shard = ds_dir / "shard-000000.sss"
    data = bytearray(shard.read_bytes())
    data[pos:pos + len(value)] = value
    shard.write_bytes(bytes(data))
    with pytest.raises(error, match=r"shard 0 \(shard-000000.sss\): " + message):
        open_dataset(ds_dir)[0]
    report = verify_dataset(str(ds_dir))
    assert any(p.startswith("shard 0 (shard-000000.sss): " + message.split(" ")[0])
               for p in report.problems), report.problems


def test_block_table_damage(ds_dir):
    shard = ds_dir / "shard-000000.sss"
    size = shard.stat().st_size
    flip(shard, size - TRAILER.size - 3)  # inside the last table entry's xxh64
    with pytest.raises(CorruptionError, match="block table checksum mismatch"):
        open_dataset(ds_dir)[0]
    assert any("block table checksum" in p for p in verify_dataset(str(ds_dir)).problems)


def test_every_single_byte_flip_is_caught(pristine, tmp_path):
    """Table-free sweep: flip each byte of a zstd shard in turn. The reader must raise a
    streamshard error (never return wrong data or crash otherwise) and verify must report."""
    src = pristine / "zstd"
    size = (src / "shard-000000.sss").stat().st_size
    dest = tmp_path / "ds"
    shutil.copytree(src, dest)
    shard = dest / "shard-000000.sss"
    original = shard.read_bytes()
    n0 = json.loads((src / "index.json").read_bytes())["shards"]["samples"][0]
    step = max(1, size // 400)   # ~400 positions keep this under a few seconds
    positions = sorted(set(range(0, size, step)) | set(range(size - 64, size)) | set(range(32)))
    for pos in positions:
        data = bytearray(original)
        data[pos] ^= 0x01
        shard.write_bytes(bytes(data))
        ds = open_dataset(dest)
        with pytest.raises(StreamshardError):
            for i in range(n0):
                ds[i]
        ds.close()
        report = verify_dataset(str(dest))
        assert not report.ok, pos


@pytest.mark.parametrize("compression", ["zstd", "None"])
def test_every_truncation_is_caught(pristine, tmp_path, compression):
    """Cut a shard at every length (sampled): reading raises a streamshard error, verify reports."""
    dest = tmp_path / "ds"
    shutil.copytree(pristine / compression, dest)
    shard = dest / "shard-000000.sss"
    original = shard.read_bytes()
    n0 = json.loads((dest / "index.json").read_bytes())["shards"]["samples"][0]
    lengths = sorted(set(range(0, 80)) | set(range(0, len(original), 97)) |
                     set(range(len(original) - 80, len(original))))
    for length in lengths:
        shard.write_bytes(original[:length])
        with pytest.raises(StreamshardError, match="shard 0 "):
            ds = open_dataset(dest)
            for i in range(n0):
                ds[i]
        report = verify_dataset(str(dest))
        assert any("truncated" in p for p in report.problems), (length, report.problems)


def test_uncompressed_block_header_damage_caught_on_open(pristine, tmp_path):
    dest = tmp_path / "ds"
    shutil.copytree(pristine / "None", dest)
    shard = dest / "shard-000000.sss"
    flip(shard, HEADER.size + 1)  # the u64 sample count of block 0
    # the first-touch xxh64 check sees it first; without it the block header check does
    with pytest.raises(CorruptionError, match=r"shard 0 \(shard-000000.sss\) block 0: xxh64"):
        open_dataset(dest)[0]
    with pytest.raises(CorruptionError, match=r"shard 0 \(shard-000000.sss\) block 0: block header"):
        open_dataset(dest, verify_blocks=False)[0]


def test_verify_progress_and_decode_check(ds_dir):
    seen = []
    report = verify_dataset(str(ds_dir), progress=seen.append)
    assert report.ok and [s.index for s in seen] == list(range(report.shards_checked))
    # np is used by the fixture writer; a sanity check that data is what was written:
    assert np.array_equal(open_dataset(ds_dir)[5]["tokens"], token_samples(60)[5]["tokens"])
