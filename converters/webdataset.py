"""WebDataset tar shards -> streamshard samples, one sample per key.

WebDataset's convention (webdataset/tariterators.py, ``base_plus_ext`` and ``group_by_keys``,
webdataset 1.0): a member ``dir/abc.seg.png`` has key ``dir/abc`` (up to the first dot of the
basename) and field ``seg.png`` (the rest, lower-cased); consecutive members with the same key
form one sample. Every field is kept: a column per field name, plus ``__key__: str``.

Field types follow the last extension: ``txt``/``text`` -> ``str``, ``json``/``jsn`` -> ``json``,
``cls``/``cls2``/``index``/``inx``/``id`` -> ``int64``; image extensions (``jpg``, ``png``,
``webp``, ...) -> ``image`` and audio ones (``wav``, ``flac``, ``mp3``, ...) -> ``audio``, both
the member bytes unchanged (decoded in the loader by ``streamshard.media``); everything else
(npy, ...) -> ``bytes`` unchanged. ``--wds-raw`` keeps every field as ``bytes``. When a sample lacks a field
that others have, its value is empty (``b""``, ``""``, ``0`` or JSON ``null``) and the
``__missing__: json`` column lists the fields absent from each sample (``[]`` when complete), so
absence stays distinguishable from an empty file. The column is always present, so the schema
does not depend on which tar a worker reads.

The field set is ``--wds-fields a,b,c`` when given (a member with another field is then a bad
record). Without it, every tar's member headers are scanned and all tars must hold the same field
set (else an ``InputError`` naming the tar and suggesting ``--wds-fields``): each worker sees only
its own tar, and the schema must be the same for all of them. A member without an extension, a
duplicate field in one sample, or an undecodable ``.txt``/``.json``/``.cls`` is a bad record
naming the tar and the member (``--skip-errors`` skips that sample).

Plain, gzip, bz2 and xz tars are read (``tarfile`` detects the compression). Scanning headers
seeks over the data of an uncompressed tar; a compressed one is decompressed for the scan too.
"""

from __future__ import annotations

import json
import re
import tarfile
from typing import Any, Iterator, Mapping, Sequence

from streamshard.converters import Option, Piece, ReadContext, register
from streamshard.errors import ConfigError, InputError

_KEY_RE = re.compile(r"^((?:.*/|)[^./]+)[.]([^/]*)$")  # webdataset's base_plus_ext
_TYPES = {"txt": "str", "text": "str", "json": "json", "jsn": "json",
          "cls": "int64", "cls2": "int64", "index": "int64", "inx": "int64", "id": "int64",
          # webdataset's image extensions (autodecode.py IMAGE_EXTENSIONS) and common audio:
          # stored unchanged, typed so that streamshard.media.decode_media finds them.
          **dict.fromkeys(("jpg", "jpeg", "img", "png", "ppm", "pgm", "pbm", "pnm", "webp",
                           "bmp", "gif", "tif", "tiff"), "image"),
          **dict.fromkeys(("wav", "flac", "mp3", "ogg", "m4a", "opus"), "audio")}
_EMPTY = {"bytes": b"", "str": "", "json": None, "int64": 0, "image": b"", "audio": b""}
KEY_COLUMN = "__key__"
MISSING_COLUMN = "__missing__"


def split_name(name: str) -> tuple[str, str] | None:
    """``"a/b.seg.PNG"`` -> ``("a/b", "seg.png")``; ``None`` when there is no extension."""
    match = _KEY_RE.match(name)
    if not match:
        return None
    return match.group(1), match.group(2).lower()


def field_type(field: str, raw: bool = False) -> str:
    """The column type of a field (by its last extension)."""
    return "bytes" if raw else _TYPES.get(field.rsplit(".", 1)[-1], "bytes")


def decode_field(typ: str, data: bytes) -> Any:
    """Decode one member's bytes for a column of type ``typ``; ``ValueError`` if malformed."""
    if typ in ("bytes", "image", "audio"):
        return data
    text = data.decode("utf-8")
    if typ == "str":
        return text
    if typ == "json":
        return json.loads(text)
    value = int(text.strip())
    if not -2**63 <= value < 2**63:
        raise ValueError(f"{value} does not fit int64")
    return value


def _open(path: str, stream: bool = False) -> tarfile.TarFile:
    """Random access for header scans (an uncompressed tar seeks over the data); ``stream``
    for reading data strictly front to back (never a backwards seek in a gzip stream)."""
    try:
        return tarfile.open(path, "r|*" if stream else "r:*")
    except (tarfile.TarError, OSError) as exc:
        raise InputError(f"{path}: not a readable tar file: {exc}") from None


def iter_groups(path: str, with_data: bool = False
                ) -> Iterator[tuple[str, list[tuple[str, str, bytes | None]], str | None]]:
    """Yield ``(key, [(field, member name, data)], error)`` for each run of members sharing a
    key; ``error`` names a problem with the group (member without extension, duplicate field).
    ``data`` is read (in stream order) only ``with_data``."""
    with _open(path, stream=with_data) as tar:
        yield from _regroup(path, tar, with_data)


