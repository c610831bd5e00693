"""Helpers shared by the converter tests (tests/test_convert_*.py) (no tests here).

``convert_direct`` drives a registered converter exactly like the conversion driver does
(``columns`` over all inputs, ``split`` per file, ``read`` per piece) into one ``ShardWriter``, so
converter tests do not depend on process pools; a separate test runs the real CLI.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Iterable, Mapping

import numpy as np

import streamshard.converters as converters


def RecordingContext(skip: bool = False) -> converters.CountingContext:
    """The driver's own read context (bad records raise, or are counted and kept in
    ``examples`` when ``skip``), with progress reports dropped."""
    return converters.CountingContext(skip, lambda samples, nbytes: None)


def read_all(fmt: str, files: Iterable[str], options: Mapping[str, Any] | None = None, *,
             chunk_bytes: int = 1 << 20, ctx: RecordingContext | None = None
             ) -> tuple[dict[str, str], list[dict], int]:
    """``(columns, samples, pieces)`` of ``files`` read through the registered converter."""
    conv = converters.get(fmt)
    opts = converters.option_values(conv, dict(options or {}))
    files = list(files)
    cols = conv.columns(files, opts)
    ctx = ctx or RecordingContext()
    samples, pieces = [], 0
    for path in files:
        for piece in conv.split(path, os.path.basename(path), os.path.getsize(path),
                                chunk_bytes, opts):
            pieces += 1
            samples.extend(conv.read(piece, opts, ctx))
    return cols, samples, pieces


def convert_direct(fmt: str, files: Iterable[str], dest: str,
                   options: Mapping[str, Any] | None = None, *, chunk_bytes: int = 1 << 20,
                   shard_size: str = "64KB"):
    """Convert through the converter into one dataset at ``dest`` and open it."""
    from streamshard import ShardWriter, open_dataset

    cols, samples, _ = read_all(fmt, files, options, chunk_bytes=chunk_bytes)
    with ShardWriter(dest, columns=cols, shard_size=shard_size) as writer:
        for sample in samples:
            writer.write(sample)
    return open_dataset(dest)


def assert_same_value(a: Any, b: Any, where: str = "") -> None:
    """Deep equality that compares numpy arrays by dtype, shape and values."""
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        a, b = np.asarray(a), np.asarray(b)
        assert a.dtype == b.dtype, f"{where}: dtype {a.dtype} != {b.dtype}"
        assert a.shape == b.shape, f"{where}: shape {a.shape} != {b.shape}"
        assert np.array_equal(a, b), f"{where}: values differ"
    elif isinstance(a, dict) and isinstance(b, dict):
        assert a.keys() == b.keys(), f"{where}: keys {sorted(a)} != {sorted(b)}"
        for k in a:
            assert_same_value(a[k], b[k], f"{where}.{k}")
    else:
        assert type(a) is type(b) and a == b, f"{where}: {a!r} != {b!r}"


@functools.lru_cache(maxsize=None)
def mds_writer():
    """mosaicml-streaming's ``MDSWriter``, imported without ``streaming/__init__``.

    ``streaming/__init__`` imports its vision/multimodal modules, which need a torchvision
    matching the installed torch; there is no CPU build of it here. The writer itself only needs
    numpy and its compression codecs, so its parent packages are registered as bare namespace
    modules first (no code of theirs runs). Returns ``None`` if the package is not installed."""
    import importlib.util
    import sys
    import types

    spec = importlib.util.find_spec("streaming")
    if spec is None or not spec.submodule_search_locations:
        return None
    try:
        from streaming import MDSWriter as writer

        return writer
    except (ImportError, RuntimeError):  # torchvision mismatch: fall back to the bare import
        pass
    root = list(spec.submodule_search_locations)[0]
    stubs = []
    for name, sub in (("streaming", ""), ("streaming.base", "base")):
        if name not in sys.modules:
            module = types.ModuleType(name)
            module.__path__ = [os.path.join(root, sub) if sub else root]
            sys.modules[name] = module
            stubs.append(name)
    try:
        from streaming.base.format.mds.writer import MDSWriter
        from streaming.base.format.mds.reader import MDSReader  # noqa: F401 (cached for tests)
    finally:
        for name in stubs:  # other test modules must never see the bare stubs
            del sys.modules[name]
    return MDSWriter
