"""Tokens wasted by load-time packing and token-budget buckets, against global greedy packers.

Run: ``python benchmarks/bench_packing.py [--steps 64]`` (pure: the sampler, the pack-window
plan and the packers; no shard is read, document lengths come from an array). A realistic
1,000-GPU shape: lognormal document lengths (median 500 tokens, sigma 1.1, clipped to
[1, 32768]: mean ~920), ``G = 16384`` documents per step (~15M tokens: about 3.6 rows of 4,096
tokens per rank per step at 1,024 ranks), 2,048 shards of 512 documents, ``seq_len = 4096``.

Printed per setting: *waste* = padding / token slots served (packing: pad tokens in the rows;
token budget: pad tokens in the buckets), *truncated* = tokens dropped / tokens, and for
packing the spread of rows per rank per step at 1,024 ranks (8 per node). Baselines, over the
whole simulated epoch: concatenate-and-cut (what ``group_texts``-style offline packing does: one
partial row in all), best-fit decreasing of whole documents, and one global length sort cut by
the same budget. Asserts nothing.
"""

from __future__ import annotations

import argparse
import bisect
import os
import sys
import time
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from streamshard.packing import Packing, TokenBudget, buckets, deal, pack  # noqa: E402
from streamshard.packplan import Planner  # noqa: E402
from streamshard.sampler import EpochOrder, Ledgers, SampleSequence  # noqa: E402
from streamshard.sampler.order import default_lanes  # noqa: E402
from streamshard.world import World  # noqa: E402

SHARDS, PER_SHARD, G, SEQ = 2048, 512, 16384, 4096


def lengths_of(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(np.log(500), 1.1, n), 1, 32768).astype(np.int64)


