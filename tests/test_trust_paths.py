"""Hostile shard names, secrets in URLs and a shared cache with foreign files (issue 10 items 2,
9, 10): names stay inside the dataset everywhere, FIFOs/devices are never read, user info in
URLs never shows, one bad cache metadata file breaks nobody."""

from __future__ import annotations

import json
import logging
import os
import stat
import threading

import pytest
import xxhash

from streamshard import open_dataset, verify_dataset
from streamshard.errors import FormatError, StorageError, StreamshardError
from streamshard.index import fingerprint_of
from streamshard.remote import CachedSource, RetryPolicy, ShardCache
from streamshard.testing import write_id_dataset
from tests.remote_servers import HTTPServer

FAST_RETRY = RetryPolicy(attempts=2, base_delay=0.01, max_delay=0.02, deadline=5)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("paths")
    write_id_dataset(str(root / "ds"), 200, shard_size="2KB")
    return root / "ds"


def clone(base, tmp_path):
    import shutil

    dest = tmp_path / "ds"
    shutil.copytree(base, dest)
    return dest


def rename_shard(ds, name):
    doc = json.loads((ds / "index.json").read_text())
    doc["shards"]["files"][0] = name
    doc.pop("fingerprint")
    doc["fingerprint"] = fingerprint_of(doc)
    (ds / "index.json").write_text(json.dumps(doc))


# ---- 2. names outside the dataset -----------------------------------------------------------
@pytest.mark.parametrize("name", [
    "../outside/x.sss",       # leaves the dataset
    "../../etc/passwd",       # a system file
    "/dev/zero",              # absolute: an endless device
    "/etc/passwd",            # absolute
    "a/../../x.sss",          # not normalized
    "./shard-000000.sss",     # not normalized
    "a//b.sss",               # empty segment
    "%2e%2e/x.sss",           # decoded to ".." by HTTP servers
    "x.sss?raw=1",            # ends the URL path
    "C:\\x.sss",              # drive / backslash
    "",                       # empty
])
def test_unsafe_shard_names_are_refused_at_open(base, tmp_path, name):
    ds = clone(base, tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "x.sss").write_bytes((ds / "shard-000000.sss").read_bytes())
    rename_shard(ds, name)
    with pytest.raises(FormatError, match=r"index.json.*shard name"):
        open_dataset(str(ds))
    with pytest.raises(FormatError, match="shard name"):
        verify_dataset(str(ds))


