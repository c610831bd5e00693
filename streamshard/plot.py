"""``streamshard inspect --plot out.png``: the figures of :mod:`streamshard.stats` as one PNG.

One panel per variable-size column (the token length for array columns, the size in bytes for
the others), then the stored size of the shards and their compression ratio. matplotlib is an
optional extra (``pip install 'streamshard[plot]'``), imported only here, with the Agg backend
(no display needed).
"""

from __future__ import annotations

import math
import os
from typing import Any

from streamshard.errors import missing_dependency
from streamshard.sizes import format_size


def _pyplot():
    try:
        import matplotlib
    except ImportError as exc:
        raise missing_dependency("matplotlib", "plot", "inspect --plot") from exc
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _bars(ax: Any, summary: dict, title: str, xlabel: str, *, size_axis: bool = False) -> None:
    if not summary.get("count"):
        ax.set_title(title)
        ax.text(0.5, 0.5, "no values", ha="center", va="center", transform=ax.transAxes)
        return
    edges, counts = summary["histogram"]["edges"], summary["histogram"]["counts"]
    widths = [b - a for a, b in zip(edges, edges[1:])]
    ax.bar(edges[:-1], counts, width=widths, align="edge", color="#4C72B0", edgecolor="white",
           linewidth=0.5)
    ax.axvline(summary["p50"], color="#DD8452", linewidth=1.5, label=f"median {_fmt(summary['p50'], size_axis)}")
    ax.axvline(summary["p99"], color="#C44E52", linewidth=1, linestyle="--",
               label=f"p99 {_fmt(summary['p99'], size_axis)}")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel, fontsize=9)
    ax.set_ylabel("count", fontsize=9)
    ax.tick_params(labelsize=8)
    from matplotlib.ticker import MaxNLocator

    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize=8, frameon=True, framealpha=0.85, edgecolor="none")
    if summary["histogram"].get("integer_bins"):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if size_axis:
        ax.xaxis.set_major_formatter(_size_formatter())


def _fmt(value: float, size_axis: bool) -> str:
    return format_size(round(value)) if size_axis else f"{value:,.4g}"


def _size_formatter():
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(lambda v, _: format_size(round(v)) if v >= 0 else "")


def plot_figures(figures: dict, out: str, title: str) -> str:
    """Write the PNG of ``figures`` (from :func:`streamshard.stats.dataset_figures`) to ``out``
    (written to a temp name, then renamed); return ``out``."""
    plt = _pyplot()
    panels: list[tuple[dict, str, str, bool]] = []
    for name, col in figures["columns"].items():
        if "elements" in col:
            panels.append((col["elements"], f"{name} ({col['type']}): length per sample",
                           "elements (tokens) per sample", False))
        elif "bytes" in col:
            panels.append((col["bytes"], f"{name} ({col['type']}): size per sample",
                           "bytes per sample", True))
    shards = figures["shards"]
    comp = figures["compression"]
    panels.append((shards["stored_bytes"], f"shard size ({shards['count']:,} shards, target "
                   f"{format_size(shards['target_bytes'])})" if shards["target_bytes"] else
                   f"shard size ({shards['count']:,} shards)", "stored bytes per shard", True))
    panels.append((comp["per_shard"], f"compression ratio ({comp['codec']}, overall "
                   f"{comp['ratio']:.2f})", "raw / stored bytes per shard", False))
    cols = 2 if len(panels) <= 4 else 3
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.6 * rows), squeeze=False)
    for ax, (summary, panel_title, xlabel, size_axis) in zip(axes.flat, panels):
        _bars(ax, summary, panel_title, xlabel, size_axis=size_axis)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    sampled = figures["sampled"]
    note = "" if sampled == figures["samples"] else f" (per-sample panels: {sampled:,} evenly spaced)"
    fig.suptitle(f"{title}: {figures['samples']:,} samples{note}", fontsize=11)
    fig.tight_layout()
    out = os.fspath(out)
    directory = os.path.dirname(os.path.abspath(out))
    tmp = os.path.join(directory, f".{os.path.basename(out)}.tmp-{os.getpid()}.png")
    try:
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, out)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)
    return out
