"""Plot of ``peers.json``: shuffled epoch throughput and resume time per library (matplotlib Agg).

    python benchmarks/plot.py benchmarks/results/peers.json [out.png]
"""

from __future__ import annotations

import json
import sys


def _val(res: dict, lib: str, phase: str, key: str):
    v = res.get(lib, {}).get("phases", {}).get(phase, {}).get(key)
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    w = report["workers"]
    wls = list(report["results"])
    fig, axes = plt.subplots(1, len(wls) + 1, figsize=(6 * (len(wls) + 1), 4.8))
    axes = np.atleast_1d(axes)
    for ax, wl in zip(axes, wls):
        res = report["results"][wl]
        libs = list(res)
        x = np.arange(len(libs))
        for j, (nw, color) in enumerate(((0, "#4c72b0"), (w, "#dd8452"))):
            vals = [_val(res, lib, f"epoch_shuffled_w{nw}", "samples_s") or 0 for lib in libs]
            bars = ax.bar(x + (j - 0.5) * 0.4, vals, 0.4, label=f"{nw} workers", color=color)
            for b, v in zip(bars, vals):
                ax.text(b.get_x() + b.get_width() / 2, v, "n/a" if not v else f"{v:,.0f}",
                        ha="center", va="bottom", fontsize=7, rotation=90)
        ax.set_ylim(0, 1.3 * max([1] + [p.get_height() for p in ax.patches]))  # room for labels
        ax.set_xticks(x, libs, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("samples/s (shuffled epoch)")
        ax.set_title(f"{wl}: shuffled epoch, batch {report['batch_size']}")
        ax.legend(fontsize=8)
    ax = axes[-1]
    libs = list(dict.fromkeys(lib for wl in wls for lib in report["results"][wl]))
    x = np.arange(len(libs))
    for j, wl in enumerate(wls):
        res = report["results"][wl]
        vals = [_val(res, lib, "resume", "seconds") for lib in libs]
        bars = ax.bar(x + (j - (len(wls) - 1) / 2) * 0.4, [v or 0 for v in vals], 0.4, label=wl)
        for b, v, lib in zip(bars, vals, libs):
            kind = res.get(lib, {}).get("phases", {}).get("resume", {}).get("kind", "")
            ax.text(b.get_x() + b.get_width() / 2, v or 1e-4,
                    "n/a" if v is None else f"{v:.3g}s" + ("" if kind == "state" else f" {kind}"),
                    ha="center", va="bottom", fontsize=7, rotation=90)
    ax.set_yscale("log")
    ax.set_ylim(top=20 * max([1e-3] + [p.get_height() for p in ax.patches]))
    ax.set_xticks(x, libs, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("seconds, restore at 50% -> first batch (log)")
    ax.set_title(f"resume ({w} workers; replay/seek = no saved state)")
    ax.legend(fontsize=8)
    m = report["machine"]
    fig.suptitle(f"streamshard vs peers, {m['cpu']} x{m['cores']}, torch {m['torch']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        rep = json.load(f)
    plot(rep, sys.argv[2] if len(sys.argv) > 2 else sys.argv[1].replace(".json", ".png"))
