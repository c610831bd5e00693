"""Remote inputs for ``streamshard convert``: any fsspec URL, with globbing, staged locally.

A SRC that is a URL of another protocol than ``file://`` (``s3://bucket/raw/*.jsonl.zst``,
``https://host/data.parquet``, ``hf://datasets/org/name/data/*.parquet``, ...) is listed
through fsspec and copied into a local staging directory before planning, so every converter
(memory-mapped token files, Parquet row groups, tar headers) reads a plain local file and the
plan is the same as for the same files on local disk:

- a directory URL stages every non-hidden file under it, keeping the layout (formats that are a
  directory of siblings, such as ``hf``, ``mds`` and ``megatron``, need this), then is discovered
  like a local directory (files filtered by the format's extensions, sorted by relative path);
- a glob stages the files it matches (sorted), named relative to its fixed prefix;
- a file URL stages that file, named by its basename.

The staging directory holds one sub-directory per SRC (named by a hash of the URL) and a manifest
of ``size`` and ``version`` (ETag or modification time) per staged file; a file whose size and
version still match is not downloaded again, so a resumed conversion reuses what was fetched.
Downloads go to a temporary name and are renamed when complete. A resumed conversion identifies a
remote input by its URL, size and version (not by the staged copy), so a changed remote file is
detected and refused like a changed local one. HTTP globbing needs a server that lists links in
directory pages (fsspec's rule); plain HTTP file URLs always work.
"""

from __future__ import annotations

import glob as globlib
import json
import logging
import os
import posixpath
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import xxhash

from streamshard.atomic import atomic_write
from streamshard.errors import ConfigError, InputError, StorageError, redact
from streamshard.location import local_path, resolve

log = logging.getLogger(__name__)
MANIFEST_SUFFIX = ".manifest.json"
DOWNLOAD_THREADS = 8


@dataclass(frozen=True)
class RemoteFile:
    """One remote input file: its ``url``, its path ``name`` relative to the SRC it came from,
    ``size`` in bytes and ``version`` (ETag or mtime text; ``""`` when the server gives none)."""

    url: str
    path: str  # the file system's path (the URL without protocol)
    name: str
    size: int
    version: str


def is_remote(source: str) -> bool:
    return local_path(source) is None


def _version(info: Mapping[str, Any]) -> str:
    for key in ("ETag", "etag", "LastModified", "last_modified", "mtime", "updated"):
        if info.get(key) not in (None, ""):
            return str(info[key]).strip('"')
    return ""


def _size(info: Mapping[str, Any], url: str) -> int:
    size = info.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise StorageError(f"{url}: the server reports no usable size ({size!r})")
    return size


def list_remote(source: str, extensions: tuple[str, ...] | None,
                storage_options: Mapping[str, Any] | None = None) -> tuple[str, list[RemoteFile]]:
    """``(kind, files)`` of one remote SRC: ``kind`` is ``"dir"``, ``"glob"`` or ``"file"``;
    a directory lists every non-hidden file (the format's extensions are applied after staging).
    Raises ``ConfigError`` naming the URL when nothing is found."""
    loc = resolve(source, storage_options)
    fs, root = loc.fs, loc.root
    protocol = source.split("://", 1)[0]

    def url_of(path: str) -> str:
        return fs.unstrip_protocol(path) if hasattr(fs, "unstrip_protocol") else f"{protocol}://{path}"

    try:
        if globlib.has_magic(root):
            cut = min(root.find(c) for c in "*?[" if c in root)
            base = root[:cut] if root[:cut].endswith("/") else posixpath.dirname(root[:cut])
            found = fs.glob(root, detail=True)
            files = [RemoteFile(url_of(p), p, posixpath.relpath(p, base) if base else p,
                                _size(i, url_of(p)), _version(i))
                     for p, i in sorted(found.items()) if i.get("type") != "directory"]
            kind = "glob"
        elif fs.isdir(root):
            found = fs.find(root, detail=True)
            files = []
            for p, i in sorted(found.items()):
                rel = posixpath.relpath(p, root)
                if not any(part.startswith(".") for part in rel.split("/")):
                    files.append(RemoteFile(url_of(p), p, rel, _size(i, url_of(p)), _version(i)))
            kind = "dir"
        else:
            info = fs.info(root)
            files = [RemoteFile(source, root, posixpath.basename(root), _size(info, source),
                                _version(info))]
            kind = "file"
    except FileNotFoundError:
        raise ConfigError(f"input {source!r} does not exist") from None
    except (PermissionError, OSError) as exc:
        raise StorageError(f"listing input {source}: {exc}") from exc
    if not files:
        raise ConfigError(f"no input files found in {source}"
                          + (f" (looked for {', '.join(extensions)})" if extensions else ""))
    for f in files:
        if f.name.startswith("../") or f.name == ".." or posixpath.isabs(f.name):
            raise InputError(f"{f.url}: name {f.name!r} leaves the SRC {source}")
    return kind, files


def stage_root(cache_dir: str, source: str) -> str:
    return os.path.join(cache_dir, xxhash.xxh64(source.encode()).hexdigest())


