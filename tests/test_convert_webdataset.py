"""WebDataset tars written by webdataset.TarWriter: every key and field survives, compared with
webdataset's own reader; differing field sets, bad members and corrupt tars are handled."""

from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
import pytest

from streamshard.errors import InputError
from tests.convert_helpers import RecordingContext, convert_direct, read_all

wds = pytest.importorskip("webdataset")


def write_shard(path: str, keys: range, *, with_seg: bool = True) -> list[dict]:
    rng = np.random.default_rng(len(keys) + keys.start)
    samples = []
    with wds.TarWriter(path) as sink:
        for i in keys:
            sample = {
                "__key__": f"dir/s{i:05d}",
                "txt": f"caption {i} \u00fc\U0001f600" if i % 5 else "",
                "json": {"i": i, "tags": ["x"] * (i % 3)},
                "cls": i % 10,
                "jpg": bytes(rng.integers(0, 256, 40 + i, dtype=np.uint8)),
            }
            if with_seg:
                sample["seg.png"] = bytes(rng.integers(0, 256, 7, dtype=np.uint8))
            sink.write(sample)
            samples.append(sample)
    return samples


def their_samples(paths: list[str]) -> list[dict]:
    """webdataset's own iteration (raw bytes per field), in order."""
    out = []
    for path in paths:
        for s in wds.WebDataset(path, shardshuffle=False, empty_check=False):
            out.append({k: v for k, v in s.items() if k not in ("__url__", "__local_path__")})
    return out


def test_every_field_survives_and_matches_webdataset(tmp_path):
    paths = [str(tmp_path / f"shard-{k:03d}.tar") for k in range(3)]
    for k, p in enumerate(paths):
        write_shard(p, range(k * 30, k * 30 + 30))
    ds = convert_direct("webdataset", paths, str(tmp_path / "out"))
    assert ds.schema.to_json() == {"__key__": "str", "cls": "int64", "jpg": "image",
                                   "json": "json", "seg.png": "image", "txt": "str",
                                   "__missing__": "json"}
    theirs = their_samples(paths)
    assert len(ds) == len(theirs) == 90
    for i, ref in enumerate(theirs):
        got = ds[i]
        assert got["__key__"] == ref["__key__"]
        assert got["txt"] == ref["txt"].decode("utf-8")
        assert got["json"] == json.loads(ref["json"])
        assert got["cls"] == int(ref["cls"])
        assert got["jpg"] == ref["jpg"] and got["seg.png"] == ref["seg.png"]
        assert got["__missing__"] == []


def test_raw_mode_keeps_bytes_and_gzip_tars_read(tmp_path):
    path = str(tmp_path / "a.tar.gz")
    write_shard(path, range(10))
    cols, got, _ = read_all("webdataset", [path], {"wds_raw": True})
    assert set(cols.values()) == {"str", "bytes", "json"}  # __key__, fields, __missing__
    theirs = their_samples([path])
    assert [{k: v for k, v in g.items() if k != "__missing__"} for g in got] == theirs


def test_differing_field_sets_need_declared_fields(tmp_path):
    a, b = str(tmp_path / "a.tar"), str(tmp_path / "b.tar")
    write_shard(a, range(4))
    write_shard(b, range(4, 8), with_seg=False)
    with pytest.raises(InputError, match=r"b\.tar: fields .* --wds-fields cls,jpg,json,seg.png"):
        read_all("webdataset", [a, b])
    fields = "cls,jpg,json,seg.png,txt"
    _, got, _ = read_all("webdataset", [a, b], {"wds_fields": fields})
    assert [g["__missing__"] for g in got] == [[]] * 4 + [["seg.png"]] * 4
    assert all(g["seg.png"] == b"" for g in got[4:])


def _tar(path: str, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


# (members, expected error) - each is a bad record; --skip-errors keeps the good samples
BAD_CASES = [
    ([("a.txt", b"ok"), ("README", b"no extension"), ("b.txt", b"ok")], "has no extension"),
    ([("a.txt", b"ok"), ("x.txt", b"1"), ("x.txt", b"2"), ("b.txt", b"ok")], "field 'txt' twice"),
    ([("a.cls", b"1"), ("x.cls", b"one"), ("b.cls", b"2")], "cannot decode as int64"),
    ([("a.txt", b"ok"), ("x.txt", b"\xff\xfe"), ("b.txt", b"ok")], "cannot decode as str"),
]


@pytest.mark.parametrize("members,message", BAD_CASES)
def test_bad_members_are_bad_records(tmp_path, members, message):
    path = str(tmp_path / "bad.tar")
    _tar(path, members)
    with pytest.raises(InputError, match=message):
        read_all("webdataset", [path])
    ctx = RecordingContext(skip=True)
    _, got, _ = read_all("webdataset", [path], ctx=ctx)
    assert [g["__key__"] for g in got] == ["a", "b"]
    assert ctx.skipped == 1 and "bad.tar" in ctx.examples[0]


def test_truncated_tar_is_named(tmp_path):
    path = str(tmp_path / "cut.tar")
    write_shard(path, range(20))
    os.truncate(path, os.path.getsize(path) // 2 + 100)
    with pytest.raises(InputError, match=r"cut\.tar: corrupt or truncated"):
        read_all("webdataset", [path])
