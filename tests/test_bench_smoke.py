"""The peer benchmark's harness runs end to end on a ~2 MB workload (streamshard + memmap paths),
so benchmarks/bench_peers.py can't rot. Figures are not checked: only that every phase ran."""

from __future__ import annotations

import importlib.util
import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_bench():
    spec = importlib.util.spec_from_file_location(
        "bench_peers", os.path.join(ROOT, "benchmarks", "bench_peers.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_peers_smoke(tmp_path, capsys):
    bench = _load_bench()
    out = tmp_path / "results"
    rc = bench.main(["--tokens-mb", "2", "--text-files", "40", "--reads", "50", "--no-isolate",
                     "--no-plot", "--min-epoch-s", "0", "--libs", "memmap,streamshard-none,streamshard-zstd",
                     "--out", str(out), "--tmp", str(tmp_path)])
    assert rc == 0
    report = json.loads((out / "peers.json").read_text())
    phases = {"convert", "random", "epoch_shuffled_w0", "epoch_shuffled_w2",
              "epoch_sequential_w0", "epoch_sequential_w2", "resume"}
    for wl in ("tokens", "text"):
        assert report["workloads"][wl]["num_samples"] > 0
        for lib in ("memmap", "streamshard-none", "streamshard-zstd"):
            got = report["results"][wl][lib]["phases"]
            assert set(got) == phases, (wl, lib, set(got))
            assert not [k for k, v in got.items() if "error" in v], (wl, lib, got)
            assert got["resume"]["equal"] is True, (wl, lib, got["resume"])
            n = report["workloads"][wl]["num_samples"] // 32 * 32
            assert got["epoch_shuffled_w0"]["samples"] == n, (wl, lib)
        assert report["ratios"][wl]["streamshard-none"]["memmap"]["shuffled_w0_samples_s"] > 0
    assert [p for p in os.listdir(tmp_path) if p.startswith("bench-peers-")] == []  # temp removed
    assert "streamshard advantage" in capsys.readouterr().out
