"""Where a dataset lives: the one URL-to-filesystem resolver.

Every reader, writer and tool turns a path or fsspec URL into a filesystem through
:func:`resolve`, so the rules are in one place: ``file://`` and plain paths are the local file
system (absolute, posix separators), any other protocol goes through ``fsspec.core.url_to_fs``
with the caller's ``storage_options``, a trailing ``/`` is dropped (except the root ``/``), and a
protocol whose package is missing raises ``MissingDependencyError`` saying what to install.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping

from streamshard.errors import missing_dependency

# fsspec protocol -> the package that implements it (for the install hint).
_PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs",
             "abfs": "adlfs", "http": "aiohttp", "https": "aiohttp",
             "hf": "huggingface_hub"}


def local_path(url: str | os.PathLike) -> str | None:
    """The absolute local path of a plain path or ``file://`` URL; ``None`` for another protocol."""
    text = os.fspath(url)
    if text.startswith("file://"):
        text = text[len("file://"):]
    elif "://" in text:
        return None
    return os.path.abspath(text)


@dataclass(frozen=True)
class Location:
    """A resolved dataset root: ``fs`` (an fsspec filesystem), ``root`` (its path of the root,
    no trailing ``/``), ``local`` (a LocalFileSystem: paths are native and may be renamed)."""

    fs: Any
    root: str
    local: bool

    def join(self, rel: str) -> str:
        """The filesystem path of ``rel`` (posix, relative to the root)."""
        if self.local:
            return os.path.join(self.root, *rel.split("/"))
        return f"{self.root}/{rel}" if self.root else rel


def resolve(url: str | os.PathLike, storage_options: Mapping[str, Any] | None = None) -> Location:
    """The filesystem and root path of ``url`` (see the module docstring for the rules)."""
    import fsspec
    from fsspec.implementations.local import LocalFileSystem

    text = os.fspath(url)
    try:
        fs, root = fsspec.core.url_to_fs(text, **dict(storage_options or {}))
    except ImportError as exc:
        protocol = text.split("://", 1)[0]
        package = _PACKAGES.get(protocol, protocol)
        raise missing_dependency(package, "remote", f"Reading {text}") from exc
    local = isinstance(fs, LocalFileSystem)
    if local:
        root = os.path.abspath(root)
    root = root.rstrip("/") or root
    return Location(fs, root, local)
