"""A small progress bar for long commands (convert, verify) without a tqdm dependency.

On a terminal it redraws one line in place at most every ``redraw`` seconds. On anything else (a
log file, CI) it prints one plain line every ``interval`` seconds and a final line, so logs stay
readable. Rates are decimal MB/s (10^6 bytes) of input; the ETA comes from the known total bytes.
"""

from __future__ import annotations

import sys
import time
from typing import Callable, TextIO

from streamshard.sizes import format_size

_WIDTH = 24


def format_duration(seconds: float) -> str:
    """``75.2 -> '1:15'``, ``3725 -> '1:02:05'``."""
    s = int(round(max(seconds, 0.0)))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class ProgressBar:
    """Counts ``samples`` and input ``bytes`` toward ``total_bytes`` (0 = unknown).

    ``update()`` is cheap when nothing is drawn (a clock read). Not thread-safe: call it from one
    thread (the parent process aggregates what workers report). ``clock`` is injectable."""

    def __init__(self, total_bytes: int, *, label: str = "", unit: str = "samples",
                 stream: TextIO | None = None, tty: bool | None = None, interval: float = 10.0,
                 redraw: float = 0.1, enabled: bool = True,
                 clock: Callable[[], float] = time.monotonic):
        self.total = max(int(total_bytes), 0)
        self.label, self.unit = label, unit
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.period = redraw if self.tty else interval
        self.enabled = enabled
        self.clock = clock
        self.samples = 0
        self.bytes = 0
        self.start = clock()
        self._last_draw = self.start
        self._drawn = 0  # width of the line on screen (tty)
        self._closed = False

    def update(self, samples: int = 0, nbytes: int = 0) -> None:
        self.samples += samples
        self.bytes += nbytes
        if self.enabled and not self._closed:
            now = self.clock()
            if now - self._last_draw >= self.period:
                self._last_draw = now
                self._draw(now)

    def line(self, now: float | None = None) -> str:
        """The current status line (also what non-tty output prints)."""
        now = self.clock() if now is None else now
        elapsed = max(now - self.start, 1e-9)
        rate = self.bytes / elapsed
        parts = [self.label] if self.label else []
        if self.total:
            frac = min(self.bytes / self.total, 1.0)
            fill = int(frac * _WIDTH)
            parts.append(f"{frac * 100:5.1f}% |{'#' * fill}{' ' * (_WIDTH - fill)}|")
            parts.append(f"{format_size(self.bytes)}/{format_size(self.total)}")
        else:
            parts.append(format_size(self.bytes))
        parts.append(f"{self.samples:,} {self.unit}")
        parts.append(f"{rate / 1e6:.1f} MB/s")
        if self.total and 0 < self.bytes < self.total and rate > 0:
            parts.append(f"ETA {format_duration((self.total - self.bytes) / rate)}")
        else:
            parts.append(f"{format_duration(elapsed)} elapsed")
        return " ".join(parts)

    def _draw(self, now: float) -> None:
        text = self.line(now)
        if self.tty:
            pad = max(self._drawn - len(text), 0)
            self.stream.write("\r" + text + " " * pad)
            self._drawn = len(text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        """Draw the final state once and end the line."""
        if self._closed:
            return
        self._closed = True
        if self.enabled:
            self._draw(self.clock())
            if self.tty:
                self.stream.write("\n")
                self.stream.flush()

    def __enter__(self) -> "ProgressBar":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