def test_fifo_and_directory_shards_are_refused_without_reading(base, tmp_path):
    ds = clone(base, tmp_path)
    os.remove(ds / "shard-000000.sss")
    os.mkfifo(ds / "shard-000000.sss")  # opening it for reading would block for ever
    result: list = []

    def attempt():
        try:
            open_dataset(str(ds))[0]
        except BaseException as exc:  # noqa: BLE001 - reported to the main thread
            result.append(exc)
        try:
            result.append(verify_dataset(str(ds)))
        except BaseException as exc:  # noqa: BLE001
            result.append(exc)

    t = threading.Thread(target=attempt, daemon=True)
    t.start()
    t.join(20)
    if t.is_alive():  # unblock the reader so the test process can exit, then fail
        fd = os.open(ds / "shard-000000.sss", os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        pytest.fail("reading a FIFO shard blocked")
    assert isinstance(result[0], StreamshardError) and "not a regular file" in str(result[0])
    report = result[1]
    assert not report.ok and any("not a regular file" in p for p in report.problems)


def test_fifo_index_is_refused(tmp_path):
    os.mkfifo(tmp_path / "index.json")
    done: list = []

    def attempt():
        try:
            open_dataset(str(tmp_path))
        except BaseException as exc:  # noqa: BLE001
            done.append(exc)

    t = threading.Thread(target=attempt, daemon=True)
    t.start()
    t.join(20)
    if t.is_alive():
        os.close(os.open(tmp_path / "index.json", os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("reading a FIFO index blocked")
    assert isinstance(done[0], StreamshardError) and "not a regular file" in str(done[0])


@pytest.mark.slow(reason="a real HTTP server")
def test_http_name_escaping_the_dataset_url_is_never_requested(base, tmp_path):
    root = tmp_path / "www"
    ds = clone(base, root)
    secret = root / "secret"
    secret.mkdir()
    (secret / "x.sss").write_bytes((ds / "shard-000000.sss").read_bytes())
    rename_shard(ds, "../secret/x.sss")
    server = HTTPServer(str(root)).start()
    try:
        src = CachedSource(f"{server.url}/ds", cache_dir=str(tmp_path / "c"), retry=FAST_RETRY)
        with pytest.raises(FormatError, match="shard name"):
            open_dataset(src.url, source=src)
        assert server.control.count("GET", "secret/x.sss") == 0
    finally:
        server.stop()


# ---- 9. secrets ------------------------------------------------------------------------------
@pytest.mark.slow(reason="a real HTTP server")
def test_user_info_is_redacted_in_repr_errors_and_cache_metadata(base, tmp_path):
    root = tmp_path / "www"
    clone(base, root)
    server = HTTPServer(str(root)).start()
    try:
        port = server.url.rsplit(":", 1)[1]
        url = f"http://alice:hunter2@127.0.0.1:{port}/ds"
        src = CachedSource(url, cache_dir=str(tmp_path / "c"), retry=FAST_RETRY)
        ds = open_dataset(url, source=src)
        assert ds[3]["id"] == 3
        assert "hunter2" not in repr(src) and "hunter2" not in repr(ds)
        assert "127.0.0.1" in repr(src)
        bad = CachedSource(url.replace("/ds", "/nope"), cache_dir=str(tmp_path / "c"),
                           retry=FAST_RETRY)
        with pytest.raises(StorageError) as err:
            bad.read_index()
        assert "hunter2" not in str(err.value) and "hunter2" not in (err.value.url or "")
        metas = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "c") for f in fs
                 if f.endswith(".json") and not f.startswith(".")]
        assert metas and any("meta" in m for m in metas)
        for m in metas:
            if "index.json" in m and "meta" not in m:
                continue  # the cached index itself: the dataset's bytes
            assert "hunter2" not in open(m).read(), m
            assert stat.S_IMODE(os.stat(m).st_mode) == 0o600, m
    finally:
        server.stop()


def test_redact_url_and_storage_error():
    from streamshard.errors import redact

    assert redact("s3://k:s@h/b") == "s3://***@h/b"
    assert redact("read http://u:p@x:1/a failed; see https://v@y/z") == \
        "read http://***@x:1/a failed; see https://***@y/z"
    assert redact("/local/path@2x.png") == "/local/path@2x.png"
    err = StorageError("get http://u:pw@h/x failed", url="http://u:pw@h/x")
    assert "pw" not in str(err) and "pw" not in err.url


# ---- 10. shared cache -------------------------------------------------------------------------
NS = "u0/fp0"


def _get(cache, name, data):
    def fetch(tmp):
        with open(tmp, "wb") as f:
            f.write(data)
    return cache.get(NS, name, size=len(data), xxh64=xxhash.xxh64(data).hexdigest(),
                     url=f"mem://b/{name}", fetch=fetch, pin=False)


@pytest.mark.parametrize("bad", [
    {"magic": "streamshard-cache-entry", "version": 1, "size": 10},              # no ns/file
    {"magic": "streamshard-cache-entry", "version": 1, "size": 10, "ns": 5, "file": "x"},
    {"magic": "streamshard-cache-entry", "version": 1, "size": 10, "ns": "../..", "file": "x"},
    {"magic": "streamshard-cache-entry", "version": 1, "size": -10**9, "ns": NS, "file": "x"},
    "directory",                                                                  # unreadable
])
def test_malformed_meta_is_skipped_and_reported_eviction_goes_on(tmp_path, bad, caplog):
    cache = ShardCache(str(tmp_path / "c"), limit=2500)
    _get(cache, "a", b"a" * 1000)
    meta_dir = os.path.dirname(cache.paths(NS, "a").meta)
    bad_path = os.path.join(meta_dir, "zzz.json")
    if bad == "directory":
        os.mkdir(bad_path)
    else:
        with open(bad_path, "w") as f:
            json.dump(bad, f)
    os.utime(bad_path, (0, 0))  # the oldest entry: eviction meets it first
    with caplog.at_level(logging.WARNING, logger="streamshard.remote.cache"):
        _get(cache, "b", b"b" * 1000)
        _get(cache, "c", b"c" * 1000)  # needs an eviction of "a"
    assert not os.path.exists(cache.paths(NS, "a").data)
    assert os.path.exists(bad_path)  # never deleted: the cache did not write it this way
    assert cache.stats()["bad_meta"] >= 1
    assert any("zzz.json" in r.getMessage() for r in caplog.records)


def test_foreign_files_in_the_cache_are_never_deleted(tmp_path):
    cache = ShardCache(str(tmp_path / "c"), limit=2500)
    _get(cache, "a", b"a" * 1000)
    data_dir = os.path.dirname(cache.paths(NS, "a").data)
    foreign = [os.path.join(data_dir, "notes.txt"), os.path.join(data_dir, "user#tmp-file")]
    for p in foreign:
        with open(p, "w") as f:
            f.write("mine")
    for name in "bcd":
        _get(cache, name, name.encode() * 1000)
    cache.sweep()
    assert all(open(p).read() == "mine" for p in foreign)


def test_stale_index_temp_files_are_cleaned(base, tmp_path):
    from streamshard.remote.source import url_key

    # any URL does: the temp files are cleaned under the index lock, before the fetch
    src = CachedSource("memory://trust-ds", cache_dir=str(tmp_path / "c"))
    import fsspec

    mem = fsspec.filesystem("memory")
    for name in os.listdir(base):
        mem.pipe(f"/trust-ds/{name}", (base / name).read_bytes())
    keydir = tmp_path / "c" / url_key("memory://trust-ds")
    keydir.mkdir(parents=True)
    stale = [keydir / "index.json.tmp-999999-abcd1234", keydir / "index.meta.json.tmp-1-ff"]
    for p in stale:
        p.write_bytes(b"half")
    keep = keydir / "user-notes.tmp"
    keep.write_bytes(b"mine")
    src.read_index()
    assert not any(p.exists() for p in stale)
    assert keep.exists()
