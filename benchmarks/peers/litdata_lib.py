"""LitData: ``optimize()`` -> ``StreamingDataset`` + ``StreamingDataLoader``; resume with the
loader's ``state_dict``. ``optimize`` gets ranges of sample ids as inputs and a generator ``fn``
that yields the samples (its documented pattern), ``chunk_bytes`` 64 MB, no compression,
``num_workers=1`` so that, like every other writer here, one process converts."""

from __future__ import annotations

from functools import partial

from peers import BATCH_SIZE, SHARD_BYTES, Peer, list_collate

_INPUT_SAMPLES = 1024  # samples per optimize() input item


def _emit(rng, wl):
    start, stop = rng
    yield from wl.iter_samples(start, stop)


class LitDataPeer(Peer):
    package = "litdata"
    resume_kind = "state"
    notes = ("optimize(fn, inputs=ranges, chunk_bytes=64MB, num_workers=1) -> "
             "StreamingDataset(shuffle, seed) + StreamingDataLoader(batch_size, num_workers)")

    def setup(self):
        import litdata

        self.litdata = litdata

    def convert(self, wl, dest):
        inputs = [(a, min(a + _INPUT_SAMPLES, wl.num_samples))
                  for a in range(0, wl.num_samples, _INPUT_SAMPLES)]
        self.litdata.optimize(fn=partial(_emit, wl=wl), inputs=inputs, output_dir=dest,
                              chunk_bytes=SHARD_BYTES, num_workers=1, verbose=False)

    def loader(self, wl, dest, *, shuffle, workers, seed, batch_size=BATCH_SIZE):
        ds = self.litdata.StreamingDataset(dest, shuffle=shuffle, seed=seed, drop_last=True)
        kw = {} if wl.fixed_len is not None else {"collate_fn": list_collate}
        return self.litdata.StreamingDataLoader(ds, batch_size=batch_size, num_workers=workers,
                                                drop_last=True, **kw)

    def getitem(self, wl, dest):
        ds = self.litdata.StreamingDataset(dest)
        return ds.__getitem__

    def state_dict(self, loader):
        return loader.state_dict()

    def load_state_dict(self, loader, state):
        loader.load_state_dict(state)
