"""One conformance suite run against every storage backend (S3 via moto, HTTP, memory://): the
same dataset read through CachedSource equals the local one, the index and each shard are
fetched once per cache, a missing object is a permanent error naming its URL, a corrupted object
is named. Backend-specific faults live in test_remote_s3.py / test_remote_http.py."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from typing import Callable

import fsspec
import numpy as np
import pytest

from streamshard.errors import CorruptionError, StorageError
from streamshard.reader import open_dataset
from streamshard.remote import CachedSource, RetryPolicy
from streamshard.testing import write_id_dataset
from tests.remote_servers import HTTPServer, S3Server

pytestmark = pytest.mark.slow(reason="one suite against real servers: moto S3 and an HTTP server")
FAST_RETRY = RetryPolicy(attempts=3, base_delay=0.01, max_delay=0.05, deadline=5)


@dataclass
class Backend:
    url: str
    options: dict
    delete: Callable[[str], None]            # remove the object at a dataset-relative path
    replace: Callable[[str, bytes], None]    # overwrite it


@pytest.fixture(scope="module")
def local_ds(tmp_path_factory):
    return write_id_dataset(str(tmp_path_factory.mktemp("src") / "ds"), 1500, shard_size="4KB")


@pytest.fixture(scope="module")
def s3_server():
    server = S3Server().start()
    yield server
    server.stop()


_counter = iter(range(10**6))


@pytest.fixture(params=["s3", "http", "memory"])
def backend(request, local_ds, tmp_path):
    n = next(_counter)
    if request.param == "s3":
        server = request.getfixturevalue("s3_server")
        bucket = f"conf-{n}"
        server.make_bucket(bucket)
        fs = server.fs()
        fs.put(local_ds + "/", f"{bucket}/ds/", recursive=True)
        yield Backend(f"s3://{bucket}/ds", server.options(),
                      lambda rel: fs.rm(f"{bucket}/ds/{rel}"),
                      lambda rel, data: fs.pipe_file(f"{bucket}/ds/{rel}", data))
    elif request.param == "http":
        root = tmp_path / "www"
        shutil.copytree(local_ds, root / "ds")
        server = HTTPServer(str(root)).start()
        try:
            yield Backend(f"{server.url}/ds", {}, lambda rel: (root / "ds" / rel).unlink(),
                          lambda rel, data: (root / "ds" / rel).write_bytes(data))
        finally:
            server.stop()
    else:
        fs = fsspec.filesystem("memory")
        prefix = f"/conf-{n}/ds"
        fs.put(local_ds + "/", prefix + "/", recursive=True)
        try:
            yield Backend(f"memory://{prefix}", {}, lambda rel: fs.rm(f"{prefix}/{rel}"),
                          lambda rel, data: fs.pipe_file(f"{prefix}/{rel}", data))
        finally:
            fs.rm(prefix, recursive=True)


def same(a, b) -> bool:
    return a["id"] == b["id"] and np.array_equal(a["tokens"], b["tokens"])


def source(backend: Backend, cache_dir) -> CachedSource:
    return CachedSource(backend.url, cache_dir=str(cache_dir), storage_options=backend.options,
                        retry=FAST_RETRY)


def test_read_equals_local_fetching_each_object_once(backend, local_ds, tmp_path):
    local = open_dataset(local_ds)
    src = source(backend, tmp_path / "c")
    ds = open_dataset(backend.url, source=src)
    assert ds.fingerprint == local.fingerprint
    assert all(same(ds[i], local[i]) for i in range(len(local)))
    stats = src.stats()
    assert stats["index_fetches"] == 1 and stats["misses"] == local.num_shards
    assert stats["bytes_fetched"] == sum(s.bytes for s in local.index.shards)
    ds.close()
    warm = source(backend, tmp_path / "c")
    again = open_dataset(backend.url, source=warm)
    assert all(same(again[i], local[i]) for i in range(0, len(local), 5))
    assert (warm.stats()["bytes_fetched"], warm.stats()["misses"]) == (0, 0)
    again.close()


def test_missing_object_is_permanent_and_named(backend, local_ds, tmp_path):
    shard = open_dataset(local_ds).index.shards[1]
    src = source(backend, tmp_path / "c")
    src.read_index()
    backend.delete(shard.file)
    with pytest.raises(StorageError) as err:
        src.shard_path(shard)
    assert not err.value.transient and err.value.url == f"{backend.url}/{shard.file}"
    assert src.stats()["retries"] == 0


def test_corrupted_object_is_named(backend, local_ds, tmp_path):
    shard = open_dataset(local_ds).index.shards[0]
    with open(f"{local_ds}/{shard.file}", "rb") as f:
        data = bytearray(f.read())
    data[10] ^= 0x01
    backend.replace(shard.file, bytes(data))
    src = source(backend, tmp_path / "c")
    src.read_index()
    with pytest.raises(CorruptionError, match=f"{backend.url}/{shard.file}.*{shard.xxh64}"):
        src.shard_path(shard)
