"""The end-to-end demo behind the README's first quick-start command (``streamshard demo``).

It uses a corpus every machine with Python has, the standard library's own ``.py`` files:
convert them (text, one sample per file, 2 worker processes) -> inspect -> verify -> read the
dataset back shuffled through ``StreamingDataLoader`` with 2 workers and print throughput ->
save the loader state mid-epoch, resume it in a fresh loader on another "world size" and check
that the resumed stream equals the uninterrupted one.

``streamshard demo`` (streamshard/cli.py) runs :func:`run` and passes its own entry point as
``cli``, so this module never imports the command line (no cli <-> demo import cycle).
"""

from __future__ import annotations

import json
import os
import sysconfig
import time
from typing import Callable, Sequence

from streamshard.testing import take
from streamshard.world import World


def _collate(samples: list[dict]) -> dict:
    """Text batches stay lists: default_collate would do the same, spelled out for the reader."""
    return {"path": [s["path"] for s in samples], "text": [s["text"] for s in samples]}


def stdlib_sources(root: str) -> list[str]:
    """Every ``.py`` file of the standard library, sorted; installed packages excluded."""
    out = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in ("site-packages", "dist-packages", "__pycache__"))
        out.extend(os.path.join(folder, f) for f in sorted(files) if f.endswith(".py"))
    return out


def _banner(text: str) -> None:
    print(f"\n== {text}", flush=True)


def _loader(path: str, *, rank: int, world_size: int, workers: int):
    from streamshard import StreamingDataLoader, StreamingDataset

    ds = StreamingDataset(path, global_batch_size=64, seed=2024, world=World(rank, world_size))
    kwargs = {"num_workers": workers, "collate_fn": _collate}
    if workers:
        kwargs["persistent_workers"] = True
    return StreamingDataLoader(ds, **kwargs)


def run(out: str, *, cli: Callable[[Sequence[str]], int], workers: int = 2,
        source: str | None = None) -> int:
    """Run the demo in the directory ``out``; ``cli(argv) -> exit code`` runs a ``streamshard``
    command line. Returns 0 when the resumed stream equals the uninterrupted one."""
    source = source or sysconfig.get_paths()["stdlib"]
    dataset = os.path.join(out, "stdlib-ds")
    _banner(f"convert {source} -> {dataset}")
    files = stdlib_sources(source) if os.path.isdir(source) else [source]
    print(f"{len(files)} files, {sum(os.path.getsize(f) for f in files) / 1e6:.1f} MB")
    code = cli(["convert", *files, dataset, "--format", "text", "--mode", "file",
                "--shard-size", "4MB", "--workers", str(workers), "--overwrite",
                # A few stdlib test files are deliberately not UTF-8: skip and count them.
                "--skip-errors"])
    if code:
        return code
    _banner("inspect")
    cli(["inspect", dataset, "--samples", "2"])
    _banner("verify")
    code = cli(["verify", dataset])
    if code:
        return code

    _banner(f"read one shuffled epoch through StreamingDataLoader ({workers} workers, batch 64)")
    loader = _loader(dataset, rank=0, world_size=1, workers=workers)
    start = time.perf_counter()
    samples = chars = 0
    for batch in loader:
        samples += len(batch["text"])
        chars += sum(len(t) for t in batch["text"])
    seconds = time.perf_counter() - start
    print(f"{samples} samples, {chars / 1e6:.1f} M characters in {seconds:.2f} s: "
          f"{samples / seconds:,.0f} samples/s, {chars / seconds / 1e6:.1f} MB/s of text")

    _banner("resume mid-epoch on a different world size")
    steps = loader.steps_per_epoch
    at = steps // 2
    reference = [b["path"] for b in take(_loader(dataset, rank=0, world_size=1, workers=0), steps)]
    first = _loader(dataset, rank=0, world_size=1, workers=0)
    take(first, at)
    state = json.loads(json.dumps(first.state_dict()))
    print(f"saved after {at} of {steps} steps: {json.dumps(state)}")
    # Two "ranks" of a 2-process job, resumed in this process: interleave their device batches.
    ranks = []
    for rank in range(2):
        resumed = _loader(dataset, rank=rank, world_size=2, workers=0)
        start = time.perf_counter()
        resumed.load_state_dict(state)
        first_batch = next(iter(resumed))
        if rank == 0:
            print(f"load_state_dict -> first batch: {(time.perf_counter() - start) * 1e3:.1f} ms")
        ranks.append([first_batch["path"]] + [b["path"] for b in take(resumed, steps - at - 1)])
    merged = []
    for step in range(steps - at):
        batch = [None] * 64
        batch[0::2], batch[1::2] = ranks[0][step], ranks[1][step]
        merged.append(batch)
    same = merged == reference[at:]
    print(f"resumed on 2 ranks == uninterrupted run on 1 rank: {same}")
    return 0 if same else 1
