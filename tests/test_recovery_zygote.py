"""The warm standby (zygote) that in-process restart forks ranks from: it runs only the script's
imports, each start is a fork that runs the script as ``__main__`` with the keeper's arguments,
environment, directory and streams; exit codes and signals come back as Popen reports them; a zygote
that refuses or dies falls back to cold starts instead of losing a start."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from streamshard.recovery import zygote
from streamshard.recovery.standby import ENV_ZYGOTE, Forked, Standby

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
    import json
    import os
    import sys
    from pathlib import Path

    Path(sys.argv[1]).with_suffix(".toplevel").write_text(str(os.getpid()))

    def main():
        out = Path(sys.argv[1])
        mode = out.with_suffix(".mode").read_text()
        print("hello from", os.getpid())
        out.write_text(json.dumps({"name": __name__, "argv": sys.argv[1:], "pid": os.getpid(), "cwd": os.getcwd(),
                                   "env": os.environ.get("RANK_TAG"), "json_preloaded": "json" in sys.modules}))
        if mode == "sleep":
            import time
            time.sleep(60)
        return int(mode)

    if __name__ == "__main__":
        sys.exit(main())
"""


def script(tmp_path: Path, body: str, name: str = "train.py") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(body))
    return p


def env(**kw) -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT), **kw)


def test_preload_runs_imports_only(tmp_path):
    p = script(tmp_path, SCRIPT)
    names = [type(n).__name__ for n in zygote.import_statements(str(p))]
    assert names == ["Import", "Import", "Import", "ImportFrom"]
    assert zygote.preload(str(p)) == []
    assert not list(tmp_path.glob("*.toplevel"))  # the top-level write did not run in the standby
    bad = script(tmp_path, "import streamshard_no_such_module\nfrom os import path\n", "bad.py")
    (failed,) = zygote.preload(str(bad))
    assert failed.startswith("line 1: ModuleNotFoundError")
    assert zygote.unsafe_to_fork() is None  # this test process: no CUDA, no process group


def test_starts_are_forks_of_one_standby_and_a_dead_standby_means_cold_starts(tmp_path):
    p = script(tmp_path, SCRIPT)
    out, mode, log = tmp_path / "out.json", tmp_path / "out.mode", tmp_path / "rank.log"
    work = tmp_path / "work"
    work.mkdir()
    mode.write_text("7")
    sb = Standby.start([str(p), str(out)], env(RANK_TAG="r3"), warm=())
    here = os.getcwd()
    try:
        assert sb.warm and not sb.shared and sb.proc is not None
        os.chdir(work)  # the keeper's directory and streams go with the request
        with open(log, "w") as f, open(os.devnull) as null:
            saved = [os.dup(0), os.dup(1)]
            os.dup2(null.fileno(), 0)
            os.dup2(f.fileno(), 1)
            try:
                first = sb.spawn()
            finally:
                os.dup2(saved[0], 0)
                os.dup2(saved[1], 1)
                for fd in saved:
                    os.close(fd)
        assert isinstance(first, Forked) and first.wait(timeout=30) == 7
        got = json.loads(out.read_text())
        assert got == {"name": "__main__", "argv": [str(out)], "pid": first.pid, "cwd": str(work), "env": "r3",
                       "json_preloaded": True}
        assert first.pid != sb.proc.pid and (tmp_path / "out.toplevel").read_text() == str(first.pid)
        assert log.read_text() == f"hello from {first.pid}\n"  # the rank wrote to the keeper's stdout
        mode.write_text("sleep")
        second = sb.spawn()  # the same standby serves the next start
        for _ in range(600):  # bounded: until the rank is inside main()
            if json.loads(out.read_text())["pid"] == second.pid:
                break
            assert second.wait(timeout=0.05) is None  # still running
        second.kill()
        assert second.wait(timeout=30) == -signal.SIGKILL
        sb.lost(second)
        assert sb.warm  # a dead rank is not a dead zygote
        os.kill(sb.proc.pid, signal.SIGKILL)  # now the zygote dies: the next start is cold, not lost
        sb.proc.wait()
        mode.write_text("3")
        third = sb.spawn()
        assert isinstance(third, subprocess.Popen) and not sb.warm and "cannot reach the zygote" in sb.why_cold
        assert third.wait(timeout=30) == 3
    finally:
        os.chdir(here)
        sb.close()
    assert sb.proc is None


def test_disabled_or_refusing_zygote_starts_cold(tmp_path):
    p = script(tmp_path, SCRIPT)
    (tmp_path / "out.mode").write_text("3")
    sb = Standby.start([str(p), str(tmp_path / "out.json")], env(**{ENV_ZYGOTE: "0"}))
    assert not sb.warm and sb.proc is None
    child = sb.spawn()
    assert isinstance(child, subprocess.Popen) and child.wait(timeout=30) == 3
    # an import that joins a process group makes the fork unsafe: the zygote refuses
    (tmp_path / "joins_pg.py").write_text(textwrap.dedent("""
        import os
        import torch.distributed as dist
        from datetime import timedelta
        if os.environ.get("JOIN") == "1":  # only in the zygote (the keeper's env travels to the rank)
            dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1,
                                    timeout=timedelta(seconds=30))
    """))
    bad = script(tmp_path, "import sys\nimport joins_pg\nsys.exit(5)\n", "bad.py")
    sb = Standby.start([str(bad)], env(JOIN="1"), warm=())
    assert sb.warm  # the zygote decides at the first request
    child = sb.spawn()
    assert isinstance(child, subprocess.Popen) and not sb.warm and "process group" in sb.why_cold
    child.kill()  # started cold (it would exit 5): not waited for, to spare the test a torch import
    assert child.wait(timeout=60) == -signal.SIGKILL and sb.proc is None


def test_keeper_and_recovery_package_start_without_torch():
    """Each rank's keeper is a process of its own: it must not pay for `import torch` at start-up."""
    code = ("import sys, streamshard.recovery, streamshard.recovery.keeper, streamshard.recovery.standby; "
            "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))[:5]; "
            "assert 'install_lr_scale' in dir(streamshard.recovery)")  # still exported, loaded lazily
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env(), timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
