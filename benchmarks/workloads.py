"""Deterministic workloads for the peer benchmark, written once as a flat file + offsets.

Every library converts from the same source (``Workload.iter_samples``), so conversion times
compare writers, not input parsing. Two workloads:

- ``tokens``: fixed-length samples of 2,048 uint16 tokens (4,096 bytes). Zipf(1.2) ranks folded
  into a 50k vocabulary, like BPE token streams (zstd finds ~1.3-1.6x on it). Same generator as
  ``bench_format.py``; seeded, generated in chunks so 400 MB never sits in memory twice.
- ``text``: variable-length real text: every ``.py`` under ``sysconfig.get_paths()["stdlib"]``,
  sorted by relative path, as raw bytes (some stdlib files are not UTF-8, so the column is bytes).
  ``site-packages`` is excluded: it is not the standard library and would make the workload depend
  on what happens to be installed.
"""

from __future__ import annotations

import json
import os
import sysconfig
from dataclasses import dataclass
from typing import Iterator

import numpy as np

TOKENS_PER_SAMPLE = 2048
VOCAB = 50_000
_CHUNK = 4096  # samples generated per RNG call (32 MB of int64 draws)


@dataclass(frozen=True)
class Workload:
    """A workload on disk: ``data`` is every sample's payload back to back, ``offsets`` the
    int64 byte offsets (len N+1). ``column`` is the one column every library stores."""

    name: str
    column: str
    num_samples: int
    raw_bytes: int
    data: str
    offsets: str
    fixed_len: int | None  # tokens per sample for "tokens", None for variable-length bytes

    # -- access (each caller maps the files itself; a Workload is a picklable value) ---------
    def open(self) -> tuple[np.memmap, np.ndarray]:
        return np.memmap(self.data, dtype=np.uint8, mode="r"), np.load(self.offsets)

    def payload(self, mm: np.memmap, offs: np.ndarray, i: int):
        """Sample ``i``'s payload: a fresh uint16 array (tokens) or ``bytes`` (text)."""
        a, b = int(offs[i]), int(offs[i + 1])
        if self.fixed_len is not None:
            return np.frombuffer(mm[a:b], dtype=np.uint16).copy()
        return mm[a:b].tobytes()

    def iter_samples(self, start: int = 0, stop: int | None = None) -> Iterator[dict]:
        """``{column: payload}`` for samples ``[start, stop)`` in dataset order."""
        mm, offs = self.open()
        for i in range(start, self.num_samples if stop is None else stop):
            yield {self.column: self.payload(mm, offs, i)}

    def payload_bytes(self, sample) -> int:
        v = sample[self.column] if isinstance(sample, dict) else sample
        return len(v) if isinstance(v, (bytes, bytearray)) else int(np.asarray(v).nbytes)

    def to_json(self) -> dict:
        return dict(self.__dict__)


def token_samples(tokens_mb: float) -> int:
    """Samples of 2,048 uint16 tokens in ``tokens_mb`` MB (10^6 bytes), at least 64."""
    return max(64, int(tokens_mb * 1e6) // (2 * TOKENS_PER_SAMPLE))


def make_tokens(workdir: str, tokens_mb: float, seed: int = 0) -> Workload:
    n = token_samples(tokens_mb)
    data = os.path.join(workdir, "tokens.bin")
    rng = np.random.default_rng(seed)
    with open(data, "wb") as f:
        for start in range(0, n, _CHUNK):
            k = min(_CHUNK, n - start)
            ((rng.zipf(1.2, size=k * TOKENS_PER_SAMPLE) - 1) % VOCAB).astype("<u2").tofile(f)
    offsets = os.path.join(workdir, "tokens.offsets.npy")
    step = 2 * TOKENS_PER_SAMPLE
    np.save(offsets, np.arange(n + 1, dtype=np.int64) * step)
    return Workload("tokens", "tokens", n, n * step, data, offsets, TOKENS_PER_SAMPLE)


def stdlib_files(limit: int | None = None) -> list[str]:
    """Every ``.py`` under the stdlib directory (site-packages excluded), sorted."""
    root = sysconfig.get_paths()["stdlib"]
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in ("site-packages", "dist-packages")]
        out.extend(os.path.relpath(os.path.join(dirpath, f), root)
                   for f in filenames if f.endswith(".py"))
    out.sort()
    out = out[:limit] if limit else out
    return [os.path.join(root, p) for p in out]


def make_text(workdir: str, limit: int | None = None) -> Workload:
    files = stdlib_files(limit)
    data = os.path.join(workdir, "text.bin")
    offs = [0]
    with open(data, "wb") as f:
        for path in files:
            with open(path, "rb") as src:
                b = src.read()
            f.write(b)
            offs.append(offs[-1] + len(b))
    offsets = os.path.join(workdir, "text.offsets.npy")
    np.save(offsets, np.asarray(offs, dtype=np.int64))
    with open(os.path.join(workdir, "text.files.json"), "w") as f:
        json.dump([os.path.relpath(p, sysconfig.get_paths()["stdlib"]) for p in files], f)
    return Workload("text", "text", len(files), offs[-1], data, offsets, None)


def describe(wl: Workload) -> dict:
    d = wl.to_json()
    d.pop("data"), d.pop("offsets")
    if wl.name == "tokens":
        d["generator"] = f"numpy default_rng(seed) zipf(1.2) - 1 mod {VOCAB}, uint16"
    else:
        d["source"] = sysconfig.get_paths()["stdlib"] + "/**/*.py (site-packages excluded), sorted"
    return d
