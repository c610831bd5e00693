"""Hugging Face datasets: ``Dataset.from_generator`` + ``save_to_disk`` (64 MB shards) ->
``load_from_disk(...).with_format("numpy")`` + a torch ``DataLoader`` with a seeded
``RandomSampler`` / ``SequentialSampler`` (``Dataset.__getitems__`` fetches a batch at once).
A map-style ``Dataset`` under a plain DataLoader keeps no iteration state: resume is a replay."""

from __future__ import annotations

import os

from peers import BATCH_SIZE, SHARD_BYTES, Peer, list_collate


def _gen(wl):
    yield from wl.iter_samples()


class HFPeer(Peer):
    package = "datasets"
    resume_kind = "replay"
    notes = ("Dataset.from_generator(features) + save_to_disk(max_shard_size=64MB) -> "
             "load_from_disk().with_format('numpy') + torch DataLoader(RandomSampler(seeded))")

    def setup(self):
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        import datasets

        datasets.disable_progress_bars()
        self.datasets = datasets

    def convert(self, wl, dest):
        d = self.datasets
        if wl.fixed_len is not None:
            feat = d.Features({wl.column: d.List(d.Value("uint16"), length=wl.fixed_len)})
        else:
            feat = d.Features({wl.column: d.Value("binary")})
        cache = dest + ".hf-cache"  # from_generator's arrow cache, removed after save_to_disk
        ds = d.Dataset.from_generator(_gen, features=feat, cache_dir=cache, gen_kwargs={"wl": wl})
        ds.save_to_disk(dest, max_shard_size=SHARD_BYTES)
        del ds
        import shutil

        shutil.rmtree(cache, ignore_errors=True)

    def _open(self, dest):
        return self.datasets.load_from_disk(dest).with_format("numpy")

    def loader(self, wl, dest, *, shuffle, workers, seed, batch_size=BATCH_SIZE):
        import torch
        from torch.utils.data import DataLoader, RandomSampler, SequentialSampler

        ds = self._open(dest)
        if shuffle:
            sampler = RandomSampler(ds, generator=torch.Generator().manual_seed(seed))
        else:
            sampler = SequentialSampler(ds)
        kw = {} if wl.fixed_len is not None else {"collate_fn": list_collate}
        return DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=workers,
                          drop_last=True, **kw)

    def getitem(self, wl, dest):
        return self._open(dest).__getitem__
