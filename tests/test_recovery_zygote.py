"""The warm standby (zygote) that in-process restart forks replacement ranks from: it runs only the
script's imports, each start is a fork that runs the script as ``__main__`` with its arguments, exit
codes and signals come back as Popen reports them, and a zygote that cannot serve falls back to cold
starts instead of losing a start."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from streamshard.recovery import zygote
from streamshard.recovery.standby import ENV_ZYGOTE, Standby

ROOT = Path(__file__).resolve().parents[1]


def script(tmp_path: Path, body: str) -> Path:
    p = tmp_path / "train.py"
    p.write_text(textwrap.dedent(body))
    return p


SCRIPT = """
    import json
    import os
    import sys
    from pathlib import Path

    Path(sys.argv[1] if len(sys.argv) > 1 else "never").with_suffix(".toplevel").write_text(str(os.getpid()))

    def main():
        out = Path(sys.argv[1])
        out.write_text(json.dumps({"name": __name__, "argv": sys.argv[1:], "pid": os.getpid(),
                                   "json_preloaded": "json" in sys.modules}))
        if sys.argv[2] == "sleep":
            import time
            time.sleep(60)
        return int(sys.argv[2])

    if __name__ == "__main__":
        sys.exit(main())
"""


def env(**kw) -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT), **kw)


def test_preload_runs_imports_only(tmp_path):
    p = script(tmp_path, SCRIPT)
    names = [type(n).__name__ for n in zygote.import_statements(str(p))]
    assert names == ["Import", "Import", "Import", "ImportFrom"]
    assert zygote.preload(str(p)) == []
    assert not list(tmp_path.glob("*.toplevel"))  # the top-level write did not run in the standby
    bad = script(tmp_path, "import streamshard_no_such_module\nfrom os import path\n")
    (failed,) = zygote.preload(str(bad))
    assert failed.startswith("line 1: ModuleNotFoundError")
    assert zygote.unsafe_to_fork() is None  # this test process: no CUDA, no process group


def test_each_start_is_a_fork_running_the_script_as_main(tmp_path):
    p = script(tmp_path, SCRIPT)
    out = tmp_path / "out.json"
    sb = Standby.start([str(p), str(out), "7"], env())
    try:
        assert sb.warm and sb.ready_s is not None
        first = sb.spawn()
        assert first.wait(timeout=30) == 7
        import json

        got = json.loads(out.read_text())
        assert got == {"name": "__main__", "argv": [str(out), "7"], "pid": first.pid, "json_preloaded": True}
        assert first.pid != sb.proc.pid and (tmp_path / "out.toplevel").read_text() == str(first.pid)
        second = sb.spawn()  # the same standby serves the next start
        assert second.wait(timeout=30) == 7 and second.pid != first.pid
    finally:
        sb.close()
    assert sb.proc is None


def test_a_killed_rank_reports_the_signal_and_the_standby_serves_again(tmp_path):
    p = script(tmp_path, SCRIPT)
    out = tmp_path / "out.json"
    sb = Standby.start([str(p), str(out), "sleep"], env())
    try:
        child = sb.spawn()
        for _ in range(300):  # bounded: until the child is inside main()
            if out.exists():
                break
            child.wait(timeout=0.05)
        assert child.wait(timeout=0.01) is None  # still running
        child.kill()
        assert child.wait(timeout=30) == -signal.SIGKILL
        sb.lost(child)
        assert sb.warm  # a dead rank is not a dead zygote
        os.kill(sb.proc.pid, signal.SIGKILL)  # now the zygote dies: the next start is cold, not lost
        sb.proc.wait()
        again = sb.spawn()
        assert isinstance(again, subprocess.Popen) and not sb.warm and "fork answered" in sb.why_cold
        again.kill()
        assert again.wait(timeout=30) == -signal.SIGKILL
    finally:
        sb.close()


def test_disabled_or_refusing_zygote_starts_cold(tmp_path):
    p = script(tmp_path, SCRIPT)
    out = tmp_path / "out.json"
    sb = Standby.start([str(p), str(out), "3"], env(**{ENV_ZYGOTE: "0"}))
    assert not sb.warm and sb.proc is None
    child = sb.spawn()
    assert isinstance(child, subprocess.Popen) and child.wait(timeout=30) == 3
    # an import that joins a process group makes the fork unsafe: the zygote refuses
    (tmp_path / "joins_pg.py").write_text(textwrap.dedent("""
        import torch.distributed as dist
        from datetime import timedelta
        store = dist.HashStore()
        dist.init_process_group("gloo", store=store, rank=0, world_size=1, timeout=timedelta(seconds=30))
    """))
    bad = script(tmp_path, "import joins_pg\nimport sys\nsys.exit(5)\n")
    sb = Standby.start([str(bad)], env())
    assert not sb.warm and "process group" in sb.why_cold and sb.proc is None
