"""Raw ``np.memmap``: the practical limit. The same bytes in one flat file plus an offsets
array; shuffled order is a random permutation index (``np.random.default_rng(seed)``), read a
batch at a time with fancy indexing by a plain torch ``DataLoader`` (``batch_size=None``, a
sampler that yields index arrays). Resume = slice the permutation (``"seek"``).

``memmap-sample`` is the same file read one sample at a time through a map-style dataset
(``DataLoader(batch_size=32, sampler=permutation)`` + ``default_collate``): the per-sample API
every library here offers, so it shows what per-sample access and collation cost by themselves."""

from __future__ import annotations

import shutil

import numpy as np
import torch.utils.data

from peers import BATCH_SIZE, Peer


class _Batches(torch.utils.data.Dataset):
    def __init__(self, wl, dest: str):
        self.wl, self.dest = wl, dest
        self._mm = None

    def _open(self):
        if self._mm is None:
            self._mm = np.memmap(f"{self.dest}/data.bin", dtype=np.uint8, mode="r")
            self._offs = np.load(f"{self.dest}/offsets.npy")
            if self.wl.fixed_len is not None:
                self._rows = self._mm.view(np.uint16).reshape(-1, self.wl.fixed_len)
        return self._mm

    def __len__(self):
        return self.wl.num_samples

    def __getitem__(self, idx):
        mm = self._open()
        if self.wl.fixed_len is not None:
            return {"tokens": torch.from_numpy(self._rows[idx])}  # one fancy-index copy
        offs = self._offs
        return {"text": [mm[offs[i]:offs[i + 1]].tobytes() for i in idx.tolist()]}

    def __getstate__(self):
        return {"wl": self.wl, "dest": self.dest, "_mm": None}


class _IndexBatches(torch.utils.data.Sampler):
    def __init__(self, order: np.ndarray, batch_size: int, start_batch: int = 0):
        self.order, self.bs, self.start = order, batch_size, start_batch

    def __len__(self):
        return len(self.order) // self.bs - self.start

    def __iter__(self):
        for b in range(self.start, len(self.order) // self.bs):  # drop the tail, like the others
            yield self.order[b * self.bs:(b + 1) * self.bs]


class _Samples(_Batches):
    def __getitem__(self, i):
        mm = self._open()
        if self.wl.fixed_len is not None:
            return {"tokens": np.array(self._rows[i])}
        return {"text": mm[self._offs[i]:self._offs[i + 1]].tobytes()}


class MemmapPeer(Peer):
    package = "numpy"
    resume_kind = "seek"

    def __init__(self, per_sample: bool = False):
        self.per_sample = per_sample
        self.notes = ("flat file + offsets; permutation index; " +
                      ("per-sample ds[i] + default_collate, DataLoader(batch_size=32)" if per_sample
                       else "one fancy-index read per batch, DataLoader(batch_size=None)"))

    def convert(self, wl, dest: str) -> None:
        import os

        os.makedirs(dest)
        with open(f"{dest}/data.bin", "wb") as f:
            for s in wl.iter_samples():
                v = s[wl.column]
                f.write(v if isinstance(v, bytes) else v.tobytes())
        shutil.copyfile(wl.offsets, f"{dest}/offsets.npy")

    def _order(self, wl, shuffle: bool, seed: int) -> np.ndarray:
        if shuffle:
            return np.random.default_rng(seed).permutation(wl.num_samples)
        return np.arange(wl.num_samples)

    def loader(self, wl, dest, *, shuffle, workers, seed, batch_size=BATCH_SIZE):
        return self.seek_loader(wl, dest, start_batch=0, shuffle=shuffle, workers=workers,
                                seed=seed, batch_size=batch_size)

    def seek_loader(self, wl, dest, *, start_batch, shuffle, workers, seed, batch_size=BATCH_SIZE):
        order = self._order(wl, shuffle, seed)
        if self.per_sample:
            from peers import list_collate
            from torch.utils.data._utils.collate import default_collate

            n = len(order) // batch_size * batch_size
            return torch.utils.data.DataLoader(
                _Samples(wl, dest), batch_size=batch_size, sampler=order[start_batch * batch_size:n].tolist(),
                num_workers=workers, collate_fn=default_collate if wl.fixed_len else list_collate)
        sampler = _IndexBatches(order, batch_size, start_batch)
        return torch.utils.data.DataLoader(_Batches(wl, dest), batch_size=None, sampler=sampler,
                                           num_workers=workers)

    def getitem(self, wl, dest):
        mm = np.memmap(f"{dest}/data.bin", dtype=np.uint8, mode="r")
        offs = np.load(f"{dest}/offsets.npy")
        if wl.fixed_len is not None:
            rows = mm.view(np.uint16).reshape(-1, wl.fixed_len)
            return lambda i: np.array(rows[i])  # a copy: the bytes are really read
        return lambda i: mm[offs[i]:offs[i + 1]].tobytes()
