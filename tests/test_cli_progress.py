"""The progress bar: tty redraws in place, logs get one plain line per interval."""

from __future__ import annotations

import io

import pytest

from streamshard.progress import ProgressBar, format_duration


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


@pytest.mark.parametrize("seconds,text", [(0, "0:00"), (75.2, "1:15"), (3725, "1:02:05")])
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


def test_non_tty_prints_one_line_per_interval_with_rate_and_eta():
    out, clock = io.StringIO(), Clock()
    bar = ProgressBar(100_000_000, label="convert", stream=out, tty=False, interval=10,
                      clock=clock)
    for _ in range(4):  # 4 updates over 2 s: less than one interval, nothing printed
        clock.t += 0.5
        bar.update(10, 5_000_000)
    assert out.getvalue() == ""
    clock.t += 8.0
    bar.update(5, 8_000_000)  # 10 s in: 28 MB of 100 MB at 2.8 MB/s -> ETA 0:26
    line = out.getvalue()
    assert line.count("\n") == 1 and "\r" not in line
    assert "28.0%" in line and "45 samples" in line and "2.8 MB/s" in line and "ETA 0:26" in line
    bar.close()
    assert out.getvalue().count("\n") == 2


def test_tty_redraws_in_place_and_pads_shorter_lines():
    out, clock = io.StringIO(), Clock()
    bar = ProgressBar(0, label="verify", unit="shards", stream=out, tty=True, clock=clock)
    clock.t += 1
    bar.update(1, 10**9)
    clock.t += 1
    bar.update(1, 0)
    bar.close()
    frames = out.getvalue().split("\r")[1:]
    assert len(frames) == 3 and frames[-1].endswith("\n")
    assert "2 shards" in frames[-1] and "elapsed" in frames[-1]  # unknown total: no ETA
    assert len(frames[1]) >= len(frames[0])  # a redraw covers the previous frame


def test_disabled_bar_prints_nothing():
    out = io.StringIO()
    with ProgressBar(10, stream=out, tty=False, interval=0, enabled=False) as bar:
        bar.update(1, 5)
    assert out.getvalue() == "" and bar.samples == 1 and bar.bytes == 5
