"""The Ray sink module imports ray only where the sink is used: a Spark worker importing
``write_part`` must not pay ``import ray.data`` (~1 s here), and without ray the sink still says
what to install. Runs in a fresh interpreter (this one may have imported ray already)."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = r"""
import sys
import streamshard.converters.ray_sink as rs
assert "ray" not in sys.modules, "importing ray_sink imported ray"

# the engine-neutral part writer works without ray
from streamshard import open_dataset
n = rs.write_part([{"id": 1}, {"id": 2}], sys.argv[1], rs.part_name(0), {"id": "int64"})
assert n == 2 and len(open_dataset(sys.argv[1] + "/" + rs.part_name(0))) == 2
assert "ray" not in sys.modules, "write_part imported ray"

sys.modules["ray"] = None  # from here on ray is not importable
from streamshard.errors import MissingDependencyError
from streamshard.converters.ray_sink import StreamshardDatasink
assert StreamshardDatasink is rs.StreamshardDatasink and "StreamshardDatasink" in dir(rs)
for make in (lambda: StreamshardDatasink("x", columns={"a": "str"}),
             lambda: rs.write_streamshard(None, "x", columns={"a": "str"})):
    try:
        make()
    except MissingDependencyError as exc:
        assert "pip install 'streamshard[ray]'" in str(exc), exc
    else:
        raise AssertionError("no MissingDependencyError without ray")
print("ok")
"""


def test_ray_is_imported_only_by_the_sink(tmp_path):
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "dest")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
