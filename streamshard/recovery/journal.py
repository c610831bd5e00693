"""Append-only JSONL journal of recovery events, read at start to restore the ledger.

One JSON object per line: ``{"v": 1, "time": <unix s>, "rank": r, "event": <kind>, ...}``.
Each append is one ``write`` of the whole line on an ``O_APPEND`` descriptor followed by ``fsync``,
so concurrent writers (ranks on one host) never interleave inside a line and a record survives a
SIGKILL right after ``append`` returns. A torn last line (a crash during the write) is ignored on
read; a malformed line in the middle is corruption and is reported with its line number.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from streamshard.errors import CorruptionError
from streamshard.recovery.policy import Ledger, apply_event

VERSION = 1


class Journal:
    """Append/read a JSONL journal. Thread-safe for appends (one ``os.write`` per record)."""

    def __init__(self, path: str | os.PathLike, *, rank: int = 0, clock: Callable[[], float] = time.time):
        self.path = Path(path)
        self.rank = rank
        self._clock = clock

    def append(self, event: str, **fields) -> dict:
        record = {"v": VERSION, "time": self._clock(), "rank": self.rank, "event": event, **fields}
        line = (json.dumps(record, separators=(",", ":"), allow_nan=False) + "\n").encode()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
        return record

    def records(self) -> Iterator[dict]:
        """Every complete record in order (empty when the file does not exist)."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return
        lines = data.split(b"\n")
        torn_tail = not data.endswith(b"\n")
        for lineno, raw in enumerate(lines, 1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except ValueError:
                if torn_tail and lineno == len(lines):
                    return  # crash mid-append: the record never happened
                raise CorruptionError(f"{self.path}:{lineno}: journal line is not JSON: {raw[:80]!r}") from None
            if not isinstance(record, dict) or record.get("v") != VERSION or "event" not in record:
                raise CorruptionError(
                    f"{self.path}:{lineno}: journal record must be an object with v={VERSION} and "
                    f"'event', got {raw[:80]!r}"
                )
            yield record

    def events(self, kind: str) -> list[dict]:
        return [r for r in self.records() if r["event"] == kind]

    def ledger(self) -> Ledger:
        """The recovery ledger (skips, reseeds, LR scale, retries, terminal exit) the journal implies."""
        ledger = Ledger()
        for record in self.records():
            ledger = apply_event(ledger, record)
        return ledger

    def fired(self) -> set[str]:
        """Keys of once-only injected faults that already fired (see :mod:`faultplan`)."""
        return {r["key"] for r in self.records() if r["event"] == "fault"}


def last_exit(path: str | os.PathLike) -> int | None:
    """Exit code of the last ``exit``/``hang`` record: what a scheduler wrapper reads after torchrun
    gives up (torchrun itself only reports 1)."""
    code = None
    for record in Journal(path).records():
        if record["event"] in ("exit", "hang"):
            code = int(record["code"])
    return code
