"""WebDataset: ``ShardWriter`` (tar shards, 64 MB ``maxsize``) -> ``WebDataset(urls,
shardshuffle=..., seed=...).shuffle(1000).decode().batched(32)`` + ``WebLoader(batch_size=None)``
(its documented pipeline). Tar shards are streams: no ``ds[i]``, no iteration state (resume is a
replay). ``batched(partial=False)`` runs per worker, so each worker drops its own tail."""

from __future__ import annotations

import glob
import os

from peers import BATCH_SIZE, SHARD_BYTES, Peer, list_collate

SHUFFLE_BUFFER = 1000


def _tokens(sample):
    return {"tokens": sample["tokens.npy"]}


def _text(sample):
    return {"text": sample["text.bin"]}


class WebDatasetPeer(Peer):
    package = "webdataset"
    resume_kind = "replay"
    notes = (f"ShardWriter(maxsize=64MB) tar/.npy -> WebDataset(shardshuffle, seed)"
             f".shuffle({SHUFFLE_BUFFER}).decode().batched(32) + WebLoader")

    def setup(self):
        import webdataset

        self.wds = webdataset

    def convert(self, wl, dest):
        os.makedirs(dest)
        ext = "tokens.npy" if wl.fixed_len is not None else "text.bin"
        with self.wds.ShardWriter(f"{dest}/shard-%06d.tar", maxsize=SHARD_BYTES, maxcount=10**9,
                                  verbose=0) as w:
            for i, s in enumerate(wl.iter_samples()):
                w.write({"__key__": f"{i:09d}", ext: s[wl.column]})

    def loader(self, wl, dest, *, shuffle, workers, seed, batch_size=BATCH_SIZE):
        wds = self.wds
        urls = sorted(glob.glob(f"{dest}/shard-*.tar"))
        ds = wds.WebDataset(urls, shardshuffle=len(urls) if shuffle else False, seed=seed,
                            empty_check=False)
        if shuffle:
            ds = ds.shuffle(SHUFFLE_BUFFER, seed=seed)
        if wl.fixed_len is not None:
            ds = ds.decode().map(_tokens).batched(batch_size, partial=False)
        else:
            ds = ds.map(_text).batched(batch_size, collation_fn=list_collate, partial=False)
        return wds.WebLoader(ds, batch_size=None, num_workers=workers)
