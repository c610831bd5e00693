"""Journal of recovery events: one JSONL file per rank, read at start to restore the ledger.

Layout: ``<dir>/rank<r>.jsonl``; one JSON object per line,
``{"v": 1, "time": <unix s>, "rank": r, "seq": n, "event": <kind>, ...}``. Every rank appends only
to its own file (one ``write`` of the whole line, then ``fsync``), so no file is shared between
writers: a thousand ranks never contend on one ``O_APPEND`` inode of a network file system, and
a crash of one rank can only tear that rank's last line. Readers merge all files ordered by
``(time, rank, seq)``; decisions that rebuild the ledger (rollbacks, terminal exits) are written by
one rank only, so their relative order is their file order.

A line that is not a complete record (a SIGKILL mid-``write`` leaves a torn line; the next append
of a restarted process then follows it) is skipped with a warning naming file and line: a torn
line never blocks a start. Records of an unknown version are skipped the same way.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from streamshard.recovery.policy import Ledger, apply_event

VERSION = 1
_RANK_FILE = re.compile(r"^(?:rank|agent)(\d+)\.jsonl$")
log = logging.getLogger(__name__)


class Journal:
    """Append to this rank's file and read the merged journal of all ranks under ``path`` (a
    directory, created on the first append). Thread-safe for appends."""

    def __init__(self, path: str | os.PathLike, *, rank: int = 0, clock: Callable[[], float] = time.time,
                 role: str = "rank"):
        if rank < 0 or role not in ("rank", "agent"):
            raise ValueError(f"need rank >= 0 and role 'rank' or 'agent', got {rank}, {role!r}")
        self.path = Path(path)
        self.rank = rank
        self.file = self.path / f"{role}{rank}.jsonl"  # launcher agents (per node) write agent<node>.jsonl
        self._clock = clock
        self._lock = threading.Lock()
        self._seq: int | None = None

    def append(self, event: str, *, sync: bool = True, **fields) -> dict:
        """Append one record, fsynced (``sync=False``: not, for figures such as ``goodput`` that the
        next record replaces; a decision is always synced before it takes effect)."""
        with self._lock:
            fresh = self._seq is None
            if fresh:  # continue the sequence of a previous process of this rank
                self._seq = sum(1 for _ in _read_file(self.file))
            record = {"v": VERSION, "time": self._clock(), "rank": self.rank, "seq": self._seq,
                      "event": event, **fields}
            line = (json.dumps(record, separators=(",", ":"), allow_nan=False) + "\n").encode()
            if fresh and _torn_tail(self.file):  # end a previous process's torn line, keep ours whole
                line = b"\n" + line
            self.path.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line)
                if sync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            self._seq += 1
        return record

    def files(self) -> list[Path]:
        try:
            names = [p for p in self.path.iterdir() if _RANK_FILE.match(p.name)]
        except (FileNotFoundError, NotADirectoryError):
            return []
        return sorted(names, key=lambda p: (p.name.startswith("agent"), int(_RANK_FILE.match(p.name).group(1))))

    def records(self) -> Iterator[dict]:
        """Every complete record of every rank, merged by ``(time, rank, seq)``."""
        merged = [r for f in self.files() for r in _read_file(f)]
        merged.sort(key=lambda r: (float(r.get("time", 0.0)), int(r.get("rank", 0)), int(r.get("seq", 0))))
        yield from merged

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


def _torn_tail(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            if f.tell() == 0:
                return False
            f.seek(-1, os.SEEK_END)
            return f.read(1) != b"\n"
    except FileNotFoundError:
        return False


def _read_file(path: Path) -> Iterator[dict]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return
    lines = data.split(b"\n")
    for lineno, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except ValueError:
            if lineno < len(lines):  # a torn tail (the last piece) is normal after a crash; say nothing
                log.warning("%s:%d: skipping a torn journal line %r", path, lineno, raw[:80])
            continue
        if not isinstance(record, dict) or record.get("v") != VERSION or "event" not in record:
            log.warning("%s:%d: skipping a journal record that is not an object with v=%d and 'event': %r",
                        path, lineno, VERSION, raw[:80])
            continue
        yield record


def last_exit(path: str | os.PathLike) -> int | None:
    """Exit code of the last ``exit``/``hang`` record: what a scheduler wrapper reads after the
    launcher gives up."""
    code = None
    for record in Journal(path).records():
        if record["event"] in ("exit", "hang"):
            code = int(record["code"])
    return code
