"""MosaicML Streaming: ``MDSWriter`` -> ``StreamingDataset(local=...)`` + its
``StreamingDataLoader``; resume with the loader's ``state_dict`` (its documented mid-epoch
resumption). Uncompressed MDS (the library's default), 64 MB ``size_limit``.

``import streaming`` imports ``streaming.vision``, which needs torchvision; the only PyPI
torchvision for torch 2.13 is a CUDA build that cannot load against the CPU torch here, so an
empty ``streaming.vision`` module is put in ``sys.modules`` first. Nothing this benchmark calls
lives in that sub-package (it holds the CIFAR/ImageNet dataset classes)."""

from __future__ import annotations

import sys
import types

from peers import BATCH_SIZE, SHARD_BYTES, Peer, list_collate


class MosaicPeer(Peer):
    package = "mosaicml-streaming"
    resume_kind = "state"
    notes = ("MDSWriter(size_limit=64MB, no compression) -> StreamingDataset(local=, shuffle, "
             "shuffle_seed, batch_size; default py1e shuffle) + streaming.StreamingDataLoader")

    def setup(self):
        if "streaming" not in sys.modules:
            try:
                import torchvision  # noqa: F401
            except Exception:  # missing or broken (CUDA wheel against a CPU torch)
                sys.modules["streaming.vision"] = types.ModuleType("streaming.vision")
        import streaming
        from streaming.base.util import clean_stale_shared_memory

        clean_stale_shared_memory()
        self.streaming = streaming

    def convert(self, wl, dest):
        from streaming import MDSWriter

        enc = f"ndarray:uint16:{wl.fixed_len}" if wl.fixed_len is not None else "bytes"
        with MDSWriter(out=dest, columns={wl.column: enc}, size_limit=SHARD_BYTES) as w:
            for s in wl.iter_samples():
                w.write(s)

    def _dataset(self, dest, shuffle, seed, batch_size):
        return self.streaming.StreamingDataset(local=dest, shuffle=shuffle, shuffle_seed=seed,
                                               batch_size=batch_size)

    def loader(self, wl, dest, *, shuffle, workers, seed, batch_size=BATCH_SIZE):
        ds = self._dataset(dest, shuffle, seed, batch_size)
        kw = {} if wl.fixed_len is not None else {"collate_fn": list_collate}
        return self.streaming.StreamingDataLoader(ds, batch_size=batch_size, num_workers=workers,
                                                  drop_last=True, **kw)

    def getitem(self, wl, dest):
        ds = self._dataset(dest, False, 0, BATCH_SIZE)
        self._keep = ds
        return ds.__getitem__

    def state_dict(self, loader):
        return loader.state_dict()

    def load_state_dict(self, loader, state):
        loader.load_state_dict(state)
