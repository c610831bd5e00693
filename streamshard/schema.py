"""Column types and the byte encoding of one sample.

A sample is encoded as (see docs/FORMAT.md, "Sample encoding"):

    u64 size of each variable-size column, in column order   (absent when all columns are fixed)
    column payloads, in column order                          (fixed columns carry no size)

Variable-size columns are ``bytes``, ``str``, ``json`` and arrays with any variable dim; an array
payload starts with its variable dims (u32 each; for ``[...]`` a u8 ndim then u32 per dim).
Everything is little-endian. ``Schema.decode`` is compiled once per schema into a closure because
it is the reader's hot path: for a single token column it is one ``np.frombuffer`` and one copy.
"""

from __future__ import annotations

import json
import math
import re
from functools import partial
import struct
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np

from streamshard.errors import CorruptionError, SchemaError
from streamshard.indexcheck import loads_strict

# struct codes double as the scalar encoders; numpy dtypes are always little-endian on disk.
_STRUCT_CODES = {
    "int8": "b", "int16": "h", "int32": "i", "int64": "q",
    "uint8": "B", "uint16": "H", "uint32": "I", "uint64": "Q",
    "float16": "e", "float32": "f", "float64": "d", "bool": "?",
}
NUMERIC_DTYPES = tuple(_STRUCT_CODES)
_ARRAY_RE = re.compile(r"^\s*([a-z0-9]+)\s*\[(.*)\]\s*$")
_U32 = struct.Struct("<I")
_U8 = struct.Struct("<B")
_U64 = struct.Struct("<Q")
_U32_MAX = 2**32 - 1
# Encoded media (image: PNG/JPEG/WebP/... files; audio: WAV/FLAC/... files) are stored and read
# exactly like ``bytes``; the type only tells loaders what to decode (streamshard.media).
MEDIA_KINDS = ("image", "audio")

Decoder = Callable[[Any, int, int], dict]


@dataclass(frozen=True)
class ColumnType:
    """One column's type. ``kind`` is ``bytes|str|json|scalar|array``; ``dtype`` is set for
    scalars and arrays; ``dims`` is a tuple of ints (fixed) / ``None`` (variable), or ``None``
    for ``[...]`` (any ndim). ``text`` is the canonical type string stored in the index."""

    kind: str
    dtype: str | None = None
    dims: tuple[int | None, ...] | None = None

    @property
    def text(self) -> str:
        if self.kind in ("bytes", "str", "json") or self.kind in MEDIA_KINDS:
            return self.kind
        if self.kind == "scalar":
            return self.dtype  # type: ignore[return-value]
        if self.dims is None:
            return f"{self.dtype}[...]"
        if self.dims == (None,):
            return f"{self.dtype}[]"
        return f"{self.dtype}[{','.join('*' if d is None else str(d) for d in self.dims)}]"

    @property
    def fixed_size(self) -> int | None:
        """Encoded byte size when every value has the same size, else ``None``."""
        if self.kind == "scalar":
            return np.dtype(self.dtype).itemsize
        if self.kind == "array" and self.dims is not None and None not in self.dims:
            return math.prod(self.dims) * np.dtype(self.dtype).itemsize
        return None


def parse_type(text: Any, column: str = "?") -> ColumnType:
    """Parse a type string (``"str"``, ``"uint16"``, ``"uint16[]"``, ``"float32[*,3]"``,
    ``"float32[...]"``); a ``ColumnType`` passes through. Raises ``SchemaError`` naming the column."""
    if isinstance(text, ColumnType):
        return text
    if not isinstance(text, str):
        raise SchemaError(f"column {column!r}: type must be a string like 'uint16[]', got {text!r}")
    t = text.strip()
    if t in ("bytes", "str", "json") or t in MEDIA_KINDS:
        return ColumnType(t)
    if t in _STRUCT_CODES:
        return ColumnType("scalar", t)
    m = _ARRAY_RE.match(t)
    if m and m.group(1) in _STRUCT_CODES:
        inner = m.group(2).strip()
        if inner == "...":
            return ColumnType("array", m.group(1), None)
        if inner == "":
            return ColumnType("array", m.group(1), (None,))
        dims: list[int | None] = []
        for part in inner.split(","):
            part = part.strip()
            if part == "*":
                dims.append(None)
            elif part.isdigit() and int(part) <= _U32_MAX:
                dims.append(int(part))
            else:
                break
        else:
            return ColumnType("array", m.group(1), tuple(dims))
    raise SchemaError(
        f"column {column!r}: unknown type {text!r}; expected bytes, str, json, image, audio, one of "
        f"{', '.join(NUMERIC_DTYPES)}, or an array like 'uint16[]', 'uint16[2048]', "
        f"'float32[*,3]', 'float32[...]'"
    )


