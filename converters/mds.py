"""MosaicML Streaming (MDS) directories -> streamshard samples, read from the documented layout.

No runtime dependency on ``mosaicml-streaming``; the layout below is that of its ``MDSWriter``
(streaming/base/format/mds/writer.py and encodings.py, mosaicml-streaming 0.13)::

    index.json   {"version": 2, "shards": [{"format": "mds", "version": 2, "samples": N,
                   "column_names": [...], "column_encodings": [...], "column_sizes": [int|null],
                   "compression": "zstd:7" | null, "raw_data": {"basename", "bytes"},
                   "zip_data": {"basename", "bytes"} | null}, ...]}
    shard file   u32 num_samples | u32 offsets[num_samples + 1] (absolute) | config JSON |
                 sample bytes; a sample is u32 size of each variable-size column (column_sizes
                 null), then each column's encoded bytes in column order.

The uncompressed ``raw_data`` file is read when present, else ``zip_data`` is decompressed
(zstd, gz, bz2; br and snappy with their optional packages). Encodings -> column types:
``bytes``/``str``/``json`` as is; ``int`` -> int64; ``uint8``..``float64`` scalars as is;
``str_int`` -> int64, ``str_float`` -> float64, ``str_decimal`` -> str (exact text);
``ndarray:DTYPE:SHAPE`` -> ``DTYPE[SHAPE]``, ``ndarray:DTYPE`` -> ``DTYPE[...]``, ``ndarray`` ->
``DTYPE[...]`` with DTYPE taken from the first sample (a later different dtype is an error);
``jpeg``/``png`` -> ``image`` (the stored bytes are plain image files); the other image
encodings (``pil``, ``jpeg_array``, ``list[...]``) -> ``bytes`` holding the stored MDS bytes
unchanged. ``pkl`` columns are refused:
streamshard never unpickles data.
"""

from __future__ import annotations

import bz2
import gzip
import json
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from streamshard.converters import Piece, ReadContext, register
from streamshard.errors import ConfigError, InputError, missing_dependency

INDEX_FILE = "index.json"
_SCALARS = ("uint8", "uint16", "uint32", "uint64", "int8", "int16", "int32", "int64",
            "float16", "float32", "float64")
_AS_BYTES = ("bytes", "pil", "jpeg", "png", "jpeg_array", "jpegarray",
             "list[pil]", "list[jpeg]", "list[png]")
# NDArray dynamic-dtype codes and shape-dtype codes (encodings.py, NDArray._int2*_dtype)
_VALUE_DTYPES = {8: "uint8", 9: "int8", 16: "uint16", 17: "int16", 18: "float16", 32: "uint32",
                 33: "int32", 34: "float32", 64: "uint64", 65: "int64", 66: "float64"}
_SHAPE_DTYPES = {0: "<u1", 1: "<u2", 2: "<u4", 3: "<u8"}


@dataclass(frozen=True)
class MDSColumn:
    """One MDS column: ``size`` is its fixed byte size or ``None`` (sizes in the sample head)."""

    name: str
    encoding: str
    size: int | None

    def ndarray(self) -> tuple[str | None, tuple[int, ...] | None]:
        """``(dtype, shape)`` of an ``ndarray[:dtype[:shape]]`` encoding (``None`` = dynamic)."""
        parts = self.encoding.split(":")
        dtype = parts[1] if len(parts) > 1 else None
        shape = tuple(int(d) for d in parts[2].split(",")) if len(parts) > 2 else None
        return dtype, shape


