"""JSON Lines (``.jsonl``, ``.ndjson``, ``.json``; ``.gz`` / ``.zst`` compressed by extension).

Without ``--fields`` every record (any JSON value) is stored whole in one ``json`` column named
``json``. With ``--fields text:str,id:int64,meta`` each listed field of each record (which must
be an object) becomes a typed column; a field without a type is a ``json`` column, and a record
missing a listed field is malformed. Blank lines are skipped.
"""

from __future__ import annotations

import json
from typing import Any, Iterator, Mapping, Sequence

from streamshard.converters import Option, Piece, ReadContext, register, typed_fields
from streamshard.converters.text import LineReader, split_lines
from streamshard.errors import InputError

FIELDS = Option("--fields", "jsonl/parquet: columns to keep, optionally typed: "
                "'text:str,id:int64,meta' (untyped = json for jsonl, inferred for parquet)")

_EXT = (".jsonl", ".ndjson", ".json")


class JsonlConverter:
    name = "jsonl"
    help = "JSON Lines, optionally gzip/zstd compressed; whole records or selected typed fields"
    options = (FIELDS,)
    extensions = tuple(e + c for e in _EXT for c in ("", ".gz", ".zst"))

    def columns(self, files: Sequence[str], options: Mapping[str, Any]) -> dict[str, str]:
        fields = typed_fields(options["fields"])
        return dict(fields) if fields else {"json": "json"}

    def split(self, path: str, name: str, size: int, chunk_bytes: int,
              options: Mapping[str, Any]) -> list[Piece]:
        return split_lines(path, name, size, chunk_bytes)

    def read(self, piece: Piece, options: Mapping[str, Any], ctx: ReadContext) -> Iterator[dict]:
        names = [n for n, _ in typed_fields(options["fields"])]
        lines = LineReader(piece, ctx)
        ctx.set_locator(lines.where)
        loads = json.loads
        for raw in lines:
            if not raw.strip():
                continue
            try:  # decoding first skips json's encoding detection (~5% of the time)
                record = loads(raw.decode("utf-8"))
            except UnicodeDecodeError as exc:
                ctx.bad_record(InputError(f"{lines.where()}: invalid UTF-8 at byte {exc.start}: "
                                          f"{exc.reason}"))
                continue
            except ValueError as exc:
                ctx.bad_record(InputError(f"{lines.where()}: invalid JSON: {exc}"))
                continue
            except RecursionError:
                ctx.bad_record(InputError(f"{lines.where()}: JSON nested too deeply"))
                continue
            if not names:
                yield {"json": record}
                continue
            if not isinstance(record, dict):
                ctx.bad_record(InputError(f"{lines.where()}: expected a JSON object for "
                                          f"--fields, got {type(record).__name__}"))
                continue
            missing = [n for n in names if n not in record]
            if missing:
                ctx.bad_record(InputError(f"{lines.where()}: record has no field {missing[0]!r} "
                                          f"(fields present: {', '.join(list(record)[:10])})"))
                continue
            yield {n: record[n] for n in names}


register("jsonl", JsonlConverter())