def _where(column: str, sample_number: int | None) -> str:
    return f"column {column!r}" + ("" if sample_number is None else f" of sample {sample_number}")


def _coerce_array(value: Any, ct: ColumnType, column: str, n: int | None) -> np.ndarray:
    """Return ``value`` as a C-contiguous little-endian array of the column's dtype and a shape
    allowed by the column. ndarrays follow numpy's 'safe' casting (int into a wider int is fine,
    float into int is not); lists are checked by value (a list of small ints fits uint16)."""
    dtype = np.dtype(ct.dtype).newbyteorder("<")
    if isinstance(value, np.ndarray):
        arr = value
        if arr.dtype != dtype and not np.can_cast(arr.dtype, dtype, "safe"):
            raise SchemaError(f"{_where(column, n)}: expected dtype {ct.dtype}, got {arr.dtype} "
                              f"(not a safe cast)")
    elif isinstance(value, (list, tuple)):
        try:
            arr = np.asarray(value)
        except ValueError as exc:
            raise SchemaError(f"{_where(column, n)}: ragged or invalid array value: {exc}") from None
        if arr.size == 0:
            arr = arr.astype(dtype)
        elif arr.dtype.kind in "iub" and dtype.kind in "iu":
            info = np.iinfo(dtype)
            if arr.min() < info.min or arr.max() > info.max:
                raise SchemaError(f"{_where(column, n)}: values out of range for {ct.dtype}")
        elif arr.dtype.kind == "f" and dtype.kind in "iub" or arr.dtype.kind not in "iubf" or (
                dtype.kind == "b" and arr.dtype.kind != "b"):
            raise SchemaError(f"{_where(column, n)}: expected {ct.dtype} values, got {arr.dtype}")
    else:
        raise SchemaError(f"{_where(column, n)}: expected an ndarray or list for {ct.text}, "
                          f"got {type(value).__name__}")
    if ct.dims is not None:
        if arr.ndim != len(ct.dims):
            raise SchemaError(f"{_where(column, n)}: expected {len(ct.dims)}-D array for "
                              f"{ct.text}, got shape {arr.shape}")
        for want, got in zip(ct.dims, arr.shape):
            if want is not None and want != got:
                raise SchemaError(f"{_where(column, n)}: expected shape {ct.text}, got {arr.shape}")
    if arr.ndim > 255 or any(d > _U32_MAX for d in arr.shape):
        raise SchemaError(f"{_where(column, n)}: shape {arr.shape} too large to store")
    return np.asarray(arr, dtype=dtype, order="C")  # not ascontiguousarray: it makes 0-d 1-d


