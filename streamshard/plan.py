"""The iteration plan shared between a loader and its DataLoader workers.

A plan says which absolute data steps the next ``iter()`` serves: ``[start, stop)`` minus the skip
ledger, with the reseed ledger applied. Workers read it when PyTorch calls ``iter(dataset)`` in
them, which with ``persistent_workers=True`` happens long after the workers were started, so the
plan lives in an anonymous shared buffer (``multiprocessing.RawArray``: an mmap of an unlinked file,
inherited on fork and passed on spawn). Nothing named is created, so a SIGKILLed job leaks
nothing. The loader writes the plan strictly before it asks PyTorch to start the iteration, and
workers read it strictly after, so no lock is needed.
"""

from __future__ import annotations

import ctypes
import json
import multiprocessing
import struct
from dataclasses import dataclass, field
from multiprocessing.context import get_spawning_popen

from streamshard.errors import ConfigError
from streamshard.sampler.ledgers import Ledgers

# 64 KiB holds a plan with ~2,000 skip/reseed entries; a longer ledger is refused with a message.
_PLAN_BYTES = 1 << 16
_LEN = struct.Struct("<Q")


@dataclass(frozen=True)
class Plan:
    """Steps ``[start, stop)`` to serve, minus the skips, with every ledger applied."""

    start: int
    stop: int
    ledgers: Ledgers = field(default_factory=Ledgers)

    skips = property(lambda self: self.ledgers.skips)
    reseeds = property(lambda self: self.ledgers.reseeds)

    def to_json(self) -> bytes:
        return json.dumps({"start": self.start, "stop": self.stop, **self.ledgers.to_state()}).encode()

    @classmethod
    def from_json(cls, data: bytes) -> "Plan":
        raw = json.loads(data)
        return cls(int(raw["start"]), int(raw["stop"]), Ledgers.from_state(raw))


class PlanBox:
    """A one-slot mailbox for a :class:`Plan`, readable from DataLoader worker processes.

    Picklable: pickled for a child process it shares the buffer; pickled any other way
    (``copy.deepcopy``, ``pickle.dumps``) it carries a plain copy of the current plan.
    """

    def __init__(self, plan: Plan):
        self._buf = multiprocessing.RawArray(ctypes.c_char, _PLAN_BYTES)
        self.write(plan)

    def write(self, plan: Plan) -> None:
        data = plan.to_json()
        if _LEN.size + len(data) > _PLAN_BYTES:
            raise ConfigError(
                f"skip/reseed ledger too long: plan is {len(data)} bytes, at most "
                f"{_PLAN_BYTES - _LEN.size} fit"
            )
        view = memoryview(self._buf).cast("B")
        view[_LEN.size : _LEN.size + len(data)] = data
        view[: _LEN.size] = _LEN.pack(len(data))

    def read(self) -> Plan:
        view = memoryview(self._buf).cast("B")
        (length,) = _LEN.unpack(view[: _LEN.size])
        return Plan.from_json(bytes(view[_LEN.size : _LEN.size + length]))

    def __getstate__(self):
        if get_spawning_popen() is not None:
            return {"buf": self._buf}
        return {"plan": self.read().to_json()}

    def __setstate__(self, state) -> None:
        if "buf" in state:
            self._buf = state["buf"]
        else:
            self._buf = multiprocessing.RawArray(ctypes.c_char, _PLAN_BYTES)
            self.write(Plan.from_json(state["plan"]))
