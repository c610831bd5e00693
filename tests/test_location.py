"""The one URL-to-filesystem resolver (streamshard/location.py) and that nothing else resolves."""

from __future__ import annotations

import os

import pytest

from streamshard.errors import MissingDependencyError
from streamshard.location import local_path, resolve
from tests.layout import modules


@pytest.mark.parametrize("url, want", [
    ("rel/ds", os.path.abspath("rel/ds")),       # relative paths become absolute
    ("/data/ds", "/data/ds"),
    ("file:///data/ds", "/data/ds"),             # file:// is the local file system
    ("s3://bucket/ds", None),                    # any other protocol is remote
    ("memory://ds", None),
])
def test_local_path(url, want):
    assert local_path(url) == want


def test_resolve_local_and_trailing_slashes(tmp_path):
    for url in (str(tmp_path), f"{tmp_path}/", f"file://{tmp_path}/"):
        loc = resolve(url)
        assert loc.local and loc.root == str(tmp_path)
        assert loc.join("a/b.sss") == os.path.join(str(tmp_path), "a", "b.sss")
    assert resolve("/").root == "/"  # the root keeps its slash


def test_resolve_remote_joins_posix():
    loc = resolve("memory://bucket/ds/")
    assert not loc.local and loc.root == "/bucket/ds"
    assert loc.join("part/shard-000000.sss") == "/bucket/ds/part/shard-000000.sss"


def test_missing_backend_package_says_what_to_install():
    pytest.importorskip("fsspec")
    try:
        import gcsfs  # noqa: F401
        pytest.skip("gcsfs is installed: no missing package to report")
    except ImportError:
        pass
    with pytest.raises(MissingDependencyError, match="'gcsfs' package.*streamshard\\[remote\\]"):
        resolve("gs://bucket/ds")


def test_only_location_py_calls_url_to_fs():
    callers = []
    for name, path in modules().items():
        with open(path, encoding="utf-8") as f:
            if "url_to_fs" in f.read():
                callers.append(name)
    assert callers == ["streamshard.location"]
