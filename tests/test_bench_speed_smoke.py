"""bench_speed.py runs end to end on a tiny workload (so the issue-12 harness cannot rot)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow(reason="~20-40 s on 2 shared cores: writes and reads 8 small datasets")
def test_bench_speed_tiny_run(tmp_path):
    out = tmp_path / "speed.json"
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "bench_speed.py"),
           "--tokens-mb", "1", "--binary-mb", "8", "--gather-mb", "1", "--text-files", "30",
           "--repeats", "1", "--corpora", "tokens,binary", "--out", str(out),
           "--tmp", str(tmp_path)]
    subprocess.run(cmd, check=True, timeout=300, capture_output=True)
    result = json.loads(out.read_text())
    tokens = result["zstd"]["tokens"]
    # The block-aware shuffle decompresses each block once; the figures are real numbers.
    assert 0.9 <= tokens["decompressions_per_block"] <= 1.1
    assert tokens["zstd/window"]["blocks_read"] >= tokens["zstd/block"]["blocks_read"]
    assert result["gather"]["w0/streamshard_int64"]["median"] > 0
    assert result["quality"]["tokens, 64 MB shards"]["random"]["distinct_shards_per_batch"] >= 1