def sequence(group: int) -> SampleSequence:
    order = EpochOrder([PER_SHARD] * SHARDS, seed=3, lanes=default_lanes(SHARDS, G // group))
    return SampleSequence(order, global_batch_size=G)


def planner(seq: SampleSequence, cfg, world: World) -> Planner:
    return Planner(SimpleNamespace(sequence=seq, steps_per_epoch=seq.steps_per_epoch, world=world,
                                   packing=cfg, datasets=[None], is_remote=lambda s: False))


def window_lengths(seq, cfg, lengths, steps: int):
    """Per pool: the documents' lengths of every window (D = 1: all windows)."""
    plan = planner(seq, cfg, World(0, 1))
    for first in range(0, steps, cfg.pool):
        key = plan.key(first, Ledgers())
        ids = np.asarray(key.sample_ids).reshape(len(key.windows), key.docs)
        yield first, key, lengths[ids]


def packing_waste(seq, cfg: Packing, lengths, steps: int) -> tuple[float, dict]:
    """(padding / slots, rows of each (pool, window))."""
    slots = pad = 0
    per_window = {}
    for first, key, per in window_lengths(seq, cfg, lengths, steps):
        for w, lens in zip(key.windows, per):
            if cfg.split_documents:  # rows = ceil(tokens / L): no need to build them
                rows = -(-int(lens.sum()) // SEQ)
            else:
                rows = len(pack([np.zeros(n, np.uint8) for n in lens.tolist()], cfg))
            per_window[(first, w)] = rows
            slots += rows * SEQ
            pad += rows * SEQ - int(lens.sum())
    return pad / slots, per_window


def rows_per_rank(seq, cfg: Packing, per_window: dict, steps: int, world_size=1024, local=8):
    """Rows each rank gets per step at ``world_size`` ranks: (mean, min, max) over a sample of
    ranks x every step."""
    counts = []
    for rank in range(0, world_size, 37):  # a sample of ranks, every node type
        plan = planner(seq, cfg, World(rank, world_size, rank % local, local))
        for first in range(0, steps, cfg.pool):
            key = plan.key(first, Ledgers())
            for part in range(key.parts):
                counts.append(sum(np.diff(deal(per_window[(first, w)], key.parts, part))[0]
                                  for w in key.windows))
    counts = np.asarray(counts)
    return counts.mean(), counts.min(), counts.max()


def budget_waste(seq, cfg: TokenBudget, lengths, steps: int, sort: bool = True) -> tuple[float, float]:
    slots = pad = cut = total = 0
    for _, _, per_window in window_lengths(seq, cfg, lengths, steps):
        for lens in per_window:
            kept = np.minimum(lens, cfg.max_tokens)
            groups = buckets(lens, cfg.max_tokens) if sort else _unsorted(kept, cfg.max_tokens)
            for idx in groups:
                slots += len(idx) * int(kept[idx].max())
                pad += len(idx) * int(kept[idx].max()) - int(kept[idx].sum())
            cut += int((lens - kept).sum())
            total += int(lens.sum())
    return pad / slots, cut / total


def _unsorted(kept: np.ndarray, budget: int) -> list[np.ndarray]:
    """The same greedy cut in position order (no length sort): what bucketing saves."""
    out, cur, longest = [], [], 0
    for i, n in enumerate(kept.tolist()):
        if cur and (len(cur) + 1) * max(longest, n) > budget:
            out.append(np.array(cur))
            cur, longest = [], 0
        cur.append(i)
        longest = max(longest, n)
    return out + ([np.array(cur)] if cur else [])


def best_fit_decreasing(sizes: np.ndarray, capacity: int) -> int:
    """Bins used by best-fit decreasing (whole items): the global no-split baseline."""
    spaces: list[int] = []  # sorted remaining space of open bins
    bins = 0
    for s in np.sort(sizes)[::-1].tolist():
        i = bisect.bisect_left(spaces, s)
        if i < len(spaces):
            space = spaces.pop(i) - s
        else:
            bins, space = bins + 1, capacity - s
        if space:
            bisect.insort(spaces, space)
    return bins


def loader_throughput(repeats: int = 3) -> None:
    """Tokens/s of ``StreamingDataLoader`` (0 workers) over one epoch of a real zstd dataset of
    lognormal documents (20,000, mean ~920 tokens): packed, token budget, and the documents
    unpacked (the per-sample path, lists of arrays), median and range of ``repeats`` fresh
    loaders each, interleaved."""
    import tempfile

    from streamshard import StreamingDataLoader, StreamingDataset, World
    from streamshard.writer import ShardWriter

    root = tempfile.mkdtemp(prefix="bench-packing-")
    lengths = lengths_of(20_000, seed=1)
    with ShardWriter(root, columns={"tokens": "uint16[]"}, shard_size="4MB") as writer:
        for n in lengths.tolist():
            writer.write({"tokens": np.arange(n, dtype=np.uint16)})
    g = 256
    settings = {
        "unpacked": dict(collate_fn=lambda samples: samples),
        "packed (group 16, pool 16)": dict(packing=Packing(seq_len=SEQ, group=16, pool=16)),
        "token budget (16384; 16, 16)": dict(packing=TokenBudget(max_tokens=16384, group=16, pool=16)),
    }
    times: dict[str, list[float]] = {name: [] for name in settings}
    for _ in range(repeats):
        for name, kw in settings.items():
            kw = dict(kw)
            collate = kw.pop("collate_fn", None)
            ds = StreamingDataset(root, global_batch_size=g, seed=1, world=World(), **kw)
            loader = StreamingDataLoader(ds, collate_fn=collate) if collate else StreamingDataLoader(ds)
            t0 = time.perf_counter()
            for _batch in loader:
                pass
            times[name].append(time.perf_counter() - t0)
    served = int(lengths.sum())  # every token of the epoch's G * S documents, about
    for name, ts in times.items():
        rates = sorted(served / t for t in ts)
        print(f"{name}: {rates[len(rates) // 2] / 1e6:.1f} M tokens/s "
              f"({rates[0] / 1e6:.1f}-{rates[-1] / 1e6:.1f}), load {os.getloadavg()[0]:.1f}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=64)  # one epoch: 64 steps
    parser.add_argument("--loader", action="store_true", help="loader tokens/s only")
    args = parser.parse_args()
    if args.loader:
        loader_throughput()
        return
    steps = args.steps
    t0 = time.perf_counter()
    lengths = lengths_of(SHARDS * PER_SHARD)
    epoch_docs = np.concatenate([sequence(1).global_batch(s)[1] for s in range(steps)])
    tokens = lengths[epoch_docs]
    print(f"documents {len(tokens):,} over {steps} steps of G={G}; tokens {tokens.sum():,}; "
          f"mean {tokens.mean():.0f}, median {np.median(tokens):.0f}, p99 {np.percentile(tokens, 99):.0f}; "
          f"seq_len {SEQ}; load {os.getloadavg()[0]:.1f}")
    rows = -(-int(tokens.sum()) // SEQ)
    print(f"global concatenate-and-cut: waste {(rows * SEQ - tokens.sum()) / (rows * SEQ):.4%}")
    pieces = np.concatenate([np.minimum(SEQ, n - np.arange(0, n, SEQ)) for n in tokens.tolist()])
    bins = best_fit_decreasing(pieces, SEQ)
    print(f"global best-fit decreasing (whole documents, longer ones in {SEQ}-token pieces): "
          f"waste {(bins * SEQ - tokens.sum()) / (bins * SEQ):.4%}")
    print("\n| packing | group | pool | docs/window | waste | rows per rank per step at 1,024 ranks (mean, min-max) |")
    print("|---|---|---|---|---|---|")
    for split, group, pool in [(True, 1, 1), (True, 16, 1), (True, 1, 16), (True, 16, 4),
                               (True, 1, 64), (True, 16, 16), (True, 16, 64), (False, 1, 64),
                               (False, 16, 16)]:
        if pool > steps:
            continue
        cfg = Packing(seq_len=SEQ, group=group, pool=pool, split_documents=split)
        seq = sequence(group)
        waste, per_window = packing_waste(seq, cfg, lengths, steps)
        mean, lo, hi = rows_per_rank(seq, cfg, per_window, steps)
        print(f"| {'split' if split else 'whole (FFD)'} | {group} | {pool} | {group * pool} | "
              f"{waste:.2%} | {mean:.2f} ({lo}-{hi}) |")
    budget = 16384
    kept = np.minimum(tokens, budget)
    order = np.argsort(kept, kind="stable")
    glob = buckets(tokens, budget)
    g_slots = sum(len(i) * int(kept[i].max()) for i in glob)
    print(f"\ntoken budget {budget}: global length sort, cut greedily: waste "
          f"{(g_slots - kept.sum()) / g_slots:.2%} ({len(order):,} documents)")
    print("| token budget | group | pool | docs/window | waste (sorted) | waste (unsorted, same cut) | truncated |")
    print("|---|---|---|---|---|---|---|")
    for group, pool in [(16, 1), (16, 4), (16, 16), (1, 64), (16, 64)]:
        if pool > steps:
            continue
        cfg = TokenBudget(max_tokens=budget, group=group, pool=pool)
        seq = sequence(group)
        waste, cut = budget_waste(seq, cfg, lengths, steps)
        unsorted, _ = budget_waste(seq, cfg, lengths, steps, sort=False)
        print(f"| {budget} | {group} | {pool} | {group * pool} | {waste:.2%} | {unsorted:.2%} | {cut:.3%} |")
    print(f"\n{time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
