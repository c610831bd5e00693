"""Arrow data type -> streamshard column type: the one mapping, shared by the ``parquet`` and
``hf`` converters (docs/CONVERTERS.md lists the table)."""

from __future__ import annotations

from typing import Any

# Arrow's names of its numeric types -> streamshard dtypes.
ARROW_NUMERIC = {
    "bool": "bool", "int8": "int8", "int16": "int16", "int32": "int32", "int64": "int64",
    "uint8": "uint8", "uint16": "uint16", "uint32": "uint32", "uint64": "uint64",
    "halffloat": "float16", "float": "float32", "double": "float64",
}


def plain_type(t: Any, *, bool_arrays: bool = True) -> str | None:
    """The column type of Arrow type ``t`` when it has a direct one: ``str``, ``bytes``, a numeric
    scalar, or a 1-D numeric array (``dtype[]``, ``dtype[n]`` for fixed-size lists; lists of bool
    only with ``bool_arrays``); ``None`` otherwise (the caller stores JSON or flattens)."""
    import pyarrow as pa

    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "str"
    if pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t):
        return "bytes"
    if str(t) in ARROW_NUMERIC:
        return ARROW_NUMERIC[str(t)]
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        inner = str(t.value_type)
        if inner in ARROW_NUMERIC and (bool_arrays or inner != "bool"):
            size = t.list_size if pa.types.is_fixed_size_list(t) else ""
            return f"{ARROW_NUMERIC[inner]}[{size}]"
    return None