def scan_fields(path: str) -> list[str]:
    """The sorted field names used by the well-formed samples of one tar."""
    names: set[str] = set()
    for _, fields, error in iter_groups(path):
        if error is None:
            names.update(f for f, _, _ in fields)
    return sorted(names)


def _declared(spec: str | None) -> list[str] | None:
    if not spec:
        return None
    fields = [f.strip().lower() for f in spec.split(",")]
    if any(not f for f in fields) or len(set(fields)) != len(fields):
        raise ConfigError(f"--wds-fields: expected distinct comma-separated field names like "
                          f"'jpg,cls,json', got {spec!r}")
    return sorted(fields)


class WebDatasetConverter:
    """``--format webdataset``: SRC is tar files or directories of them; one piece per tar."""

    name = "webdataset"
    help = "WebDataset tar shards: members grouped by key, every field kept"
    options = (
        Option("--wds-raw", "webdataset: keep every field as bytes (no .txt/.json/.cls decoding)",
               is_flag=True, default=False),
        Option("--wds-fields", "webdataset: the fields (extensions) of the dataset, comma-"
               "separated; needed when tars differ in their field sets"),
    )
    extensions = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")

    def columns(self, files: Sequence[str], options: Mapping[str, Any]) -> dict[str, str]:
        if not files:
            raise ConfigError("--format webdataset: no tar files given")
        fields = _declared(options["wds_fields"])
        if fields is None:
            first = None
            for path in files:
                found = scan_fields(path)
                if first is not None and found != first[1]:
                    raise InputError(f"{path}: fields {found} differ from {first[1]} in "
                                     f"{first[0]}; declare the union with --wds-fields "
                                     f"{','.join(sorted(set(found) | set(first[1])))}")
                first = first or (path, found)
            fields = first[1] if first else []
        return self._schema(fields, options)

    @staticmethod
    def _schema(fields: list[str], options: Mapping[str, Any]) -> dict[str, str]:
        cols = {KEY_COLUMN: "str"}
        for field in fields:
            if field in (KEY_COLUMN, MISSING_COLUMN):
                raise InputError(f"field {field!r} collides with a reserved column name")
            cols[field] = field_type(field, options["wds_raw"])
        cols[MISSING_COLUMN] = "json"
        return cols

    def split(self, path: str, name: str, size: int, chunk_bytes: int,
              options: Mapping[str, Any]) -> list[Piece]:
        return [Piece(path, name, 0, 1, size)]

    def read(self, piece: Piece, options: Mapping[str, Any], ctx: ReadContext) -> Iterator[dict]:
        fields = _declared(options["wds_fields"]) or scan_fields(piece.path)
        cols = self._schema(fields, options)
        where = [""]
        ctx.set_locator(lambda: f"{piece.name}: key {where[0]!r}")
        for key, members, error in iter_groups(piece.path, with_data=True):
            where[0] = key
            if error is not None:
                ctx.bad_record(InputError(f"{piece.name}: {error}"))
                continue
            sample: dict[str, Any] = {KEY_COLUMN: key}
            bad = None
            for field, member, data in members:
                if field not in cols:
                    bad = f"field {field!r} of key {key!r} is not in --wds-fields"
                    break
                try:
                    sample[field] = decode_field(cols[field], data or b"")
                except (ValueError, UnicodeDecodeError) as exc:
                    bad = f"member {member!r}: cannot decode as {cols[field]}: {exc}"
                    break
            if bad is not None:
                ctx.bad_record(InputError(f"{piece.name}: {bad}"))
                continue
            absent = [f for f in fields if f not in sample]
            for field in absent:
                sample[field] = _EMPTY[cols[field]]
            sample[MISSING_COLUMN] = absent
            yield sample
        ctx.advance(piece.nbytes)


def _regroup(path: str, tar: tarfile.TarFile, with_data: bool):
    key: str | None = None
    fields: list[tuple[str, str, bytes | None]] = []
    error = None
    try:
        for member in tar:
            if not member.isfile():
                continue
            parts = split_name(member.name)
            if parts is None:
                if key is not None:
                    yield key, fields, error
                yield member.name, [], f"member {member.name!r} has no extension"
                key, fields, error = None, [], None
                continue
            if parts[0] != key:
                if key is not None:
                    yield key, fields, error
                key, fields, error = parts[0], [], None
            if any(f == parts[1] for f, _, _ in fields):
                error = f"key {key!r} has the field {parts[1]!r} twice"
            data = tar.extractfile(member).read() if with_data else None  # type: ignore
            fields.append((parts[1], member.name, data))
        if key is not None:
            yield key, fields, error
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise InputError(f"{path}: corrupt or truncated tar after key {key!r}: {exc}") from None


register("webdataset", WebDatasetConverter())
