"""Token files cut into fixed-length samples: ``.npy`` (any shape, read in C order as one token
stream; dtype from the header) or raw little-endian binary (``--dtype`` required).

Each file is its own stream: ``--seq-len L`` cuts it into samples ``tokens: DTYPE[L]``. The last
``n % L`` tokens of a file are kept as one shorter sample with ``--keep-tail`` (the column is then
``DTYPE[]``), otherwise counted as ``dropped_tokens`` in the summary - never silently.
"""

from __future__ import annotations

import os
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from streamshard.converters import Option, Piece, ReadContext, register
from streamshard.errors import ConfigError, InputError

DTYPES = ("uint16", "uint32", "int32")
_READ_TOKENS = 1 << 21  # tokens per read (4-8 MB), rounded down to whole samples


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise ValueError(f"must be positive, got {value}")
    return value


def _layout(path: str, dtype_opt: str | None) -> tuple[np.dtype, int, int]:
    """``(dtype, data_offset, num_tokens)`` of one token file; ``InputError`` naming it."""
    if path.endswith(".npy"):
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise InputError(f"{path}: not a readable .npy token array: {exc}") from None
        if not isinstance(arr, np.memmap):
            raise InputError(f"{path}: not a .npy array file")
        if arr.dtype.name not in DTYPES:
            raise InputError(f"{path}: dtype {arr.dtype} is not a token dtype ({', '.join(DTYPES)})")
        if arr.ndim > 1 and not arr.flags.c_contiguous:
            raise InputError(f"{path}: Fortran-ordered {arr.ndim}-D arrays are not supported; "
                             f"save it with np.ascontiguousarray")
        if dtype_opt and arr.dtype.name != dtype_opt:
            raise InputError(f"{path}: dtype {arr.dtype.name} differs from --dtype {dtype_opt}")
        dtype, offset, count = arr.dtype, int(arr.offset), int(arr.size)
        del arr
        return dtype, offset, count
    if not dtype_opt:
        raise ConfigError(f"{path}: raw token files need --dtype ({', '.join(DTYPES)})")
    dtype = np.dtype(dtype_opt).newbyteorder("<")
    size = os.path.getsize(path)
    if size % dtype.itemsize:
        raise InputError(f"{path}: size {size} bytes is not a multiple of {dtype.itemsize} "
                         f"({dtype_opt}); is --dtype right?")
    return dtype, 0, size // dtype.itemsize


class TokensConverter:
    name = "tokens"
    help = "token arrays (.npy or raw binary) cut into fixed-length samples"
    options = (
        Option("--seq-len", "tokens: tokens per sample (required)", type=positive_int),
        Option("--dtype", "tokens: dtype of raw binary files (.npy carries its own)",
               choices=DTYPES),
        Option("--keep-tail", "tokens: keep each file's last short sample instead of dropping "
               "(and counting) it", is_flag=True, default=False),
    )
    extensions = (".npy", ".bin")

    def columns(self, files: Sequence[str], options: Mapping[str, Any]) -> dict[str, str]:
        if not options["seq_len"]:
            raise ConfigError("--format tokens needs --seq-len")
        dtype = options["dtype"]
        for path in files:
            found = _layout(path, dtype)[0].name
            if dtype is None:
                dtype = found
            elif found != dtype:
                raise InputError(f"{path}: dtype {found} differs from {dtype} of the first file")
        if dtype is None:
            raise ConfigError("--format tokens: no input files to take the dtype from; "
                              "pass --dtype")
        shape = "" if options["keep_tail"] else str(options["seq_len"])
        return {"tokens": f"{dtype}[{shape}]"}

    def split(self, path: str, name: str, size: int, chunk_bytes: int,
              options: Mapping[str, Any]) -> list[Piece]:
        dtype, _, count = _layout(path, options["dtype"])
        seq = options["seq_len"]
        per_piece = max(1, chunk_bytes // (seq * dtype.itemsize)) * seq
        pieces = []
        for start in range(0, max(count, 1), per_piece):
            end = min(start + per_piece, count)
            if count - end < seq:  # the tail rides with the last full piece
                end = count
            pieces.append(Piece(path, name, start, end, size * (end - start) // max(count, 1)))
            if end == count:
                break
        return pieces

    def read(self, piece: Piece, options: Mapping[str, Any], ctx: ReadContext) -> Iterator[dict]:
        dtype, offset, count = _layout(piece.path, options["dtype"])
        dtype = dtype.newbyteorder("<")
        seq = options["seq_len"]
        step = max(1, _READ_TOKENS // seq) * seq
        where = [piece.start]
        ctx.set_locator(lambda: f"{piece.name}: tokens {where[0]}..{where[0] + seq}")
        with open(piece.path, "rb") as f:
            f.seek(offset + piece.start * dtype.itemsize)
            pos = piece.start
            while pos < piece.end:
                n = min(step, piece.end - pos)
                buf = f.read(n * dtype.itemsize)
                if len(buf) != n * dtype.itemsize:
                    raise InputError(f"{piece.name}: file shrank while reading (token {pos})")
                arr = np.frombuffer(buf, dtype=dtype)
                full = n - n % seq
                for i in range(0, full, seq):
                    where[0] = pos + i
                    yield {"tokens": arr[i:i + seq]}
                if full < n:  # only in the file's last piece
                    where[0] = pos + full
                    if options["keep_tail"]:
                        yield {"tokens": arr[full:]}
                    else:
                        ctx.count("dropped_tokens", n - full)
                pos += n
                ctx.advance(piece.nbytes * n // max(piece.end - piece.start, 1))


register("tokens", TokensConverter())