def load_index(path: str) -> tuple[str, list[dict]]:
    """``(root_dir, shards)`` of an MDS ``index.json`` (``path`` may be the directory)."""
    if os.path.isdir(path):
        path = os.path.join(path, INDEX_FILE)
    try:
        with open(path, "rb") as f:
            obj = json.loads(f.read())
    except FileNotFoundError:
        raise InputError(f"{path}: missing; is this an MDS directory?") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not valid JSON: {exc}") from None
    shards = obj.get("shards") if isinstance(obj, dict) else None
    if not isinstance(shards, list):
        raise InputError(f"{path}: no 'shards' list; is this an MDS index.json?")
    if obj.get("version") != 2:
        raise InputError(f"{path}: MDS index version {obj.get('version')!r} is not supported "
                         f"(this reader supports version 2)")
    for i, shard in enumerate(shards):
        fmt = shard.get("format") if isinstance(shard, dict) else None
        if fmt != "mds":
            raise InputError(f"{path}: shard {i} has format {fmt!r}; only 'mds' shards are "
                             f"supported (not csv/tsv/json)")
        if shard.get("version") != 2:
            raise InputError(f"{path}: shard {i} has MDS shard version {shard.get('version')!r}, "
                             f"this reader supports version 2")
    return os.path.dirname(path), shards


def shard_columns(path: str, shard: dict) -> list[MDSColumn]:
    """The columns of one shard entry; refuses ``pkl`` and unknown encodings."""
    try:
        names, encs, sizes = (shard["column_names"], shard["column_encodings"],
                              shard["column_sizes"])
    except KeyError as exc:
        raise InputError(f"{path}: shard {shard.get('raw_data')} lacks {exc}") from None
    cols = [MDSColumn(n, e, s) for n, e, s in zip(names, encs, sizes)]
    for col in cols:
        base = col.encoding.split(":")[0]
        if base == "pkl":
            raise InputError(f"{path}: column {col.name!r} uses the 'pkl' (pickle) encoding; "
                             f"streamshard never unpickles data. Re-export that column with a "
                             f"safe encoding (json, bytes, ndarray) and convert again")
        if base not in (*_SCALARS, *_AS_BYTES, "str", "int", "json", "str_int", "str_float",
                        "str_decimal", "ndarray"):
            raise InputError(f"{path}: column {col.name!r} has unknown MDS encoding "
                             f"{col.encoding!r}")
    return cols


def column_type(col: MDSColumn, first_dtype: str | None = None) -> str:
    """The streamshard type string for one MDS column."""
    enc = col.encoding
    if enc in ("jpeg", "png"):
        return "image"  # the stored bytes are a plain JPEG / PNG file: streamshard.media decodes
    if enc in _AS_BYTES:
        return "bytes"
    if enc in ("str", "json"):
        return enc
    if enc == "str_decimal":
        return "str"
    if enc in ("int", "str_int"):
        return "int64"
    if enc == "str_float":
        return "float64"
    if enc in _SCALARS:
        return enc
    dtype, shape = col.ndarray()
    dtype = dtype or first_dtype or "uint8"
    return f"{dtype}[{','.join(map(str, shape))}]" if shape else f"{dtype}[...]"


def _decompressor(path: str, algo: str) -> Callable[[bytes, int], bytes]:
    name = algo.split(":")[0]
    if name == "zstd":
        import zstandard

        return lambda data, n: zstandard.ZstdDecompressor().decompress(data, max_output_size=n)
    if name == "gz":
        return lambda data, n: gzip.decompress(data)
    if name == "bz2":
        return lambda data, n: bz2.decompress(data)
    if name == "br":
        try:
            import brotli
        except ImportError:
            raise missing_dependency("brotli", "mds", f"{path}: brotli-compressed MDS") from None
        return lambda data, n: brotli.decompress(data)
    if name == "snappy":
        try:
            import snappy
        except ImportError:
            raise missing_dependency("python-snappy", "mds",
                                     f"{path}: snappy-compressed MDS") from None
        return lambda data, n: snappy.decompress(data)
    raise InputError(f"{path}: unknown MDS compression {algo!r} (known: zstd, gz, bz2, br, snappy)")