def _encoder(ct: ColumnType, column: str) -> Callable[[Any, int | None], bytes]:
    if ct.kind == "bytes" or ct.kind in MEDIA_KINDS:
        def enc(v, n):
            if isinstance(v, (bytes, bytearray, memoryview)):
                return bytes(v)
            raise SchemaError(f"{_where(column, n)}: expected bytes, got {type(v).__name__}")
    elif ct.kind == "str":
        def enc(v, n):
            if not isinstance(v, str):
                raise SchemaError(f"{_where(column, n)}: expected str, got {type(v).__name__}")
            try:
                return v.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise SchemaError(f"{_where(column, n)}: not encodable as UTF-8: {exc}") from None
    elif ct.kind == "json":
        def enc(v, n):
            try:
                return json.dumps(v, separators=(",", ":"), ensure_ascii=False,
                                  allow_nan=False).encode("utf-8")
            except (TypeError, ValueError, RecursionError) as exc:
                raise SchemaError(f"{_where(column, n)}: not JSON-serializable: {exc}") from None
    elif ct.kind == "scalar":
        packer = struct.Struct("<" + _STRUCT_CODES[ct.dtype])
        is_float = ct.dtype.startswith("float")
        is_bool = ct.dtype == "bool"

        def enc(v, n):
            if is_bool:
                ok = isinstance(v, (bool, np.bool_))
            elif is_float:
                ok = isinstance(v, (int, float, np.integer, np.floating))
            else:
                ok = isinstance(v, (int, np.integer, np.bool_))
            if not ok:
                raise SchemaError(f"{_where(column, n)}: expected {ct.dtype}, got "
                                  f"{type(v).__name__} {v!r:.40}")
            try:
                return packer.pack(bool(v) if is_bool else (float(v) if is_float else int(v)))
            except (struct.error, OverflowError):
                raise SchemaError(f"{_where(column, n)}: {v!r} out of range for {ct.dtype}") from None
    else:
        variable = [i for i, d in enumerate(ct.dims or ()) if d is None]
        any_ndim = ct.dims is None
        want = np.dtype(ct.dtype).newbyteorder("<")
        fixed_shape = None if any_ndim or variable else ct.dims
        one_var_dim = ct.dims == (None,)
        u32 = _U32.pack

        def enc(v, n):
            # Fast paths (~1 us instead of ~5): an ndarray already of the right dtype and shape.
            # They matter: at 150 MB/s a 4 KiB sample has a budget of ~27 us, zstd takes ~20.
            if type(v) is np.ndarray and v.dtype == want:
                if one_var_dim and v.ndim == 1 and len(v) <= _U32_MAX:
                    return u32(len(v)) + v.tobytes()
                if fixed_shape is not None and v.shape == fixed_shape:
                    return v.tobytes()
            arr = _coerce_array(v, ct, column, n)
            if any_ndim:
                prefix = _U8.pack(arr.ndim) + struct.pack(f"<{arr.ndim}I", *arr.shape)
            elif variable:
                prefix = struct.pack(f"<{len(variable)}I", *(arr.shape[i] for i in variable))
            else:
                return arr.tobytes()
            return prefix + arr.tobytes()
    return enc


def _decode_str(buf: Any, pos: int, size: int) -> str:
    try:
        return str(buf[pos:pos + size], "utf-8")
    except UnicodeDecodeError as exc:
        raise CorruptionError(f"invalid UTF-8 at byte {exc.start}") from None


def _decode_json(buf: Any, pos: int, size: int) -> Any:
    # The writer never stores NaN/Infinity (allow_nan=False), so stored ones are damage.
    try:
        return loads_strict(str(buf[pos:pos + size], "utf-8"))
    except UnicodeDecodeError as exc:
        raise CorruptionError(f"invalid UTF-8 at byte {exc.start}") from None
    except ValueError as exc:
        raise CorruptionError(f"invalid JSON: {exc}") from None


def _decoder(ct: ColumnType, column: str) -> Callable[[Any, int, int], Any]:
    """Decoder of one column payload ``buf[pos:pos+size]`` (size already bounds-checked)."""
    if ct.kind == "bytes" or ct.kind in MEDIA_KINDS:
        return lambda buf, pos, size: bytes(buf[pos:pos + size])
    if ct.kind == "str":
        return _decode_str
    if ct.kind == "json":
        return _decode_json
    dtype = np.dtype(ct.dtype).newbyteorder("<")
    if ct.kind == "scalar":
        unpack = struct.Struct("<" + _STRUCT_CODES[ct.dtype]).unpack_from
        if ct.dtype == "bool":
            return partial(_decode_bool, column)
        return lambda buf, pos, size: unpack(buf, pos)[0]
    itemsize = dtype.itemsize
    if ct.dtype == "bool":  # the encoding is 0/1 bytes; anything else is damage (checked)
        inner = _array_decoder(ct, column, dtype, itemsize)
        return partial(_checked_bool_array, inner, column)
    return _array_decoder(ct, column, dtype, itemsize)


