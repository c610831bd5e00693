"""Fuzzing the loader state: every key replaced by any JSON-like value, deleted, or added. A
mutated state either loads with a ``StreamshardError`` or loads and then serves the batches the
equivalent valid state serves (short budget here, long with ``pytest -m fuzz``)."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamshard import StreamingDataLoader, StreamingDataset, World
from streamshard.errors import StreamshardError
from streamshard.state import ALL_KEYS

from tests import fuzzing as fz

_COMMON = dict(deadline=None, suppress_health_check=list(HealthCheck))
_DS: list[str] = []


def _dataset() -> str:
    if not _DS:
        from streamshard.testing import write_id_dataset
        import tempfile

        _DS.append(write_id_dataset(tempfile.mkdtemp(prefix="fuzz-state-") + "/ds", 40))
    return _DS[0]


def _loader() -> StreamingDataLoader:
    return StreamingDataLoader(StreamingDataset(_dataset(), global_batch_size=4, seed=3,
                                                world=World()))


def _first_ids(loader, n=2):
    out = []
    for batch in loader:
        out.append(batch["id"].tolist())
        if len(out) == n:
            break
    return out


def check_state(key, value, delete, step):
    ref = _loader()
    ref.skip(1, 2)
    _first_ids(ref, step % 5)  # advance a little so the state holds a nonzero step
    state = json.loads(json.dumps(ref.state_dict()))
    if delete:
        state.pop(key, None)
    elif key in state and isinstance(state[key], dict) and isinstance(value, dict):
        state[key] = {**state[key], **value}
    else:
        state[key] = value
    with fz.time_bound():
        target = _loader()
        try:
            target.load_state_dict(state)
        except StreamshardError:
            return
        # it loaded: the state must be one the loader understands, serving what a clean
        # load of the same (normalized) state serves
        again = _loader()
        again.load_state_dict(json.loads(json.dumps(target.state_dict())))
        assert _first_ids(target) == _first_ids(again)


STATE = dict(key=st.sampled_from(list(ALL_KEYS) + ["extra"]), value=fz.jsonish(),
             delete=st.booleans(), step=st.integers(0, 9))


@settings(max_examples=fz.SHORT, **_COMMON)
@given(**STATE)
def test_fuzz_loader_state(key, value, delete, step):
    check_state(key, value, delete, step)


@pytest.mark.fuzz
@settings(max_examples=fz.LONG // 3, **_COMMON)
@given(**STATE)
def test_fuzz_loader_state_long(key, value, delete, step):
    check_state(key, value, delete, step)