def stage(source: str, files: Sequence[RemoteFile], cache_dir: str,
          storage_options: Mapping[str, Any] | None = None) -> str:
    """Download ``files`` of ``source`` under ``stage_root(cache_dir, source)`` at their names
    (reusing copies whose size and version match the manifest); return that root."""
    root = stage_root(cache_dir, source)
    os.makedirs(root, exist_ok=True)
    manifest_path = root + MANIFEST_SUFFIX  # beside the tree, never taken for an input
    try:
        with open(manifest_path, encoding="utf-8") as f:
            manifest = json.load(f)
        if not isinstance(manifest, dict):
            manifest = {}
    except (OSError, ValueError):
        manifest = {}
    fs = resolve(source, storage_options).fs
    todo = []
    for rf in files:
        dest = os.path.join(root, *rf.name.split("/"))
        if manifest.get(rf.name) == [rf.size, rf.version] and os.path.isfile(dest) and \
                os.path.getsize(dest) == rf.size:
            continue
        todo.append((rf, dest))
    fetched = 0
    # A few downloads at once: object stores serve one connection at a fraction of their
    # bandwidth, and many inputs are small. Results are recorded in this thread, in order.
    with ThreadPoolExecutor(max_workers=min(DOWNLOAD_THREADS, max(1, len(todo)))) as pool:
        futures = [pool.submit(_download, fs, rf, dest) for rf, dest in todo]
        try:
            for (rf, _), future in zip(todo, futures):
                future.result()
                manifest[rf.name] = [rf.size, rf.version]
                atomic_write(manifest_path, json.dumps(manifest, sort_keys=True).encode("utf-8"))
                fetched += rf.size
        except BaseException:
            for future in futures:
                future.cancel()
            raise
    log.info("staged %d input files of %s (%d bytes downloaded) in %s", len(files),
             redact(source), fetched, root)
    return root


def _download(fs: Any, rf: RemoteFile, dest: str) -> None:
    """``rf`` to ``dest`` through a temporary name in the same directory, size checked."""
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    tmp = os.path.join(os.path.dirname(dest),
                       f".{os.path.basename(dest)}.partial-{os.getpid()}-{threading.get_ident()}")
    try:
        fs.get_file(rf.path, tmp)
        got = os.path.getsize(tmp)
        if got != rf.size:
            raise StorageError(f"{rf.url}: downloaded {got} bytes, the listing said {rf.size}")
        os.replace(tmp, dest)
    except FileNotFoundError:
        raise ConfigError(f"input {rf.url} disappeared while downloading") from None
    except (PermissionError, OSError) as exc:
        raise StorageError(f"downloading input {rf.url}: {exc}") from exc
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def discover_inputs(sources: Sequence[str], extensions: tuple[str, ...] | None, *,
                    exclude: str | None, cache_dir: str,
                    storage_options: Mapping[str, Any] | None = None,
                    ) -> tuple[list[tuple[str, str]], dict[str, list]]:
    """Like :func:`streamshard.converters.discover`, with remote SRCs staged under ``cache_dir``.

    Returns ``(files, identities)``: ``files`` as ``discover`` returns them (local paths, staged
    copies for remote SRCs) and ``identities[local_path] = [url, size, version]`` for each staged
    file, which a resumed conversion compares instead of the staged copy's stat."""
    from streamshard.converters import discover

    if not any(is_remote(s) for s in sources):
        return discover(sources, extensions, exclude=exclude), {}
    files: list[tuple[str, str]] = []
    identities: dict[str, list] = {}
    seen: set[str] = set()
    for src in sources:
        if not is_remote(src):
            found = discover([src], extensions, exclude=exclude)
        else:
            kind, remote = list_remote(src, extensions, storage_options)
            if exclude and is_remote(exclude):  # never read the destination as input
                prefix = exclude.rstrip("/") + "/"
                remote = [rf for rf in remote if not rf.url.startswith(prefix)]
            # A directory stages every file (hf, mds and megatron inputs have siblings) and
            # takes those with the format's extensions, like a local directory.
            inputs = [rf for rf in remote if kind != "dir" or extensions is None
                      or posixpath.basename(rf.name).endswith(extensions)]
            if not inputs:
                raise ConfigError(f"no input files found in {src}"
                                  + (f" (looked for {', '.join(extensions)})" if extensions else ""))
            root = stage(src, remote, cache_dir, storage_options)
            found = []
            for rf in inputs:
                path = os.path.abspath(os.path.join(root, *rf.name.split("/")))
                # redacted: the identity lands in the conversion marker (a file in dest)
                identities[path] = [redact(rf.url), rf.size, rf.version]
                found.append((path, rf.name))
        for path, name in found:
            if path not in seen:
                seen.add(path)
                files.append((path, name))
    return files, identities


def default_cache(sources: Sequence[str], dest: str) -> str:
    """The staging directory used without ``input_cache``: in the temp directory, named by the
    sources and the destination, so a rerun of the same conversion finds what was fetched."""
    import tempfile

    key = xxhash.xxh64(json.dumps([list(sources), dest]).encode()).hexdigest()
    return os.path.join(tempfile.gettempdir(), f"streamshard-inputs-{key}")


def remove_cache(cache_dir: str) -> None:
    import shutil

    shutil.rmtree(cache_dir, ignore_errors=True)
