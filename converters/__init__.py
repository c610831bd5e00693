"""Input formats for ``streamshard convert``: the ``Converter`` protocol and an explicit registry.

A converter turns input files into sample dicts. The driver (``streamshard/convert.py``) asks it
for the dataset columns, splits every input file into *pieces* with :meth:`Converter.split`, packs
pieces into deterministic chunks, and calls :meth:`Converter.read` on each piece inside a worker
process. Converters never write shards themselves.

Registration is explicit: each built-in module is listed in ``_BUILTIN`` and calls
:func:`register` at import. A module whose optional dependency (pyarrow, ...) is missing still
registers; it raises ``MissingDependencyError`` with an install hint only when used.
"""

from __future__ import annotations

import glob
import importlib
import os
import time
import types
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Protocol, Sequence

from streamshard.errors import ConfigError, InputError

# What a converter plugin and its users need; the conversion driver's helpers (discover,
# resolve_options, option_values, CountingContext) are importable but not exported.
__all__ = ["Converter", "Option", "Piece", "REGISTRY", "ReadContext", "available", "get",
           "parse_fields", "register", "typed_fields"]
assert sorted(__all__) == __all__


@dataclass(frozen=True)
class Option:
    """A format option shown by ``streamshard convert``: ``flag`` like ``"--seq-len"``.

    Two converters may declare the same flag only with an identical ``Option`` (``--fields`` is
    shared by jsonl and parquet). ``default`` is applied by the driver when the user gives nothing;
    giving an option the chosen format does not declare is a usage error."""

    flag: str
    help: str
    type: Callable[[str], Any] = str
    default: Any = None
    choices: tuple[str, ...] | None = None
    is_flag: bool = False  # a store_true switch

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")


@dataclass(frozen=True)
class Piece:
    """One unit of input: ``[start, end)`` of ``path`` in converter-defined units (bytes for
    line files, sample rows for tokens, row groups for parquet). ``name`` is the path relative to
    the SRC argument it came from (stored in samples where a converter keeps paths, and shown in
    errors); ``nbytes`` is the share of the input file's on-disk bytes (progress, ETA, packing)."""

    path: str
    name: str
    start: int
    end: int
    nbytes: int


class ReadContext(Protocol):
    """What a converter reports to the driver while reading one piece. Not thread-safe; one
    per piece. ``bad_record`` raises the error (strict mode) or counts it (``--skip-errors``) and
    returns, in which case the converter skips that record and continues."""

    def bad_record(self, error: InputError) -> None: ...

    def count(self, name: str, n: int) -> None:
        """Add ``n`` to a named summary counter (``dropped_tokens``, ...)."""

    def advance(self, nbytes: int) -> None:
        """``nbytes`` more on-disk input bytes consumed (progress only, never the output)."""

    def set_locator(self, locator: Callable[[], str]) -> None:
        """Install a callable naming the record last yielded (``"a.jsonl:17"``); the driver uses it
        when the writer rejects that sample (``SchemaError``)."""


MAX_EXAMPLES = 5  # skipped-record messages kept for the summary
_TICK = 0.2  # seconds between progress reports from a chunk


class Converter(Protocol):
    """One input format. Instances are immutable, picklable (they are sent to spawned worker
    processes) and hold no open files; ``repr`` need not be stable. ``options`` values arrive
    as a plain dict keyed by ``Option.dest`` with defaults filled in."""

    name: str
    help: str
    options: tuple[Option, ...]
    extensions: tuple[str, ...] | None  # files picked up when a SRC is a directory; None = all

    def columns(self, files: Sequence[str], options: Mapping[str, Any]) -> dict[str, str]:
        """Column name -> type string of the dataset. May read headers of ``files`` (all inputs,
        sorted). Raises ``InputError`` naming the file whose layout disagrees with the first."""

    def split(self, path: str, name: str, size: int, chunk_bytes: int,
              options: Mapping[str, Any]) -> list[Piece]:
        """Cut one input file (``size`` bytes on disk) into pieces of about ``chunk_bytes``;
        a function of its arguments only (determinism across ``--workers``)."""

    def read(self, piece: Piece, options: Mapping[str, Any], ctx: ReadContext) -> Iterator[dict]:
        """Yield the samples of ``piece`` in input order. Malformed records go to
        ``ctx.bad_record(InputError(...))`` naming file and line/record/row."""


