"""One module per library the peer benchmark measures; ``PEERS`` is the explicit registry.

Every peer implements :class:`Peer`: ``convert`` a :class:`workloads.Workload` into ``dest``,
build one epoch's ``loader``, ``getitem`` for random access, and one way to resume at a batch:
``"state"`` (the library's own ``state_dict``/``load_state_dict``), ``"seek"`` (a hand-written
loader that slices its index) or ``"replay"`` (no resume support: iterate up to the batch).
Peers import their library lazily, so a missing one is reported, never a crash.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Iterable

BATCH_SIZE = 32
SHARD_BYTES = 64_000_000  # the same target shard/chunk size for every library that has one


def list_collate(samples: list) -> dict:
    """Variable-length text can't be stacked: every library gets this collate, a dict of
    per-column lists (MosaicML's loader counts a batch's samples as ``len`` of its first
    column, so a plain list of sample dicts would corrupt its resume state)."""
    return {k: [s[k] for s in samples] for k in samples[0] if not k.startswith("__")}


class Peer:
    """Base class; ``resume_kind`` is ``"state"``, ``"seek"`` or ``"replay"``."""

    name = "?"
    package = "?"
    resume_kind = "replay"
    notes = ""

    def version(self) -> str:
        from importlib.metadata import version

        return version(self.package)

    def setup(self) -> None:
        """Import the library (raises ImportError when it is missing)."""

    def convert(self, wl, dest: str) -> None:
        raise NotImplementedError

    def loader(self, wl, dest: str, *, shuffle: bool, workers: int, seed: int,
               batch_size: int = BATCH_SIZE) -> Iterable:
        raise NotImplementedError

    def getitem(self, wl, dest: str) -> Callable[[int], Any] | None:
        return None

    def state_dict(self, loader) -> Any:
        raise NotImplementedError

    def load_state_dict(self, loader, state) -> None:
        raise NotImplementedError

    def seek_loader(self, wl, dest: str, *, start_batch: int, shuffle: bool, workers: int,
                    seed: int, batch_size: int = BATCH_SIZE) -> Iterable:
        raise NotImplementedError


_REGISTRY = {
    "memmap": ("peers.memmap", "MemmapPeer", {}),
    "memmap-sample": ("peers.memmap", "MemmapPeer", {"per_sample": True}),
    "streamshard-none": ("peers.streamshard_lib", "StreamshardPeer", {"compression": None}),
    "streamshard-zstd": ("peers.streamshard_lib", "StreamshardPeer", {"compression": "zstd"}),
    "mosaicml-streaming": ("peers.mosaic", "MosaicPeer", {}),
    "litdata": ("peers.litdata_lib", "LitDataPeer", {}),
    "hf-datasets": ("peers.hf", "HFPeer", {}),
    "webdataset": ("peers.wds", "WebDatasetPeer", {}),
}
PEERS = tuple(_REGISTRY)


def make_peer(name: str) -> Peer:
    if name not in _REGISTRY:
        raise KeyError(f"unknown library {name!r}; known: {', '.join(PEERS)}")
    module, cls, kw = _REGISTRY[name]
    peer = getattr(importlib.import_module(module), cls)(**kw)
    peer.name = name
    return peer
