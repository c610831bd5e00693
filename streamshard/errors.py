"""One error hierarchy for streamshard.

Every error is a :class:`StreamshardError`; most also subclass the builtin a caller would
naturally catch (``ValueError`` for bad input, ``OSError`` for storage), so
``except ValueError`` keeps working. Messages name the file, shard, block, sample or line.
"""

from __future__ import annotations

import re

# "scheme://user:password@host" -> "scheme://***@host" (RFC 3986 user info: no "/", "@", space)
_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)[^/@\s?#]+@")


def redact(text: str) -> str:
    """``text`` with the user info of every URL in it replaced by ``***`` (credentials never
    appear in a repr, a message or a file streamshard writes)."""
    return _USERINFO.sub(r"\1***@", text) if "@" in text else text


class StreamshardError(Exception):
    """Base class of every error raised by streamshard. String arguments are redacted
    (``redact``): a URL's user:password never reaches a message or a log."""

    def __init__(self, *args: object):
        super().__init__(*(redact(a) if isinstance(a, str) else a for a in args))


class ConfigError(StreamshardError, ValueError):
    """A configuration value is invalid, e.g. ``shard_size must be positive, got -3``."""


class FormatError(StreamshardError, ValueError):
    """A file is not a streamshard file, or was written by a version this reader does not support."""


class CorruptionError(StreamshardError, ValueError):
    """Stored bytes do not match their checksum or their declared sizes (names shard and block)."""


class SchemaError(StreamshardError, ValueError):
    """A sample does not match the dataset's columns (names the column and the sample)."""


class InputError(StreamshardError, ValueError):
    """A converter met malformed input (names the input file and line or record)."""


class StateMismatchError(StreamshardError, ValueError):
    """``load_state_dict`` got a state that does not fit the live configuration.

    The message lists each differing key with the saved value next to the live one.
    """


class DatasetExistsError(StreamshardError, FileExistsError):
    """The destination already holds a dataset and ``overwrite`` was not requested."""


class DestinationLockedError(StreamshardError, BlockingIOError):
    """Another writer holds the destination's lock; the message names it (pid, host, command)."""


class StorageError(StreamshardError, OSError):
    """Remote or local storage failed. ``transient`` says whether retrying may help."""

    def __init__(self, message: str, *, url: str | None = None, transient: bool = False):
        super().__init__(message)
        self.url = None if url is None else redact(url)
        self.transient = transient


class MissingDependencyError(StreamshardError, ImportError):
    """An optional dependency is not installed; the message says what to ``pip install``."""


def missing_dependency(package: str, extra: str, purpose: str) -> MissingDependencyError:
    """Build the error for a missing optional dependency with an install hint."""
    return MissingDependencyError(
        f"{purpose} needs the '{package}' package. "
        f"Install it with: pip install 'streamshard[{extra}]' (or pip install {package})"
    )