def shard_bytes(root: str, shard: dict) -> tuple[str, bytes]:
    """``(file, raw shard bytes)``: the raw file if present, else the decompressed zip file."""
    raw = shard.get("raw_data") or {}
    raw_path = os.path.join(root, raw.get("basename", ""))
    if raw.get("basename") and os.path.isfile(raw_path):
        with open(raw_path, "rb") as f:
            return raw_path, f.read()
    zipped = shard.get("zip_data") or {}
    if not zipped.get("basename") or not shard.get("compression"):
        raise InputError(f"{raw_path}: MDS shard file missing (and no compressed copy listed)")
    zip_path = os.path.join(root, zipped["basename"])
    try:
        with open(zip_path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise InputError(f"{zip_path}: MDS shard file missing (neither it nor {raw_path} "
                         f"exists)") from None
    try:
        out = _decompressor(zip_path, shard["compression"])(data, int(raw.get("bytes") or 0))
    except (InputError, ImportError):
        raise
    except Exception as exc:  # each codec has its own error class; all mean a bad file
        raise InputError(f"{zip_path}: cannot decompress ({shard['compression']}): {exc}") from None
    return zip_path, out


def _scalar_reader(enc: str) -> Callable[[bytes], Any]:
    if enc in _SCALARS:
        dt = np.dtype(enc).newbyteorder("<")
        return lambda b: np.frombuffer(b, dt, 1)[0].item()
    if enc == "int":
        return lambda b: int(np.frombuffer(b, "<i8", 1)[0])
    if enc == "str_int":
        def to_int(b: bytes) -> int:
            value = int(b.decode("utf-8"))
            if not -2**63 <= value < 2**63:
                raise ValueError(f"str_int value {value} does not fit int64")
            return value
        return to_int
    if enc == "str_float":
        return lambda b: float(b.decode("utf-8"))
    if enc in ("str", "str_decimal"):
        return lambda b: b.decode("utf-8")
    if enc == "json":
        return lambda b: json.loads(b.decode("utf-8"))
    return bytes  # bytes and the image encodings: stored bytes unchanged


def _ndarray_reader(col: MDSColumn) -> Callable[[bytes], np.ndarray]:
    dtype, shape = col.ndarray()

    def read(b: bytes) -> np.ndarray:
        pos = 0
        dt = dtype
        if dt is None:
            dt = _VALUE_DTYPES.get(b[0]) if b else None
            if dt is None:
                raise ValueError(f"unknown ndarray dtype code {b[0] if b else None}")
            pos = 1
        shp = shape
        if shp is None:
            ndim, code = b[pos] >> 2, b[pos] & 3
            pos += 1
            width = np.dtype(_SHAPE_DTYPES[code]).itemsize
            shp = tuple(int(d) for d in np.frombuffer(b, _SHAPE_DTYPES[code], ndim, pos))
            pos += ndim * width
        arr = np.frombuffer(b, np.dtype(dt).newbyteorder("<"), offset=pos)
        return arr.reshape(shp).copy()
    return read


def iter_shard(file: str, data: bytes, cols: list[MDSColumn]) -> Iterator[dict]:
    """Decode every sample of one raw MDS shard; ``InputError`` names the file and sample."""
    if len(data) < 8:
        raise InputError(f"{file}: {len(data)} bytes is too short for an MDS shard")
    n = int(np.frombuffer(data, "<u4", 1)[0])
    if 4 + 4 * (n + 1) > len(data):
        raise InputError(f"{file}: header claims {n} samples, more than the file can hold")
    offsets = np.frombuffer(data, "<u4", n + 1, 4).astype(np.int64)
    if offsets[-1] > len(data) or np.any(np.diff(offsets) < 0):
        raise InputError(f"{file}: sample offsets out of order or beyond the file "
                         f"({len(data)} bytes)")
    readers = [_ndarray_reader(c) if c.encoding.startswith("ndarray") else
               _scalar_reader(c.encoding) for c in cols]
    nvar = sum(c.size is None for c in cols)
    for k in range(n):
        start, end = int(offsets[k]), int(offsets[k + 1])
        try:
            sizes = iter(np.frombuffer(data, "<u4", nvar, start).tolist())
            pos = start + 4 * nvar
            sample = {}
            for col, read in zip(cols, readers):
                size = col.size if col.size is not None else next(sizes)
                if pos + size > end:
                    raise ValueError(f"column {col.name!r} runs past the sample's end")
                sample[col.name] = read(data[pos:pos + size])
                pos += size
        except (ValueError, UnicodeDecodeError, KeyError, IndexError) as exc:
            raise InputError(f"{file}: sample {k}: cannot decode: {exc}") from None
        yield sample


class MDSConverter:
    """``--format mds``: SRC is an MDS directory (its ``index.json`` is picked up) or the
    ``index.json`` itself. Pieces are runs of whole MDS shards."""

    name = "mds"
    help = "MosaicML Streaming MDS directories (index.json + shards); pkl columns refused"
    options: tuple = ()
    extensions = (INDEX_FILE,)

    def columns(self, files: Sequence[str], options: Mapping[str, Any]) -> dict[str, str]:
        result: dict[str, str] | None = None
        roots = [os.path.dirname(os.path.abspath(f)) for f in files]
        for path, root in zip(files, roots):
            nested = [r for r in roots if r != root and root.startswith(r + os.sep)]
            if nested:
                raise ConfigError(f"{path}: lies inside the MDS directory {nested[0]} given as "
                                  f"well; pass the top-level directory or the subdirectories, "
                                  f"not both")
            root_dir, shards = load_index(path)
            first: dict[str, str | None] = {}  # untyped ndarray column -> first value's dtype
            for shard in shards:
                cols = shard_columns(path, shard)
                for c in cols:
                    if c.encoding == "ndarray" and c.name not in first:
                        first[c.name] = self._first_dtype(root_dir, shards, c)
                types = {c.name: column_type(c, first.get(c.name)) for c in cols}
                if result is not None and types != result:
                    raise InputError(f"{path}: shard {shard['raw_data']['basename']} has "
                                     f"columns {types}, the first shard has {result}")
                result = types
        if result is None:
            raise ConfigError("--format mds: no MDS shards found in the inputs")
        return result

    @staticmethod
    def _first_dtype(root: str, shards: list[dict], col: MDSColumn) -> str | None:
        """The dtype of the first value of an untyped ``ndarray`` column."""
        if col.encoding != "ndarray":
            return None
        for shard in shards:
            if shard.get("samples"):
                file, data = shard_bytes(root, shard)
                for sample in iter_shard(file, data, shard_columns(file, shard)):
                    return sample[col.name].dtype.name
        return None

    def split(self, path: str, name: str, size: int, chunk_bytes: int,
              options: Mapping[str, Any]) -> list[Piece]:
        _, shards = load_index(path)
        pieces: list[Piece] = []
        start, acc = 0, 0
        for i, shard in enumerate(shards):
            acc += int((shard.get("raw_data") or {}).get("bytes") or 0)
            if acc >= chunk_bytes or i == len(shards) - 1:
                pieces.append(Piece(path, name, start, i + 1, acc))
                start, acc = i + 1, 0
        return pieces

    def read(self, piece: Piece, options: Mapping[str, Any], ctx: ReadContext) -> Iterator[dict]:
        root, shards = load_index(piece.path)
        types = self.columns([piece.path], options)
        where = ["", 0]
        ctx.set_locator(lambda: f"{where[0]}: sample {where[1]}")
        for shard in shards[piece.start:piece.end]:
            file, data = shard_bytes(root, shard)
            where[0] = file
            for k, sample in enumerate(iter_shard(file, data, shard_columns(file, shard))):
                where[1] = k
                for col, typ in types.items():
                    if typ.endswith("[...]") and sample[col].dtype.name != typ[:-5]:
                        raise InputError(f"{file}: sample {k}: column {col!r} has dtype "
                                         f"{sample[col].dtype.name}, earlier samples {typ[:-5]}")
                yield sample
            ctx.advance(int((shard.get("raw_data") or {}).get("bytes") or len(data)))


register("mds", MDSConverter())
