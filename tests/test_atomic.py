"""The one atomic write (streamshard/atomic.py): bytes and JSON, local and on an fsspec store."""

from __future__ import annotations

import json
import math
import os

import fsspec
import pytest

from streamshard.atomic import TMP_MARK, atomic_write, atomic_write_json, put_atomic


def test_json_is_strict_sorted_and_leaves_no_temp(tmp_path):
    path = tmp_path / "sub" / "doc.json"          # the parent folder is created
    atomic_write_json(path, {"b": 1, "a": [1.5, None]})
    assert json.loads(path.read_text()) == {"a": [1.5, None], "b": 1}
    assert path.read_text().index('"a"') < path.read_text().index('"b"')
    with pytest.raises(ValueError):
        atomic_write_json(path, {"loss": math.nan})  # NaN is not JSON
    assert json.loads(path.read_text())["b"] == 1  # the failed write changed nothing
    assert [p for p in os.listdir(path.parent) if TMP_MARK in p] == []


def test_failed_write_keeps_the_old_content_and_removes_the_temp(tmp_path):
    path = tmp_path / "f"
    atomic_write(path, b"old")

    with pytest.raises(TypeError):  # the temp file exists when the write fails
        atomic_write(path, "text, not bytes")
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["f"]


def test_remote_filesystem_gets_one_put():
    fs = fsspec.filesystem("memory")
    put_atomic("/bucket/ds/index.json", b"{}", fs=fs)
    atomic_write_json("/bucket/ds/marker.json", {"v": 1}, fs=fs)
    assert fs.cat_file("/bucket/ds/index.json") == b"{}"
    assert json.loads(fs.cat_file("/bucket/ds/marker.json")) == {"v": 1}


def test_local_fsspec_filesystem_is_a_rename(tmp_path):
    fs = fsspec.filesystem("file")
    put_atomic(str(tmp_path / "x"), b"data", fs=fs)
    assert (tmp_path / "x").read_bytes() == b"data"
