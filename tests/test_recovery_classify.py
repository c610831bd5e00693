"""Exceptions reach the classifier: known faults become exit codes (journaled), unknown ones propagate."""

from __future__ import annotations

import pytest
import torch.distributed as dist

from streamshard.recovery import exitcodes
from streamshard.recovery.classify import classify_exception, exit_on_fault
from streamshard.recovery.journal import Journal


class Exited(Exception):
    pass


def run(exc, journal=None):
    codes = []

    def fake_exit(code):
        codes.append(code)
        raise Exited

    try:
        with exit_on_fault(journal, exit=fake_exit, step=lambda: 7):
            raise exc
    except Exited:
        pass
    return codes


# each row: an exception a step can raise -> the exit code the launcher gets
CASES = [
    (RuntimeError("CUDA error: uncorrectable ECC error encountered"), exitcodes.REPLACE_NODE),
    (RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), exitcodes.DO_NOT_REQUEUE),
    (RuntimeError("[PG 0 Rank 1] Heartbeat monitor timed out!"), exitcodes.RESTART_HERE),
    (dist.DistBackendError("something the rules do not name"), exitcodes.RESTART_HERE),  # by type
]


@pytest.mark.parametrize("exc,code", CASES, ids=[str(c[0])[:25] for c in CASES])
def test_known_faults_exit_with_their_code(tmp_path, exc, code):
    j = Journal(tmp_path / "j")
    assert run(exc, j) == [code]
    (rec,) = j.events("exit")
    assert rec["code"] == code and rec["step"] == 7 and rec["error"]


def test_cause_chain_is_searched():
    try:
        try:
            raise RuntimeError("NCCL error: ncclRemoteError: remote process exited")
        except RuntimeError as inner:
            raise ValueError("step 12 failed") from inner
    except ValueError as outer:
        assert classify_exception(outer).exit_code == exitcodes.RESTART_HERE


def test_unknown_errors_propagate():
    with pytest.raises(KeyError):
        run(KeyError("not a fault we know"))


def test_oom_exit_is_terminal_in_the_journal(tmp_path):
    j = Journal(tmp_path / "j")
    run(RuntimeError("CUDA out of memory."), j)
    assert j.ledger().terminal[0] == exitcodes.DO_NOT_REQUEUE  # every later start exits 78 at once


def test_persistent_straggler_excludes_its_node_only():
    from streamshard.recovery.launch import persistent_straggler

    recs = [{"event": "straggler", "step": 50, "ranks": [3], "persistent": [], "per_rank": [.1, .1, .1, .3],
             "typical": .1},
            {"event": "straggler", "step": 90, "ranks": [3], "persistent": [3], "per_rank": [.1, .1, .1, .3],
             "typical": .1}]
    assert "rank(s) [3] persistently slow at step 90" in persistent_straggler(recs, [2, 3])
    assert persistent_straggler(recs, [0, 1]) is None  # another node's rank
    assert persistent_straggler(recs[:1], [2, 3]) is None  # slow, not yet persistent
    recs.append({"event": "straggler", "step": 120, "ranks": [], "persistent": [], "per_rank": [.1] * 4,
                 "typical": .1})
    assert persistent_straggler(recs, [2, 3]) is None  # recovered since
