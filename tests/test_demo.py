"""The README's first quick-start command, as a user runs it: `streamshard demo`."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow(reason="converts and reads the whole standard library through the real CLI in a subprocess")
def test_demo_runs_end_to_end_on_the_stdlib(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "streamshard.cli", "demo", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    out = proc.stdout
    assert "ok: " in out and "samples checked" in out  # verify passed
    assert "samples/s" in out  # throughput printed
    assert "resumed on 2 ranks == uninterrupted run on 1 rank: True" in out
    assert os.path.exists(tmp_path / "stdlib-ds" / "index.json")