def _decode_bool(column: str, buf: Any, pos: int, size: int) -> bool:
    byte = buf[pos]
    if byte > 1:
        raise CorruptionError(f"column {column!r}: bool byte is {byte}, expected 0 or 1")
    return byte == 1


def _checked_bool_array(inner: Callable, column: str, buf: Any, pos: int, size: int) -> np.ndarray:
    arr = inner(buf, pos, size)
    if arr.size and arr.view(np.uint8).max() > 1:
        raise CorruptionError(f"column {column!r}: bool array holds bytes other than 0 and 1")
    return arr


def _array_decoder(ct: ColumnType, column: str, dtype: np.dtype, itemsize: int) -> Callable:
    if ct.dims is not None and None not in ct.dims:
        shape, count = ct.dims, math.prod(ct.dims)
        if len(shape) == 1:
            return lambda buf, pos, size: np.frombuffer(buf, dtype, count, pos).copy()
        return lambda buf, pos, size: np.frombuffer(buf, dtype, count, pos).copy().reshape(shape)
    dims_tpl = ct.dims

    def dec(buf, pos, size):
        if dims_tpl is None:
            if size < 1:
                raise CorruptionError(f"column {column!r}: payload of {size} bytes has no ndim")
            ndim = _U8.unpack_from(buf, pos)[0]
            prefix = 1 + 4 * ndim
            if prefix > size:
                raise CorruptionError(f"column {column!r}: {size} bytes too short for {ndim} dims")
            shape = struct.unpack_from(f"<{ndim}I", buf, pos + 1)
        else:
            nvar = dims_tpl.count(None)
            prefix = 4 * nvar
            if prefix > size:
                raise CorruptionError(f"column {column!r}: {size} bytes too short for dims")
            it = iter(struct.unpack_from(f"<{nvar}I", buf, pos))
            shape = tuple(next(it) if d is None else d for d in dims_tpl)
        count = math.prod(shape)
        if count * itemsize != size - prefix:
            raise CorruptionError(f"column {column!r}: shape {shape} needs {count * itemsize} "
                                  f"bytes, payload has {size - prefix}")
        return np.frombuffer(buf, dtype, count, pos + prefix).copy().reshape(shape)
    return dec