class CountingContext:
    """The driver's ``ReadContext`` for one chunk (also handy in converter tests): counts samples
    (the driver increments ``samples``), skipped records with the first ``MAX_EXAMPLES`` messages,
    and named counters; ``tick()`` forwards progress increments to ``report(samples, bytes)`` at
    most every ``_TICK`` seconds."""

    def __init__(self, skip_errors: bool, report: Callable[[int, int], None]):
        self.skip_errors, self.report = skip_errors, report
        self.samples = self.skipped = 0
        self.examples: list[str] = []
        self.counters: dict[str, int] = {}
        self.where: Callable[[], str] = lambda: "?"
        self._sent_samples = self._bytes = 0
        self._last = time.monotonic()

    def bad_record(self, error: InputError) -> None:
        if not self.skip_errors:
            raise error
        self.skipped += 1
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append(str(error))

    def count(self, name: str, n: int) -> None:
        self.counters[name] = self.counters.get(name, 0) + n

    def advance(self, nbytes: int) -> None:
        self._bytes += nbytes

    def set_locator(self, locator: Callable[[], str]) -> None:
        self.where = locator

    def tick(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._last >= _TICK:
            self._last = now
            self.report(self.samples - self._sent_samples, self._bytes)
            self._sent_samples, self._bytes = self.samples, 0


_REGISTRY: dict[str, Converter] = {}
REGISTRY: Mapping[str, Converter] = types.MappingProxyType(_REGISTRY)

# Built-in converter modules, imported in this order by _load_builtins(). Other formats add their
# module here (one line) and call register() at import time.
_BUILTIN = (
    "streamshard.converters.jsonl",
    "streamshard.converters.text",
    "streamshard.converters.tokens",
    "streamshard.converters.parquet",
    "streamshard.converters.megatron",
    "streamshard.converters.mds",
    "streamshard.converters.webdataset",
    "streamshard.converters.hf",
    "streamshard.converters.imagefolder",
)
_loaded = False


def register(name: str, converter: Converter) -> Converter:
    """Register ``converter`` under ``name``. Registering a name twice raises ``ConfigError``."""
    if not name or not name.replace("-", "").replace("_", "").isalnum():
        raise ConfigError(f"converter name must be alphanumeric (with - or _), got {name!r}")
    if name in _REGISTRY:
        raise ConfigError(f"converter {name!r} is already registered "
                          f"({type(_REGISTRY[name]).__module__}); names must be unique")
    flags = {o.flag: o for c in _REGISTRY.values() for o in c.options}
    for opt in converter.options:
        if opt.flag in flags and flags[opt.flag] != opt:
            raise ConfigError(f"converter {name!r}: option {opt.flag} differs from the one "
                              f"already declared by another converter: {flags[opt.flag]}")
    _REGISTRY[name] = converter
    return converter


def _load_builtins() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for module in _BUILTIN:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            # A listed module that is not (yet) part of this installation is skipped; a module
            # that exists but fails importing something else is a real error.
            if exc.name != module:
                raise


def get(name: str) -> Converter:
    """The converter registered as ``name``; ``ConfigError`` listing the known names if none."""
    _load_builtins()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown format {name!r}; known formats: "
                          f"{', '.join(sorted(_REGISTRY)) or '(none)'}") from None


def available() -> Mapping[str, Converter]:
    """All registered converters (read-only view), built-ins loaded."""
    _load_builtins()
    return REGISTRY


def option_values(converter: Converter, given: Mapping[str, Any]) -> dict[str, Any]:
    """The converter's options from ``given`` (``None`` = not given) with defaults filled in."""
    out = {}
    for opt in converter.options:
        value = given.get(opt.dest)
        out[opt.dest] = opt.default if value is None else value
    return out


