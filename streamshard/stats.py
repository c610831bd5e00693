"""Figures of a dataset for ``streamshard inspect --json`` / ``--plot``: sizes per column, token
lengths, shard sizes and compression ratios. No torch, no plotting here (see ``plot.py``).

Per-shard figures come from the index (every shard, no data read). Per-sample figures are taken
over at most ``max_samples`` samples spaced evenly over the dataset (all of them when it is
smaller), so their cost is bounded whatever the dataset's size; ``sampled`` says how many.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from streamshard.errors import ConfigError

DEFAULT_SAMPLES = 2000
BINS = 30


def _summary(values: np.ndarray, unit: str, bins: int = BINS) -> dict[str, Any]:
    """Count, min/max/mean, percentiles and a histogram of ``values`` (empty-safe)."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return {"unit": unit, "count": 0}
    lo, hi = float(values.min()), float(values.max())
    integer_bins = bool(np.all(values == np.round(values)) and hi - lo + 1 <= bins)
    if integer_bins:  # few distinct integers: one bin per integer, centred on it
        counts, edges = np.histogram(values, bins=np.arange(lo - 0.5, hi + 1.0))
    else:
        counts, edges = np.histogram(values, bins=bins, range=(lo, hi))
    p50, p90, p99 = np.percentile(values, [50, 90, 99]).tolist()
    return {"unit": unit, "count": int(values.size), "min": lo, "max": hi,
            "mean": float(values.mean()), "p50": p50, "p90": p90, "p99": p99,
            "histogram": {"edges": [float(e) for e in edges], "counts": counts.tolist(),
                          "integer_bins": integer_bins}}


def _measure(value: Any, kind: str) -> tuple[int, int | None]:
    """``(bytes, elements)`` of one decoded value; ``elements`` is set for arrays only."""
    if kind == "array":
        return int(value.nbytes), int(value.size)
    if kind == "str":
        return len(value.encode("utf-8")), None
    if kind == "json":
        return len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()), None
    return len(value), None  # bytes, image, audio


def sample_ids(n: int, max_samples: int) -> np.ndarray:
    """At most ``max_samples`` ids spread evenly over ``[0, n)`` (all when ``n`` is smaller)."""
    if not isinstance(max_samples, int) or max_samples < 0:
        raise ConfigError(f"max_samples must be a non-negative int, got {max_samples!r}")
    if n <= max_samples:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, max_samples).round().astype(np.int64))


def dataset_figures(ds: Any, max_samples: int = DEFAULT_SAMPLES) -> dict[str, Any]:
    """The figures of an open dataset (``streamshard.open_dataset``) as JSON-able data:
    ``columns`` (per variable-size column: ``bytes`` and, for arrays, ``elements`` = token
    length of a 1-D token column), ``shards`` (stored and raw bytes, samples), ``compression``
    (overall ratio and per-shard ratios)."""
    idx = ds.index
    stored, raw, counts = idx.shards.bytes, idx.shards.raw_bytes, idx.shards.samples
    ids = sample_ids(len(ds), max_samples)
    variable = {n: ct for n, ct in ds.schema.columns.items() if ct.fixed_size is None}
    sizes: dict[str, list[int]] = {n: [] for n in variable}
    elements: dict[str, list[int]] = {n: [] for n, ct in variable.items() if ct.kind == "array"}
    for i in ids.tolist():
        sample = ds[i]
        for name, ct in variable.items():
            nbytes, nelem = _measure(sample[name], ct.kind)
            sizes[name].append(nbytes)
            if nelem is not None:
                elements[name].append(nelem)
    columns: dict[str, Any] = {}
    for name, ct in ds.schema.columns.items():
        entry: dict[str, Any] = {"type": ct.text}
        if ct.fixed_size is not None:
            entry["fixed_bytes"] = ct.fixed_size
        else:
            entry["bytes"] = _summary(np.array(sizes[name]), "bytes")
            if name in elements:
                entry["elements"] = _summary(np.array(elements[name]), "elements")
        columns[name] = entry
    total_raw, total_stored = int(raw.sum()), int(stored.sum())
    ratios = raw / np.maximum(stored, 1)
    return {
        "samples": len(ds), "sampled": int(ids.size),
        "columns": columns,
        "shards": {"count": len(idx.shards), "stored_bytes": _summary(stored, "bytes"),
                   "raw_bytes": _summary(raw, "bytes"), "samples": _summary(counts, "samples"),
                   "target_bytes": idx.shard_size},
        "compression": {"codec": idx.compression or "none", "raw_bytes": total_raw,
                        "stored_bytes": total_stored,
                        "ratio": total_raw / total_stored if total_stored else 1.0,
                        "per_shard": _summary(ratios, "ratio")},
    }