class Schema:
    """Ordered, immutable mapping of column name -> ``ColumnType``.

    ``encode(sample, sample_number=None) -> bytes`` validates (missing/extra keys, dtype, shape:
    ``SchemaError`` naming the column and, when given, the sample number) and encodes.
    ``decode(buf, offset, length) -> dict`` decodes one sample from any buffer (bytes, mmap,
    memoryview); arrays come back writable, scalars as Python ``int``/``float``/``bool``.
    Inconsistent sizes raise ``CorruptionError``. Picklable, hashable, thread-safe.
    """

    __slots__ = ("columns", "_encoders", "_var_mask", "_single", "decode", "fixed_size")

    def __init__(self, columns: Mapping[str, ColumnType | str]):
        if not isinstance(columns, Mapping) or not columns:
            raise SchemaError(f"columns must be a non-empty mapping of name -> type, got {columns!r}")
        parsed: dict[str, ColumnType] = {}
        for name, t in columns.items():
            if not isinstance(name, str) or not name:
                raise SchemaError(f"column names must be non-empty strings, got {name!r}")
            parsed[name] = parse_type(t, name)
        self.columns: Mapping[str, ColumnType] = _FrozenDict(parsed)
        self._encoders = tuple((n, _encoder(ct, n)) for n, ct in parsed.items())
        self._var_mask = tuple(ct.fixed_size is None for ct in parsed.values())
        self._single = (*self._encoders[0], self._var_mask[0]) if len(parsed) == 1 else None
        sizes = [ct.fixed_size for ct in parsed.values()]
        self.fixed_size = None if None in sizes else sum(sizes)  # type: ignore[arg-type]
        self.decode: Decoder = self._build_decoder()

    # -- value semantics -------------------------------------------------------------------
    def to_json(self) -> dict[str, str]:
        """Column name -> canonical type string, in column order (as stored in the index)."""
        return {n: ct.text for n, ct in self.columns.items()}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Schema) and self.to_json() == other.to_json() and \
            list(self.columns) == list(other.columns)

    def __hash__(self) -> int:
        return hash(tuple(self.to_json().items()))

    def __repr__(self) -> str:
        return f"Schema({self.to_json()!r})"

    def __reduce__(self):
        return (Schema, (self.to_json(),))

    # -- encoding --------------------------------------------------------------------------
    def encode(self, sample: Mapping[str, Any], sample_number: int | None = None) -> bytes:
        if not isinstance(sample, Mapping):
            raise SchemaError(f"sample {sample_number if sample_number is not None else ''} "
                              f"must be a dict of column -> value, got {type(sample).__name__}")
        if len(sample) != len(self._encoders):
            extra = sorted(set(sample) - set(self.columns))
            if extra:
                raise SchemaError(f"{_where(extra[0], sample_number)}: not in the schema "
                                  f"(columns: {', '.join(self.columns)})")
        if self._single is not None and len(sample) == 1:  # one column: no lists, no join
            name, enc, var = self._single
            if name in sample:
                b = enc(sample[name], sample_number)
                return _U64.pack(len(b)) + b if var else b
        sizes: list[int] = []
        parts: list[bytes] = []
        for (name, enc), var in zip(self._encoders, self._var_mask):
            try:
                value = sample[name]
            except KeyError:
                raise SchemaError(f"{_where(name, sample_number)}: missing") from None
            b = enc(value, sample_number)
            if var:
                sizes.append(len(b))
            parts.append(b)
        if sizes:
            parts.insert(0, struct.pack(f"<{len(sizes)}Q", *sizes))
        return b"".join(parts)

    # -- decoding --------------------------------------------------------------------------
    def _build_decoder(self) -> Decoder:
        names = list(self.columns)
        cts = list(self.columns.values())
        decs = [_decoder(ct, n) for n, ct in zip(names, cts)]
        nvar = sum(self._var_mask)
        # Fast path for the common one-column layouts (token arrays): no per-column loop.
        if len(cts) == 1:
            name, dec, ct = names[0], decs[0], cts[0]
            fixed = ct.fixed_size
            if fixed is not None:
                def decode_fixed1(buf, offset, length):
                    if length != fixed:
                        raise CorruptionError(f"sample is {length} bytes, schema needs {fixed}")
                    return {name: dec(buf, offset, length)}
                return decode_fixed1
            u64 = struct.Struct("<Q").unpack_from

            def decode_var1(buf, offset, length):
                if length < 8 or u64(buf, offset)[0] != length - 8:
                    raise CorruptionError(f"sample of {length} bytes has an inconsistent size "
                                          f"header for column {name!r}")
                return {name: dec(buf, offset + 8, length - 8)}
            return decode_var1
        header = struct.Struct(f"<{nvar}Q")
        plan = [(n, d, ct.fixed_size) for n, d, ct in zip(names, decs, cts)]

        def decode(buf, offset, length):
            end = offset + length
            pos = offset + header.size
            if pos > end:
                raise CorruptionError(f"sample of {length} bytes is shorter than its size header")
            sizes = iter(header.unpack_from(buf, offset)) if nvar else None
            out = {}
            for name, dec, fixed in plan:
                size = next(sizes) if fixed is None else fixed  # type: ignore[arg-type]
                if pos + size > end:
                    raise CorruptionError(f"column {name!r} needs {size} bytes, sample has "
                                          f"{end - pos} left")
                out[name] = dec(buf, pos, size)
                pos += size
            if pos != end:
                raise CorruptionError(f"sample has {end - pos} trailing bytes after its columns")
            return out
        return decode


class _FrozenDict(dict):
    """A dict that refuses mutation, so ``schema.columns`` cannot drift from the encoders."""

    def _readonly(self, *args, **kwargs):
        raise TypeError("Schema.columns is read-only")

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = _readonly  # type: ignore
