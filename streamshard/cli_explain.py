"""``streamshard explain``: which samples global batches read, from a loader state alone.

    streamshard explain DATASET [DATASET ...] --state STATE.json --steps 1200-1210 \\
        [--show text|tokens] [--tokenizer tokenizer.json] [--world-size D] [--json]

``STATE.json`` is a loader state (``loader.state_dict()`` as JSON) or a checkpoint's
``meta.json`` (its ``loader`` entry is used). DATASETs are the run's streams, in order. Without
``--show`` or key columns nothing but the indexes is read.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from streamshard.errors import ConfigError, InputError

STATE_LIMIT = 64 << 20  # a loader state is a few KiB; a ledger of 10^5 entries is a few MiB


def read_state(path: str) -> tuple[dict, dict | None]:
    """``(loader state, container)`` from a state file or a checkpoint's meta.json (untrusted:
    size-bounded, JSON only). ``container`` is the meta.json document, None for a plain state."""
    try:
        size = os.path.getsize(path)
        if size > STATE_LIMIT:
            raise InputError(f"{path}: {size:,} bytes is too large for a loader state "
                             f"(limit {STATE_LIMIT:,})")
        with open(path, "rb") as f:
            doc = json.loads(f.read())
    except FileNotFoundError:
        raise InputError(f"{path}: no such state file") from None
    except ValueError as e:
        raise InputError(f"{path}: not JSON ({e})") from None
    if isinstance(doc, dict) and "sequence" in doc:
        return doc, None
    if isinstance(doc, dict) and "loader" in doc:
        loader = doc["loader"]
        loader = json.loads(loader) if isinstance(loader, str) else loader
        if isinstance(loader, dict) and "sequence" in loader:
            return loader, doc
    raise InputError(f"{path}: neither a loader state (no 'sequence' key) nor a checkpoint "
                     f"meta.json with a 'loader' entry")


def parse_steps(text: str) -> tuple[int, int]:
    """``"1200"`` -> (1200, 1201); ``"1200-1210"`` -> (1200, 1211): inclusive, like the CLI."""
    try:
        a, _, b = text.partition("-")
        start, stop = int(a), int(b or a) + 1
    except ValueError:
        raise ConfigError(f"--steps must be N or A-B (inclusive), got {text!r}") from None
    if start < 0 or stop <= start:
        raise ConfigError(f"--steps must satisfy 0 <= A <= B, got {text!r}")
    return start, stop


def add_explain(sub: Any) -> None:
    p = sub.add_parser("explain", help="list the samples of global batches from a loader state",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("datasets", nargs="+", metavar="DATASET", help="the run's streams, in order")
    p.add_argument("--state", required=True, help="loader state JSON or a checkpoint's meta.json")
    p.add_argument("--steps", help="absolute data steps N or A-B inclusive (default: the state's "
                                   "next step)")
    p.add_argument("--show", choices=("text", "tokens"), help="preview each sample: its text "
                   "columns, or its token columns (decoded with --tokenizer)")
    p.add_argument("--tokenizer", help="Hugging Face tokenizer.json to decode tokens with")
    p.add_argument("--world-size", type=int, help="also say which rank reads each sample")
    p.add_argument("--no-keys", action="store_true", help="do not read id/path columns (index only)")
    p.add_argument("--json", action="store_true", help="one JSON object per step")
    p.set_defaults(func=cmd_explain)


def cmd_explain(args: argparse.Namespace) -> int:
    from streamshard.explain import samples_at, sequence_from_state
    from streamshard.reader import open_dataset

    state, _ = read_state(args.state)
    datasets = [open_dataset(d) for d in args.datasets]
    seq, next_step = sequence_from_state(state, datasets)
    start, stop = parse_steps(args.steps) if args.steps else (next_step, next_step + 1)
    if args.world_size is not None and args.world_size < 1:
        raise ConfigError(f"--world-size must be >= 1, got {args.world_size}")
    decode = _decoder(args.tokenizer) if args.tokenizer else None
    skipped = dict.fromkeys(range(start, stop), True)
    for step in seq.served_steps(start, stop):
        skipped[step] = False
    for step in range(start, stop):
        rows = [] if skipped[step] else samples_at(seq, datasets, step, world_size=args.world_size,
                                                    keys=not args.no_keys)
        previews = [_preview(datasets[r.stream], r.sample_id, args.show, decode) if args.show else None
                    for r in rows]
        if args.json:
            out = {"step": step, "epoch": step // seq.steps_per_epoch, "skipped": skipped[step],
                   "samples": [{**r.to_json(), **({"preview": p} if p is not None else {})}
                               for r, p in zip(rows, previews)]}
            print(json.dumps(out, default=str))
            continue
        head = f"step {step} (epoch {step // seq.steps_per_epoch})"
        print(head + (": skipped (skip ledger)" if skipped[step] else f": {len(rows)} samples"))
        for r, p in zip(rows, previews):
            where = f"{r.shard_file}#{r.offset}"
            rank = f" rank {r.rank}" if r.rank is not None else ""
            keys = " " + " ".join(f"{k}={v}" for k, v in r.keys.items()) if r.keys else ""
            fill = f" (fills quarantined {r.replaces[0]}:{r.replaces[1]})" if r.filled else ""
            print(f"  [{r.index:>4}] stream {r.stream} sample {r.sample_id} {where}{rank}{keys}{fill}")
            if p is not None:
                print(f"         {p}")
    sys.stdout.flush()
    return 0


def _decoder(path: str):
    from streamshard.converters.packing import load_tokenizer

    tok = load_tokenizer(path)
    return lambda ids: tok.decode([int(i) for i in ids], skip_special_tokens=False)


def _preview(ds, sample_id: int, show: str, decode) -> str:
    import numpy as np

    from streamshard.preview import preview

    item = ds[sample_id]
    parts = []
    for name, value in item.items():
        if show == "text" and isinstance(value, str):
            parts.append(f"{name}={preview(value)}")
        elif show == "tokens" and isinstance(value, np.ndarray) and value.dtype.kind in "iu":
            if decode is not None:
                parts.append(f"{name}={preview(decode(value.ravel().tolist()))}")
            else:
                parts.append(f"{name}={preview(value)}")
    return "; ".join(parts) if parts else f"(no {show} column)"
