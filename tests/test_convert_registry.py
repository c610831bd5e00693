"""The converter registry, option handling, planning and the line splitter."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import streamshard.converters as converters
from streamshard.converters import CountingContext, Option, Piece, parse_fields
from streamshard.converters.text import LineReader, split_lines
from streamshard.convert import convert, plan_chunks
from streamshard.errors import ConfigError


class _Dummy:
    name = "dummy"
    help = "test"
    options = (Option("--seq-len", "conflicting definition of a shared flag", type=str),)
    extensions = None


def test_registry_is_read_only_and_names_are_unique():
    converters.available()
    with pytest.raises(TypeError):
        converters.REGISTRY["x"] = object()  # type: ignore[index]
    with pytest.raises(ConfigError, match="'jsonl' is already registered"):
        converters.register("jsonl", converters.get("jsonl"))
    with pytest.raises(ConfigError, match="--seq-len differs"):
        converters.register("dummy-conflict", _Dummy())
    assert "dummy-conflict" not in converters.REGISTRY
    with pytest.raises(ConfigError, match="unknown format 'nope'; known formats: .*jsonl"):
        converters.get("nope")
    assert {"jsonl", "text", "tokens", "parquet"} <= set(converters.available())


@pytest.mark.parametrize("spec,expected", [
    ("a,b", [("a", None), ("b", None)]),                            # untyped
    ("text:str, id:int64", [("text", "str"), ("id", "int64")]),     # spaces around items
    ("v:float32[*,3],w", [("v", "float32[*,3]"), ("w", None)]),     # comma inside brackets
    ("", []),                                                       # nothing selected
])
def test_parse_fields(spec, expected):
    assert parse_fields(spec) == expected


@pytest.mark.parametrize("spec,match", [("a,,b", "empty field name"), ("a,a:str", "twice")])
def test_parse_fields_errors(spec, match):
    with pytest.raises(ConfigError, match=match):
        parse_fields(spec)


def test_unknown_column_type_in_fields_fails_before_writing(tmp_path):
    src = tmp_path / "a.jsonl"
    src.write_text('{"a": 1}\n')
    with pytest.raises(Exception, match="'a'.*unknown type 'integer'"):
        convert([str(src)], str(tmp_path / "ds"), format="jsonl", options={"fields": "a:integer"})
    assert not (tmp_path / "ds").exists()


def test_plan_packs_pieces_in_order_independent_of_anything_else():
    pieces = [Piece("f", "f", i, i + 1, n) for i, n in enumerate([5, 5, 20, 1, 1, 1, 9])]
    chunks = plan_chunks(pieces, 10)
    # a chunk closes before the piece that would overflow it; an oversized piece is alone
    assert [[p.start for p in c.pieces] for c in chunks] == [[0, 1], [2], [3, 4, 5], [6]]
    assert [c.part for c in chunks][-2:] == ["parts/chunk-000002", "parts/chunk-000003"]


@settings(max_examples=60, deadline=None)
@given(lines=st.lists(st.binary(max_size=30).map(lambda b: b.replace(b"\n", b"")), max_size=40),
       chunk=st.integers(1, 80), final_newline=st.booleans())
def test_byte_ranges_read_every_line_exactly_once(tmp_path_factory, lines, chunk, final_newline):
    data = b"\n".join(lines) + (b"\n" if final_newline and lines else b"")
    path = tmp_path_factory.mktemp("lines") / "f.txt"
    path.write_bytes(data)
    ctx = CountingContext(False, lambda s, b: None)
    got, numbers = [], []
    for piece in split_lines(str(path), "f.txt", len(data), chunk):
        reader = LineReader(piece, ctx)
        for line in reader:
            got.append(line)
            numbers.append(int(reader.where().split(":")[1]))
    assert b"".join(got) == data
    assert numbers == list(range(1, len(numbers) + 1))
