"""The loader's checkpoint state: small, versioned, JSON-able, identical on every rank.

Keys are constants. ``validate_state`` checks every key and reports each mismatch with the saved
value next to the live one, so a resume onto a different dataset, batch size or sampler setting
fails loudly instead of silently reading other samples.
"""

from __future__ import annotations

import json
from typing import Any, Mapping

from streamshard.errors import ConfigError, StateMismatchError
from streamshard.sampler.ledgers import OPTIONAL as _OPTIONAL_LEDGERS
from streamshard.sampler.ledgers import Ledgers

STATE_VERSION = 1

# What identifies the sequence: must match between the saved state and the live loader.
KEY_VERSION = "version"
KEY_FINGERPRINTS = "fingerprints"
KEY_SEQUENCE = "sequence"
KEY_STEPS_PER_EPOCH = "steps_per_epoch"
# Where we are and what was changed at run time: restored from the saved state.
KEY_STEP = "step"
KEY_EPOCH = "epoch"
KEY_SKIPS = "skips"
KEY_RESEEDS = "reseeds"
KEY_QUARANTINE = "quarantine"
# Every ledger (streamshard.sampler.ledgers.Ledgers) is a top-level key of the same name.
LEDGER_KEYS = Ledgers.names()

_CONFIG_KEYS = (KEY_VERSION, KEY_FINGERPRINTS, KEY_SEQUENCE, KEY_STEPS_PER_EPOCH)
_RUNTIME_KEYS = (KEY_STEP, KEY_EPOCH) + LEDGER_KEYS
ALL_KEYS = _CONFIG_KEYS + _RUNTIME_KEYS
# Keys a state saved by an older streamshard may lack (read as empty): it still loads.
OPTIONAL_KEYS = frozenset(_OPTIONAL_LEDGERS)


def build_state(
    *,
    fingerprints: list[str],
    sequence: Mapping[str, Any],
    steps_per_epoch: int,
    step: int,
    ledgers: Ledgers,
) -> dict[str, Any]:
    """Assemble a state dict. Round-trips through ``json`` unchanged (tested)."""
    sequence = {k: v for k, v in sequence.items() if k not in LEDGER_KEYS}
    return {
        KEY_VERSION: STATE_VERSION,
        KEY_FINGERPRINTS: list(fingerprints),
        KEY_SEQUENCE: _jsonable(dict(sequence)),
        KEY_STEPS_PER_EPOCH: int(steps_per_epoch),
        KEY_STEP: int(step),
        KEY_EPOCH: int(step) // int(steps_per_epoch),
        **ledgers.to_state(),
    }


def _jsonable(value: Any) -> Any:
    # Normalise tuples to lists (and numpy ints to int) so saved and live values compare equal
    # after a JSON round trip.
    return json.loads(json.dumps(value, default=int))


def _count(x: Any) -> bool:
    """A step, salt or position: an int (not a bool) in [0, 2**63)."""
    return type(x) is int and 0 <= x < 2**63


def _fmt(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= 120 else text[:117] + "..."


def validate_state(saved: Mapping[str, Any], live: Mapping[str, Any]) -> None:
    """Raise ``StateMismatchError`` unless ``saved`` can be restored into the live loader.

    Every configuration key must be equal; runtime keys must be present and well-formed.
    The message lists every problem, each with ``saved=`` and ``live=`` side by side.
    """
    if not isinstance(saved, Mapping):
        raise StateMismatchError(f"loader state must be a dict, got {type(saved).__name__}")
    problems: list[str] = []
    version = saved.get(KEY_VERSION)
    if version != STATE_VERSION:
        raise StateMismatchError(
            f"loader state version: saved={version!r}, live={STATE_VERSION} "
            f"(this streamshard reads state version {STATE_VERSION} only)"
        )
    missing = [k for k in ALL_KEYS if k not in saved and k not in OPTIONAL_KEYS]
    if missing:
        problems.append(f"missing keys: {', '.join(missing)}")
    unknown = sorted(set(saved) - set(ALL_KEYS))
    if unknown:
        problems.append(f"unknown keys: {', '.join(unknown)}")
    for key in (KEY_FINGERPRINTS, KEY_STEPS_PER_EPOCH):
        if key in saved and _jsonable(saved[key]) != _jsonable(live[key]):
            problems.append(f"{key}: saved={_fmt(saved[key])}, live={_fmt(live[key])}")
    if KEY_SEQUENCE in saved:
        s_seq, l_seq = _jsonable(saved[KEY_SEQUENCE]), _jsonable(live[KEY_SEQUENCE])
        if not isinstance(s_seq, dict):
            problems.append(f"{KEY_SEQUENCE}: saved={_fmt(s_seq)} is not a dict")
        else:
            for name in sorted(set(s_seq) | set(l_seq)):
                if name in LEDGER_KEYS:
                    continue
                if s_seq.get(name) != l_seq.get(name):
                    problems.append(
                        f"{KEY_SEQUENCE}.{name}: saved={_fmt(s_seq.get(name))}, "
                        f"live={_fmt(l_seq.get(name))}"
                    )
    if not problems:
        step, epoch = saved[KEY_STEP], saved[KEY_EPOCH]
        if not _count(step):  # type(): a bool is not a step; 2**63: the sampler's int64 range
            problems.append(f"{KEY_STEP} must be an int in [0, 2**63), got {step!r}")
        elif epoch != step // int(live[KEY_STEPS_PER_EPOCH]):
            problems.append(
                f"{KEY_EPOCH}={epoch!r} does not match {KEY_STEP}={step} with "
                f"{live[KEY_STEPS_PER_EPOCH]} steps per epoch"
            )
        try:
            Ledgers.from_state(saved)
        except ConfigError as e:
            problems.append(str(e))
    if problems:
        raise StateMismatchError(
            "cannot load loader state into this loader:\n  " + "\n  ".join(problems)
        )
