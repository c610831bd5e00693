"""Small frictions found while porting scripts from other loaders (issue 13, item 8): the usage
line, sizes printed as the user wrote them, and a shard size below the block size said aloud."""

from __future__ import annotations

import json
import logging

import pytest

from streamshard.cli import build_parser, main
from streamshard.sizes import format_size, parse_size


@pytest.mark.parametrize("command,usage_tail", [
    ("convert", "SRC [SRC ...] DEST"),
    ("merge", "PART [PART ...] DEST"),
])
def test_usage_line_reads_sources_then_one_dest(command, usage_tail):
    sub = build_parser()._subparsers._group_actions[0].choices[command]
    usage = " ".join(sub.format_usage().split())
    assert usage.endswith(usage_tail), usage
    assert "DEST [" not in usage  # the old "SRC... DEST [SRC... DEST ...]"


# Each row: bytes -> text. Exact multiples print as written on the command line, decimal first.
@pytest.mark.parametrize("n,text", [
    (64 * 10**6, "64 MB"),        # the default shard size, not "61.0 MiB"
    (64 * 2**10, "64 KiB"),       # the default block size: exact in binary only
    (3 * 10**9, "3 GB"),
    (2**30, "1 GiB"),
    (86_400, "86.4 KB"),          # not exact: decimal, one decimal
    (999_999, "1.0 MB"),          # rounding never shows "1000.0 KB"
    (999, "999 B"),
    (0, "0 B"),
])
def test_format_size_prints_what_people_write(n, text):
    assert format_size(n) == text


@pytest.mark.parametrize("n", [64 * 10**6, 64 * 2**10, 3 * 10**9, 2**30, 5 * 10**12, 12_000])
def test_exact_sizes_round_trip_through_parse_size(n):
    assert parse_size(format_size(n).replace(" ", "")) == n


@pytest.fixture
def jsonl(tmp_path):
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": f"doc {i} " + "y" * 200}) + "\n"
                           for i in range(300)))
    return src


def test_inspect_prints_the_shard_size_given(tmp_path, jsonl, capsys):
    dest = tmp_path / "ds"
    assert main(["convert", str(jsonl), str(dest), "--format", "jsonl", "--quiet",
                 "--shard-size", "64MB"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(dest), "--samples", "0"]) == 0
    out = capsys.readouterr().out
    assert "target 64 MB, blocks 64 KiB" in out, out


def test_shard_size_below_block_size_is_said_once(tmp_path, jsonl, caplog, capsys):
    caplog.set_level(logging.WARNING, logger="streamshard")
    dest = tmp_path / "ds"
    # Two chunks, so two writers: still one warning.
    assert main(["convert", str(jsonl), str(jsonl.parent / "docs.jsonl"), str(dest),
                 "--format", "jsonl", "--quiet", "--shard-size", "10KB", "--block-size", "32KiB",
                 "--chunk-size", "40KB"]) == 0
    warnings = [r.getMessage() for r in caplog.records if "below the block size" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert "shard size 10 KB is below the block size 32 KiB" in warnings[0]
    assert "--block-size" in warnings[0]


def test_no_warning_when_blocks_fit(tmp_path, jsonl, caplog):
    caplog.set_level(logging.WARNING, logger="streamshard")
    assert main(["convert", str(jsonl), str(tmp_path / "ds"), "--format", "jsonl", "--quiet",
                 "--shard-size", "20KB", "--block-size", "4KiB"]) == 0
    assert not [r for r in caplog.records if "below the block size" in r.getMessage()]


def test_shard_writer_says_it_too(tmp_path, caplog):
    from streamshard import ShardWriter

    caplog.set_level(logging.WARNING, logger="streamshard")
    with ShardWriter(str(tmp_path / "w"), columns={"x": "bytes"}, shard_size="1KB",
                     block_size="4KiB") as w:
        for i in range(10):
            w.write({"x": bytes(500)})
    assert sum("below the block size" in r.getMessage() for r in caplog.records) == 1
