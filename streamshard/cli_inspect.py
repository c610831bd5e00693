"""``streamshard inspect --json`` and ``--plot out.png``: the dataset's summary and figures
(:mod:`streamshard.stats`) as JSON, and as a PNG (:mod:`streamshard.plot`). The plain text view
stays in ``cli.py``; this module adds the options and the two outputs."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from streamshard.stats import DEFAULT_SAMPLES, dataset_figures


def add_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true",
                   help="print the summary and the figures as one JSON document")
    p.add_argument("--plot", metavar="OUT.png",
                   help="write a PNG: size / token length histograms per column, shard sizes, "
                        "compression ratio (needs matplotlib: pip install 'streamshard[plot]')")
    p.add_argument("--figure-samples", type=int, default=DEFAULT_SAMPLES, metavar="N",
                   help=f"samples read for the per-sample figures, evenly spaced (default "
                        f"{DEFAULT_SAMPLES}; all when the dataset is smaller)")


def wanted(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "json", False) or getattr(args, "plot", None))


def summary(dest: str, ds: Any) -> dict[str, Any]:
    idx = ds.index
    return {"dataset": dest, "fingerprint": idx.fingerprint, "samples": idx.num_samples,
            "shards": idx.num_shards, "shard_size": idx.shard_size, "block_size": idx.block_size,
            "compression": idx.compression or "none",
            "compression_level": idx.compression_level if idx.compression else None,
            "columns": ds.schema.to_json(), "metadata": idx.metadata}


def run(args: argparse.Namespace, ds: Any, preview: Any) -> None:
    """Write what ``--json`` / ``--plot`` ask for (the caller prints the text view otherwise)."""
    figures = dataset_figures(ds, max_samples=args.figure_samples)
    if args.plot:
        from streamshard.plot import plot_figures

        plot_figures(figures, args.plot, title=args.dest)
        if not args.json:
            print(f"plot written to {args.plot}")
    if args.json:
        doc = summary(args.dest, ds)
        doc["figures"] = figures
        if args.plot:
            doc["plot"] = args.plot
        doc["preview"] = [{name: preview(value) for name, value in ds[i].items()}
                          for i in range(min(max(args.samples, 0), len(ds)))]
        json.dump(doc, sys.stdout, indent=1, sort_keys=False, default=str)
        sys.stdout.write("\n")
