"""Plain text: ``--mode file`` (one sample per file: ``text``, ``path``) or ``--mode line`` (one
sample per non-blank line: ``text``). Also home of the line reader shared with ``jsonl``.

Line files are split into byte ranges ``[start, end)``; a range holds the lines whose first byte
lies in it, so ranges cut anywhere and every line is read exactly once. Line numbers are only
needed in error messages and are computed then (one newline count from the file start).
"""

from __future__ import annotations

import gzip
import io
from typing import Any, BinaryIO, Iterator, Mapping, Sequence

from streamshard.converters import Option, Piece, ReadContext, register
from streamshard.errors import InputError

_ADVANCE_EVERY = 1 << 20  # report progress every MiB of input, not every line


def is_compressed(path: str) -> bool:
    return path.endswith((".gz", ".zst"))


def open_binary(path: str) -> tuple[BinaryIO, BinaryIO]:
    """``(reader, raw)``: a buffered byte stream of ``path`` decompressed by extension (``.gz``,
    ``.zst``) and the raw file under it (its ``tell()`` is the on-disk progress)."""
    raw = open(path, "rb")
    try:
        if path.endswith(".gz"):
            return gzip.GzipFile(fileobj=raw, mode="rb"), raw
        if path.endswith(".zst"):
            import zstandard  # a hard dependency of streamshard

            stream = zstandard.ZstdDecompressor().stream_reader(raw, read_size=1 << 20)
            return io.BufferedReader(stream, buffer_size=1 << 20), raw
        return raw, raw
    except BaseException:
        raw.close()
        raise


def split_lines(path: str, name: str, size: int, chunk_bytes: int) -> list[Piece]:
    """Byte-range pieces of about ``chunk_bytes``; compressed files are one piece."""
    if is_compressed(path) or size <= chunk_bytes:
        return [Piece(path, name, 0, size, size)]
    return [Piece(path, name, s, min(s + chunk_bytes, size), min(chunk_bytes, size - s))
            for s in range(0, size, chunk_bytes)]


class LineReader:
    """Iterate the lines (bytes, newline kept) of ``piece``; ``where()`` names the last one as
    ``"name:LINE"`` with 1-based file line numbers."""

    def __init__(self, piece: Piece, ctx: ReadContext):
        self.piece, self.ctx = piece, ctx
        self._first_pos = 0  # file offset of the piece's first line
        self._count = 0  # lines yielded so far
        self._base: int | None = None

    def where(self) -> str:
        if self._base is None:
            self._base = _count_newlines(self.piece.path, self._first_pos)
        return f"{self.piece.name}:{self._base + self._count - 1}"

    def __iter__(self) -> Iterator[bytes]:
        piece, ctx = self.piece, self.ctx
        reader, raw = open_binary(piece.path)
        with reader, raw:
            if piece.start > 0:
                reader.seek(piece.start - 1)
                reader.readline()  # the rest of a line that began in the previous piece
            pos = self._first_pos = reader.tell() if piece.start > 0 else 0
            compressed = is_compressed(piece.path)
            reported = 0
            for line in self._lines(reader):
                if not compressed and pos >= piece.end:
                    break
                pos += len(line)
                self._count += 1
                yield line
                done = raw.tell() if compressed else pos - piece.start
                if done - reported >= _ADVANCE_EVERY:
                    ctx.advance(done - reported)
                    reported = done
            ctx.advance(piece.nbytes - reported if not compressed
                        else max(raw.tell() - reported, 0))


    def _lines(self, reader: BinaryIO) -> Iterator[bytes]:
        """The reader's lines; a truncated or corrupt compressed stream ends them with a bad
        record naming the file and the line after the last good one (the rest is unreadable)."""
        it = iter(reader)
        while True:
            try:
                line = next(it)
            except StopIteration:
                return
            except (EOFError, OSError, ValueError) as exc:  # gzip: EOFError/BadGzipFile; zstd
                self._count += 1
                self.ctx.bad_record(InputError(
                    f"{self.where()}: truncated or corrupt compressed input "
                    f"({type(exc).__name__}: {exc}); the rest of the file is skipped"))
                return
            yield line


def _count_newlines(path: str, upto: int) -> int:
    """1 + number of newlines before byte ``upto`` of the plain file ``path``."""
    if upto == 0:
        return 1
    n, left = 1, upto
    with open(path, "rb") as f:
        while left:
            block = f.read(min(left, 1 << 22))
            if not block:
                break
            n += block.count(b"\n")
            left -= len(block)
    return n


def decode_utf8(raw: bytes, where: str, ctx: ReadContext) -> str | None:
    """``raw`` as text, or ``None`` after reporting an ``InputError`` naming ``where``."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        ctx.bad_record(InputError(f"{where}: invalid UTF-8 at byte {exc.start}: {exc.reason}"))
        return None


class TextConverter:
    name = "text"
    help = "plain text files: one sample per file (text, path) or per non-blank line (text)"
    options = (
        Option("--mode", "text: 'file' = one sample per file, 'line' = one per non-blank line",
               default="file", choices=("file", "line")),
    )
    extensions = None  # every (non-hidden) file of a directory

    def columns(self, files: Sequence[str], options: Mapping[str, Any]) -> dict[str, str]:
        if options["mode"] == "file":
            return {"text": "str", "path": "str"}
        return {"text": "str"}

    def split(self, path: str, name: str, size: int, chunk_bytes: int,
              options: Mapping[str, Any]) -> list[Piece]:
        if options["mode"] == "file":
            return [Piece(path, name, 0, size, size)]
        return split_lines(path, name, size, chunk_bytes)

    def read(self, piece: Piece, options: Mapping[str, Any], ctx: ReadContext) -> Iterator[dict]:
        if options["mode"] == "file":
            ctx.set_locator(lambda: piece.name)
            reader, raw = open_binary(piece.path)
            with reader, raw:
                data = reader.read()
            ctx.advance(piece.nbytes)
            text = decode_utf8(data, piece.name, ctx)
            if text is not None:
                yield {"text": text, "path": piece.name}
            return
        lines = LineReader(piece, ctx)
        ctx.set_locator(lines.where)
        for raw_line in lines:
            text = decode_utf8(raw_line, lines.where(), ctx) if not raw_line.isascii() \
                else raw_line.decode("ascii")
            if text is None or not text.strip():
                continue
            yield {"text": text.rstrip("\r\n")}


register("text", TextConverter())
