"""Checkpoint storage through fsspec: a manifest of sizes and xxh64 digests, verification, quarantine.

A checkpoint directory is complete when its ``MANIFEST.json`` exists; the manifest is written last,
after every other file of the checkpoint, and lists each file's size and xxh64::

    {"version": 1, "step": 120, "files": {"meta.json": {"size": 1234, "xxh64": "9f3c..."}, ...}}

Verification re-reads every listed file (in parallel across ranks: rank r hashes files
``r, r + W, ...``) and compares; an extra or missing file, a size or digest mismatch, or an
unreadable manifest makes the checkpoint bad. A bad checkpoint is moved to
``<root>/quarantine/<name>-<unix time>`` (kept for a post-mortem, never loaded again) and the
caller falls back to the previous one, so a damaged checkpoint costs the steps since that one,
is never blamed on data, and cannot be chosen again on the next start (no crash loop).
"""

from __future__ import annotations

import json
import logging
import time

import xxhash

from streamshard.errors import CorruptionError

MANIFEST = "MANIFEST.json"
QUARANTINE = "quarantine"
VERSION = 1
_CHUNK = 4 << 20
log = logging.getLogger(__name__)


def digest(fs, path: str) -> tuple[int, str]:
    """(size, xxh64 hex) of one file, streamed in 4 MiB reads."""
    h, size = xxhash.xxh64(), 0
    with fs.open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


def files_of(fs, directory: str) -> list[str]:
    """Names (relative, sorted) of the files under ``directory``, the manifest excluded."""
    out = []
    for p in fs.find(directory):
        rel = p[len(directory.rstrip("/")) + 1:]
        if rel and rel != MANIFEST:
            out.append(rel)
    return sorted(out)


def hash_share(fs, directory: str, names: list[str], rank: int, world_size: int) -> dict:
    """Entries for this rank's share of ``names`` (every ``world_size``-th, starting at ``rank``)."""
    out = {}
    for name in names[rank::world_size]:
        size, hexd = digest(fs, f"{directory}/{name}")
        out[name] = {"size": size, "xxh64": hexd}
    return out


def write_manifest(fs, directory: str, step: int, entries: dict) -> None:
    body = json.dumps({"version": VERSION, "step": step, "files": dict(sorted(entries.items()))},
                      allow_nan=False).encode()
    put_bytes(fs, f"{directory}/{MANIFEST}", body)


def put_bytes(fs, path: str, data: bytes) -> None:
    """Whole-object write: temp + rename on a local file system, one PUT on object stores."""
    from streamshard.atomic import put_atomic

    put_atomic(path, data, fs=fs)


def read_manifest(fs, directory: str) -> dict:
    """The parsed manifest; CorruptionError naming the file if it is missing or malformed."""
    path = f"{directory}/{MANIFEST}"
    try:
        m = json.loads(fs.cat_file(path))
    except FileNotFoundError:
        raise CorruptionError(f"{path}: no manifest (the save did not finish)") from None
    except (OSError, ValueError) as e:
        raise CorruptionError(f"{path}: unreadable manifest ({e})") from None
    files = m.get("files") if isinstance(m, dict) else None
    if m.get("version") != VERSION or not isinstance(files, dict) or not all(
            isinstance(v, dict) and isinstance(v.get("size"), int) and v["size"] >= 0
            and isinstance(v.get("xxh64"), str) for v in files.values()):
        raise CorruptionError(f"{path}: manifest must be version {VERSION} with size and xxh64 per file")
    return m


def check_share(fs, directory: str, manifest: dict, rank: int = 0, world_size: int = 1) -> str | None:
    """This rank's part of a verification: the first problem found, or None."""
    listed = manifest["files"]
    if rank == 0:
        present = set(files_of(fs, directory))
        missing, extra = sorted(set(listed) - present), sorted(present - set(listed))
        if missing or extra:
            return f"{directory}: files missing {missing[:5]} / not in the manifest {extra[:5]}"
    for name in sorted(listed)[rank::world_size]:
        path, want = f"{directory}/{name}", listed[name]
        try:
            size = fs.size(path)
        except FileNotFoundError:
            return f"{path}: missing"
        if size != want["size"]:
            return f"{path}: size {size} bytes, manifest says {want['size']} (truncated or overwritten)"
        _, hexd = digest(fs, path)
        if hexd != want["xxh64"]:
            return f"{path}: xxh64 {hexd}, manifest says {want['xxh64']} (bytes changed after the save)"
    return None


def quarantine(fs, root: str, directory: str, reason: str, clock=time.time) -> str:
    """Move a bad checkpoint under ``<root>/quarantine/`` and return its new path."""
    name = directory.rstrip("/").rsplit("/", 1)[-1]
    dest = f"{root}/{QUARANTINE}/{name}-{int(clock())}"
    fs.makedirs(f"{root}/{QUARANTINE}", exist_ok=True)
    from fsspec.implementations.local import LocalFileSystem

    if isinstance(fs, LocalFileSystem):
        fs.mv(directory, dest, recursive=True)  # one rename
    else:  # object stores have no directories: move file by file, then drop what is left
        base = directory.rstrip("/")
        for src in fs.find(base):
            fs.mv(src, f"{dest}/{src[len(base) + 1:]}")
        try:
            fs.rm(base, recursive=True)
        except FileNotFoundError:
            pass
    put_bytes(fs, f"{dest}/REASON.txt", (reason + "\n").encode())
    log.warning("quarantined checkpoint %s -> %s: %s", directory, dest, reason)
    return dest
