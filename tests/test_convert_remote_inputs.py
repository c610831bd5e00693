"""``streamshard convert`` reading its inputs from fsspec URLs (issue 13, item 5): a moto S3 server
started here holds zstd JSONL parts, a saved Hugging Face dataset and a tar; globs, directories
and single files convert to the same dataset as the same files on local disk; a resumed
conversion notices a changed remote object; an HTTP file URL works; errors name the URL."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import zstandard

from streamshard.convert import convert
from streamshard.errors import ConfigError
from streamshard.reader import open_dataset
from tests.remote_servers import HTTPServer, S3Server

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytest.importorskip("s3fs")


@pytest.fixture(scope="module")
def s3():
    server = S3Server().start()
    yield server
    server.stop()


def jsonl_zst(rows) -> bytes:
    text = "".join(json.dumps(r) + "\n" for r in rows).encode()
    return zstandard.ZstdCompressor().compress(text)


@pytest.fixture(scope="module")
def corpus(s3, tmp_path_factory):
    """Three .jsonl.zst parts (and a README that the glob must not match) in s3://raw/web/, and
    the same files on local disk."""
    local = tmp_path_factory.mktemp("local-corpus")
    s3.make_bucket("raw")
    fs = s3.fs()
    for part in range(3):
        rows = [{"text": f"part {part} doc {i}", "id": part * 1000 + i} for i in range(150)]
        data = jsonl_zst(rows)
        (local / f"part-{part}.jsonl.zst").write_bytes(data)
        fs.pipe_file(f"raw/web/part-{part}.jsonl.zst", data)
    fs.pipe_file("raw/web/README.md", b"not an input")
    return local


def fingerprint(path) -> str:
    with open_dataset(str(path)) as ds:
        return ds.fingerprint


def rows(path) -> list[dict]:
    with open_dataset(str(path)) as ds:
        return [ds[i] for i in range(len(ds))]


def test_glob_of_zstd_jsonl_equals_the_local_conversion(s3, corpus, tmp_path):
    common = dict(format="jsonl", options={"fields": "text:str,id:int64"}, chunk_size="2KB")
    local = convert([str(corpus / "*.jsonl.zst")], str(tmp_path / "local"), **common)
    remote = convert(["s3://raw/web/*.jsonl.zst"], str(tmp_path / "remote"),
                     input_storage_options=s3.options(), input_cache=str(tmp_path / "cache"),
                     **common)
    assert remote.samples == 450 and remote.chunks == local.chunks
    assert fingerprint(tmp_path / "remote") == fingerprint(tmp_path / "local")
    assert rows(tmp_path / "remote")[150] == {"text": "part 1 doc 0", "id": 1000}


def test_directory_url_filters_by_extension_and_temp_stage_is_removed(s3, corpus, tmp_path):
    import tempfile

    from streamshard.inputs import default_cache

    dest = str(tmp_path / "ds")
    summary = convert(["s3://raw/web/"], dest, format="jsonl",
                      input_storage_options=s3.options())
    assert summary.samples == 450  # README.md is not a jsonl input
    cache = default_cache(["s3://raw/web/"], dest)
    assert cache.startswith(tempfile.gettempdir()) and not os.path.exists(cache)


@pytest.mark.slow(reason="writes a datasets split and stages it from moto S3: ~7 s here")
def test_saved_hf_dataset_directory_on_s3(s3, tmp_path):
    datasets = pytest.importorskip("datasets")
    saved = tmp_path / "saved"
    datasets.Dataset.from_list([{"text": f"t{i}", "n": i} for i in range(40)]).save_to_disk(
        str(saved))
    fs = s3.fs()
    s3.make_bucket("hub")
    fs.put(str(saved), "hub/saved", recursive=True)
    convert(["s3://hub/saved"], str(tmp_path / "ds"), format="hf",
            input_storage_options=s3.options())
    assert rows(tmp_path / "ds")[39] == {"text": "t39", "n": 39}


@pytest.mark.slow(reason="two conversions from moto S3 around a rewritten object: ~7 s here")
def test_resume_refuses_a_changed_remote_object(s3, tmp_path):
    fs = s3.fs()
    s3.make_bucket("changing")
    fs.pipe_file("changing/a.jsonl", b'{"x": 1}\n{"x": 2}\n')
    dest = tmp_path / "ds"
    marker_inputs = None

    # An interrupted conversion leaves its marker: simulate one by failing on a bad record.
    fs.pipe_file("changing/b.jsonl", b'{"x": 3}\nnot json\n')
    with pytest.raises(Exception, match="b.jsonl:2"):
        convert(["s3://changing/*.jsonl"], str(dest), format="jsonl", chunk_size="10B",
                input_storage_options=s3.options(), input_cache=str(tmp_path / "cache"))
    marker = json.loads((dest / ".streamshard-convert.json").read_text())
    marker_inputs = [entry[0] for entry in marker["inputs"]]
    assert marker_inputs == ["s3://changing/a.jsonl", "s3://changing/b.jsonl"]  # URLs, not copies
    fs.pipe_file("changing/b.jsonl", b'{"x": 3}\n{"x": 4}\n')  # same size, new ETag
    with pytest.raises(ConfigError, match="input s3://changing/b.jsonl changed"):
        convert(["s3://changing/*.jsonl"], str(dest), format="jsonl", chunk_size="10B",
                input_storage_options=s3.options(), input_cache=str(tmp_path / "cache"))
    summary = convert(["s3://changing/*.jsonl"], str(dest), format="jsonl", chunk_size="10B",
                      input_storage_options=s3.options(), input_cache=str(tmp_path / "cache"),
                      resume=False)
    assert summary.samples == 4
    assert os.path.isdir(tmp_path / "cache")  # an explicit input cache is kept


@pytest.mark.parametrize("url,message", [
    # a missing object and a glob with no match name the URL
    ("s3://raw/web/nope.jsonl", "input 's3://raw/web/nope.jsonl' does not exist"),
    ("s3://raw/web/*.parquet", "no input files found in s3://raw/web/*.parquet"),
])
def test_missing_inputs_name_the_url(s3, corpus, tmp_path, url, message):
    with pytest.raises(ConfigError, match=message.replace("*", r"\*").replace(".", r"\.")):
        convert([url], str(tmp_path / "ds"), format="jsonl", input_storage_options=s3.options())


def test_http_file_url(tmp_path):
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "d.jsonl").write_text('{"a": 1}\n{"a": 2}\n{"a": 3}\n')
    server = HTTPServer(str(tmp_path / "www")).start()
    try:
        convert([f"{server.url}/d.jsonl"], str(tmp_path / "ds"), format="jsonl")
    finally:
        server.stop()
    assert [r["json"] for r in rows(tmp_path / "ds")] == [{"a": 1}, {"a": 2}, {"a": 3}]


@pytest.mark.slow(reason="a CLI subprocess (~3 s of imports) against a moto S3 server")
def test_cli_with_fsspec_environment_options(s3, corpus, tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT,
               FSSPEC_S3=json.dumps({"endpoint_url": s3.endpoint, "key": "testing",
                                     "secret": "testing"}))
    proc = subprocess.run([sys.executable, "-m", "streamshard.cli", "convert",
                           "s3://raw/web/part-[01].jsonl.zst", str(tmp_path / "ds"),
                           "--format", "jsonl", "--quiet"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "converted 300 samples" in proc.stdout


def test_rerun_with_a_kept_cache_follows_the_remote_listing(s3, tmp_path):
    fs = s3.fs()
    s3.make_bucket("listing")
    for name in ("a", "b", "c"):
        fs.pipe_file(f"listing/d/{name}.jsonl", b'{"x": 1}\n{"x": 2}\n')
    cache = str(tmp_path / "cache")
    first = convert(["s3://listing/d"], str(tmp_path / "one"), format="jsonl", input_cache=cache,
                    input_storage_options=s3.options())
    fs.rm_file("listing/d/b.jsonl")  # its staged copy stays in the cache
    second = convert(["s3://listing/d"], str(tmp_path / "two"), format="jsonl",
                     input_cache=cache, input_storage_options=s3.options())
    assert (first.samples, second.samples) == (6, 4)