def resolve_options(converter: Converter, given: Mapping[str, Any]) -> dict[str, Any]:
    """:func:`option_values` after checking that every option given (not ``None``/``False``)
    belongs to ``converter``; ``ConfigError`` naming the stray flag otherwise."""
    given = {k: v for k, v in given.items() if v is not None and v is not False}
    extra = sorted(set(given) - {o.dest for o in converter.options})
    if extra:
        raise ConfigError(f"option --{extra[0].replace('_', '-')} does not apply to --format "
                          f"{converter.name} (its options: "
                          f"{', '.join(o.flag for o in converter.options) or 'none'})")
    return option_values(converter, given)


def parse_fields(spec: str | None) -> list[tuple[str, str | None]]:
    """``"text:str,id:int64,meta"`` -> ``[("text","str"), ("id","int64"), ("meta", None)]``.

    A field without a type gets ``None`` (the converter picks). Raises ``ConfigError`` for empty
    names and duplicates. Array types contain commas (``float32[*,3]``), so commas inside
    brackets do not split."""
    if not spec:
        return []
    parts, depth, cur = [], 0, []
    for ch in spec:
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    fields: list[tuple[str, str | None]] = []
    for part in parts:
        name, _, typ = part.strip().partition(":")
        name, typ = name.strip(), typ.strip()
        if not name:
            raise ConfigError(f"--fields: empty field name in {spec!r}")
        if any(name == f for f, _ in fields):
            raise ConfigError(f"--fields: field {name!r} is listed twice")
        fields.append((name, typ or None))
    return fields


def _check_types(fields: Sequence[tuple[str, str]]) -> None:
    from streamshard.schema import parse_type

    for name, typ in fields:
        parse_type(typ, name)


def typed_fields(spec: str | None, default_type: str = "json") -> list[tuple[str, str]]:
    """:func:`parse_fields` with missing types replaced by ``default_type`` and every type checked
    (``SchemaError`` naming the field for an unknown type)."""
    fields = [(n, t or default_type) for n, t in parse_fields(spec)]
    _check_types(fields)
    return fields


def discover(sources: Sequence[str], extensions: tuple[str, ...] | None,
             exclude: str | None = None) -> list[tuple[str, str]]:
    """``(absolute path, display name)`` of every input file, in a deterministic order.

    A file is taken as given; a directory is recursed (hidden entries skipped, files filtered by
    ``extensions``, sorted by relative path); anything else is a glob (sorted). Names are relative
    to the directory / the glob's fixed prefix; a plain file is named by its basename. A file
    listed twice is kept once; files under ``exclude`` (the destination) are never inputs."""
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    skip = os.path.abspath(exclude) + os.sep if exclude and "://" not in exclude else None

    def take(path: str, name: str) -> None:
        path = os.path.abspath(path)
        if path not in seen and not (skip and path.startswith(skip)):
            seen.add(path)
            out.append((path, name.replace(os.sep, "/")))

    for src in sources:
        if os.path.isfile(src):
            take(src, os.path.basename(src))
        elif os.path.isdir(src):
            found = []
            for dirpath, dirnames, filenames in os.walk(src):
                dirnames[:] = [d for d in dirnames if not d.startswith(".")]
                for fn in filenames:
                    if not fn.startswith(".") and (extensions is None or fn.endswith(extensions)):
                        rel = os.path.relpath(os.path.join(dirpath, fn), src)
                        found.append(rel.replace(os.sep, "/"))
            for rel in sorted(found):
                take(os.path.join(src, rel), rel)
        elif glob.has_magic(src):
            base = src[:min(src.find(c) for c in "*?[" if c in src)]
            base = base if base.endswith(os.sep) else os.path.dirname(base)
            for path in sorted(p for p in glob.glob(src, recursive=True) if os.path.isfile(p)):
                take(path, os.path.relpath(path, base or "."))
        else:
            raise ConfigError(f"input {src!r} does not exist")
    if not out:
        raise ConfigError(f"no input files found in {', '.join(sources)}"
                          + (f" (looked for {', '.join(extensions)})" if extensions else ""))
    return out
