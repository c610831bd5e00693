"""Speed-up of ``streamshard convert --tokenizer`` (tokenize + pack) with ``--workers`` N vs 1.

    python benchmarks/bench_convert_packing.py                       # ~1-2 min on 2 cores
    python benchmarks/bench_convert_packing.py --mb 64 --workers 1,2,4 --repeat 5

Input: JSONL documents of Zipf-distributed words (generated into a temp dir, so they sit in the
page cache) and a byte-level BPE ``tokenizer.json`` (vocabulary 8192) trained on its first MB by
the ``tokenizers`` package. Each run packs the corpus into 2048-token sequences (zstd level 3,
``--doc-boundaries``) into a fresh dataset. Runs of the worker counts are interleaved (1, 2, 1,
2, ...) so a change of machine load hits them alike; the median and the range of ``--repeat``
runs are printed per count with the speed-up of the medians against the first count, and the
1-minute load average before and after, and MB per CPU-second (this process and its workers:
the per-core rate, which load does not hide). The same is run for pre-tokenized input
(``--token-field``, Zipf ids). Every run's fingerprint must be the same (checked).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from streamshard.convert import convert  # noqa: E402
from streamshard.convert_packing import make_spec  # noqa: E402


def make_corpus(path: str, megabytes: float, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    syll = ["ka", "to", "ri", "men", "sa", "lo", "ve", "nu", "pi", "dor", "el", "an", "th", "qu"]
    vocab = ["".join(rng.choice(syll, rng.integers(1, 4))) for _ in range(20_000)]
    target, written = int(megabytes * 1e6), 0
    with open(path, "w") as f:
        while written < target:
            ids = np.minimum(rng.zipf(1.3, int(rng.integers(50, 600))), len(vocab)) - 1
            line = json.dumps({"text": " ".join(vocab[j] for j in ids)}) + "\n"
            f.write(line)
            written += len(line)


def make_ids(path: str, megabytes: float, seed: int = 0) -> None:
    """Pre-tokenized documents ``{"ids": [...]}`` (Zipf ids below 50257, 50-600 per document)."""
    rng = np.random.default_rng(seed)
    target, written = int(megabytes * 1e6), 0
    with open(path, "w") as f:
        while written < target:
            ids = np.minimum(rng.zipf(1.2, int(rng.integers(50, 600))), 50256)
            line = json.dumps({"ids": ids.tolist()}) + "\n"
            f.write(line)
            written += len(line)


def make_tokenizer(corpus: str, path: str) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    with open(corpus) as f:
        texts = [json.loads(line)["text"] for line, _ in zip(f, range(2000))]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=8192, special_tokens=["<unk>", "<|endoftext|>"]))
    tok.save(path)


def run_mode(mode: str, src: str, kwargs: dict, counts: list[int], args, tmp: str) -> None:
    load0 = os.getloadavg()[0]
    times: dict[int, list[float]] = {w: [] for w in counts}
    cpu: dict[int, list[float]] = {w: [] for w in counts}
    fingerprints = set()
    for r in range(args.repeat):
        for w in counts:
            dest = os.path.join(tmp, f"out-{w}-{r}")
            t0 = time.perf_counter()
            s = convert([src], dest, format="jsonl", workers=w, chunk_size=args.chunk_size,
                        packing=make_spec(seq_len=2048, doc_boundaries=True, **kwargs))
            times[w].append(time.perf_counter() - t0)
            cpu[w].append(s.cpu_seconds)
            fingerprints.add(s.fingerprint)
            shutil.rmtree(dest)
    assert len(fingerprints) == 1, f"worker counts gave different datasets: {fingerprints}"
    print(f"--{mode}: {s.counters['documents']:,} documents, {s.counters['tokens']:,} tokens, "
          f"{s.samples:,} sequences, {s.chunks} chunks; one fingerprint for every run")
    base = statistics.median(times[counts[0]])
    print(f"{'workers':>7} {'median s':>9} {'min-max s':>13} {'MB/s':>7} {'speed-up':>9} "
          f"{'MB/cpu-s':>9}")
    for w in counts:
        med = statistics.median(times[w])
        print(f"{w:>7} {med:>9.2f} {min(times[w]):>6.2f}-{max(times[w]):<6.2f} "
              f"{args.mb / med:>7.1f} {base / med:>8.2f}x "
              f"{args.mb / statistics.median(cpu[w]):>9.1f}")
    print(f"load(1 min) before {load0:.1f}, after {os.getloadavg()[0]:.1f}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mb", type=float, default=24, help="JSONL input size (MB)")
    p.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    p.add_argument("--chunk-size", default="2MB", help="chunk size (the unit of parallel work)")
    p.add_argument("--repeat", type=int, default=3, help="runs per worker count (median kept)")
    p.add_argument("--tmp", default=None, help="scratch directory (default: system temp)")
    args = p.parse_args(argv)
    counts = [int(w) for w in args.workers.split(",")]
    tmp = tempfile.mkdtemp(prefix="bench-pack-", dir=args.tmp)
    try:
        corpus, tok = os.path.join(tmp, "docs.jsonl"), os.path.join(tmp, "tokenizer.json")
        ids = os.path.join(tmp, "ids.jsonl")
        make_corpus(corpus, args.mb)
        make_tokenizer(corpus, tok)
        make_ids(ids, args.mb)
        print(f"cpus={os.cpu_count()} jsonl={os.path.getsize(corpus) / 1e6:.0f} MB each "
              f"chunk={args.chunk_size} seq_len=2048 zstd-3")
        for mode, src, kwargs in (("tokenizer", corpus, {"tokenizer": tok}),
                                  ("token-field", ids, {"token_field": "ids", "eod_id": 0})):
            run_mode(mode, src, kwargs, counts, args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
