"""Apache Parquet (optional extra ``streamshard[parquet]`` = pyarrow). Every field is kept unless
``--fields`` selects some (and may override types: ``--fields text,meta:json``).

Arrow -> column types: integers, floats and bool map to the scalar of the same width; string ->
``str``; binary -> ``bytes``; list / large_list of numbers -> ``DTYPE[]``; fixed_size_list of
numbers -> ``DTYPE[N]``; dictionary -> its value type; anything else (structs, maps, nested
lists, timestamps, decimals, ...) -> ``json`` with datetimes as ISO 8601 strings, decimals as
strings and bytes as latin-1 strings. A null in a non-json column is a malformed row (name a type
``json`` in ``--fields`` to keep nulls). Pieces are runs of whole row groups.
"""

from __future__ import annotations

import datetime
import decimal
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from streamshard.converters import Piece, ReadContext, parse_fields, register
from streamshard.converters.jsonl import FIELDS
from streamshard.converters.arrow import plain_type
from streamshard.errors import ConfigError, InputError, missing_dependency

_BATCH_ROWS = 4096
def _pq():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise missing_dependency("pyarrow", "parquet", "--format parquet") from None
    return pq


def arrow_to_column(t) -> str:
    """The streamshard type string for an arrow ``DataType``."""
    import pyarrow as pa

    if pa.types.is_dictionary(t):
        return arrow_to_column(t.value_type)
    return plain_type(t) or "json"


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        # maps arrive as lists of (key, value) tuples
        return [_jsonable(v) for v in value]
    if isinstance(value, (datetime.datetime, datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, bytes):
        return value.decode("latin-1")
    if isinstance(value, float) and not np.isfinite(value):
        return None if np.isnan(value) else str(value)
    return value


def _column_values(col, typ: str) -> list:
    """Python values (numpy arrays for numeric lists) of one arrow array."""
    import pyarrow as pa

    t = col.type
    if typ.endswith("]") and col.null_count == 0:
        if pa.types.is_fixed_size_list(t):
            flat = col.flatten()
            if flat.null_count == 0:
                return list(flat.to_numpy(zero_copy_only=False).reshape(len(col), t.list_size))
        elif pa.types.is_list(t) or pa.types.is_large_list(t):
            offsets = col.offsets.to_numpy()
            values = col.values
            if values.null_count == 0:
                flat = values.to_numpy(zero_copy_only=False)
                return [flat[offsets[i]:offsets[i + 1]] for i in range(len(col))]
    if pa.types.is_dictionary(t):
        col = col.dictionary_decode()
    values = col.to_pylist()
    if typ == "json":
        return [_jsonable(v) for v in values]
    return values


class ParquetConverter:
    name = "parquet"
    help = "Apache Parquet files (needs pyarrow: pip install 'streamshard[parquet]')"
    options = (FIELDS,)
    extensions = (".parquet", ".pq")

    def columns(self, files: Sequence[str], options: Mapping[str, Any]) -> dict[str, str]:
        pq = _pq()
        if not files:
            raise ConfigError("--format parquet: no input files")
        first = pq.read_schema(files[0])
        for path in files[1:]:
            other = pq.read_schema(path)
            if not other.equals(first, check_metadata=False):
                diff = [f"{f.name}: {f.type}" for f in other if f not in first] or ["field order"]
                raise InputError(f"{path}: schema differs from {files[0]} ({'; '.join(diff[:3])})")
        inferred = {f.name: arrow_to_column(f.type) for f in first}
        wanted = parse_fields(options["fields"])
        if not wanted:
            return inferred
        missing = [n for n, _ in wanted if n not in inferred]
        if missing:
            raise ConfigError(f"--fields: {files[0]} has no field {missing[0]!r} "
                              f"(fields: {', '.join(inferred)})")
        from streamshard.schema import parse_type

        out = {n: t or inferred[n] for n, t in wanted}
        for n, t in out.items():
            parse_type(t, n)
        return out

    def split(self, path: str, name: str, size: int, chunk_bytes: int,
              options: Mapping[str, Any]) -> list[Piece]:
        meta = _pq().ParquetFile(path).metadata
        groups = [sum(meta.row_group(g).column(c).total_compressed_size
                      for c in range(meta.num_columns)) for g in range(meta.num_row_groups)]
        pieces, start, acc = [], 0, 0
        for g, nbytes in enumerate(groups):
            acc += nbytes
            if acc >= chunk_bytes or g == len(groups) - 1:
                pieces.append(Piece(path, name, start, g + 1, acc))
                start, acc = g + 1, 0
        if not pieces:  # no row groups: an empty table still yields its (empty) piece
            return [Piece(path, name, 0, 0, size)]
        last = pieces[-1]  # footer and header bytes count toward the last piece
        pieces[-1] = Piece(path, name, last.start, last.end,
                           last.nbytes + size - sum(p.nbytes for p in pieces))
        return pieces

    def read(self, piece: Piece, options: Mapping[str, Any], ctx: ReadContext) -> Iterator[dict]:
        pf = _pq().ParquetFile(piece.path)
        columns = self.columns([piece.path], options)
        names = list(columns)
        row = sum(pf.metadata.row_group(g).num_rows for g in range(piece.start))
        piece_rows = sum(pf.metadata.row_group(g).num_rows for g in range(piece.start, piece.end))
        where = [row]
        ctx.set_locator(lambda: f"{piece.name}: row {where[0]}")
        for group in range(piece.start, piece.end):
            rows_in_group = pf.metadata.row_group(group).num_rows
            for batch in pf.iter_batches(_BATCH_ROWS, row_groups=[group], columns=names):
                cols = [_column_values(batch.column(i), columns[n]) for i, n in enumerate(names)]
                for values in zip(*cols):
                    sample = dict(zip(names, values))
                    nulls = [n for n in names if sample[n] is None and columns[n] != "json"]
                    if nulls:
                        ctx.bad_record(InputError(
                            f"{piece.name}: row {where[0]}: column {nulls[0]!r} is null; "
                            f"pass --fields {nulls[0]}:json to keep nulls"))
                    else:
                        yield sample
                    where[0] += 1
            ctx.advance(piece.nbytes * rows_in_group // max(piece_rows, 1))


register("parquet", ParquetConverter())
