"""Effective training time: only applied, checkpointed steps count; wall time includes everything."""

from streamshard.recovery.goodput import EffectiveTime, job_start
from streamshard.recovery.journal import Journal


def test_committed_pending_and_discarded_steps():
    now = {"t": 100.0}
    e = EffectiveTime(90.0, clock=lambda: now["t"])
    e.step(2.0)
    e.step(1.0, applied=False)  # a skipped update is not productive
    e.commit()
    e.step(3.0)
    assert e.record() == {"productive_s": 2.0, "pending_s": 3.0, "wall_s": 10.0, "effective": 0.5}
    e.discard()  # rolled back: the 3 s are lost
    now["t"] = 110.0
    assert e.fraction() == 2.0 / 20.0
    # a restart resumes the productive total from the checkpoint; the wall clock from the journal
    r = EffectiveTime(90.0, e.productive_s, clock=lambda: now["t"])
    assert r.fraction() == e.fraction()


def test_job_start_is_the_first_record(tmp_path):
    assert job_start(Journal(tmp_path / "j"), 5.0) == 5.0
    clock = iter([30.0, 20.0]).__next__
    Journal(tmp_path / "j", rank=1, clock=clock).append("start")
    Journal(tmp_path / "j", rank=0, clock=clock, role="agent").append("launch")
    assert job_start(Journal(tmp_path / "j"), 99.0) == 20.0
