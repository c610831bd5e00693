"""Remote storage access: an fsspec filesystem per URL, error classification, bounded retry.

Everything that talks to a server goes through :func:`call_with_retry`, so there is one place
that decides what is worth retrying (connection resets, timeouts, HTTP 5xx, 429/SlowDown) and
what fails at once (404/NoSuchKey, 403/AccessDenied, bad credentials).
"""

from __future__ import annotations

import asyncio
import errno
import os
import random
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Callable, TypeVar

from streamshard.errors import ConfigError, StorageError, redact
from streamshard.location import resolve

T = TypeVar("T")

# errnos that mean "the network or the server hiccuped", worth another try.
_TRANSIENT_ERRNOS = frozenset(
    getattr(errno, name)
    for name in ("ECONNRESET", "ECONNREFUSED", "ECONNABORTED", "ETIMEDOUT", "EPIPE", "EHOSTUNREACH",
                 "ENETUNREACH", "ENETDOWN", "EAGAIN", "EBUSY", "EREMOTEIO")
    if hasattr(errno, name)
)
# S3 / GCS error codes that are throttling or server-side trouble.
_TRANSIENT_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "TooManyRequests", "RequestTimeout",
    "InternalError", "ServiceUnavailable", "RequestLimitExceeded",
    "500", "502", "503", "504", "429",
})
# Class names of client-library exceptions that are transient, matched by name so that this
# module does not import aiohttp/botocore (optional dependencies).
_TRANSIENT_CLASS_NAMES = frozenset({
    "ClientConnectionError", "ClientConnectorError", "ClientOSError", "ServerDisconnectedError",
    "ServerTimeoutError", "ClientPayloadError", "ConnectionTimeoutError", "SocketTimeoutError",
    "EndpointConnectionError", "ConnectionClosedError", "ReadTimeoutError", "ConnectTimeoutError",
    "ResponseStreamingError", "IncompleteRead", "FSTimeoutError", "HTTPClientError",
    "ProtocolError",
})


def _status_of(exc: BaseException) -> int | None:
    status = getattr(exc, "status", None)
    if status is None:
        status = getattr(exc, "status_code", None)
    if status is None:
        response = getattr(exc, "response", None)
        if isinstance(response, dict):
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return status if isinstance(status, int) else None


def _code_of(exc: BaseException) -> str | None:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        code = response.get("Error", {}).get("Code")
        return str(code) if code is not None else None
    return None


def _classify_one(exc: BaseException) -> bool | None:
    """True transient, False permanent, None: this exception alone does not say."""
    from streamshard.remote.obstore_fs import classify

    verdict = classify(exc)
    if verdict is not None:
        return verdict
    status = _status_of(exc)
    if status is not None:
        return status >= 500 or status in (408, 429)
    code = _code_of(exc)
    if code is not None:
        return code in _TRANSIENT_CODES
    if any(cls.__name__ in _TRANSIENT_CLASS_NAMES for cls in type(exc).__mro__):
        return True
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    if isinstance(exc, (ConnectionError, TimeoutError, socket.timeout, asyncio.TimeoutError)):
        return True
    if isinstance(exc, OSError) and exc.errno is not None:
        return exc.errno in _TRANSIENT_ERRNOS
    return None


def is_transient(exc: BaseException) -> bool:
    """Whether retrying the call that raised ``exc`` may succeed.

    The exception chain is walked from the innermost cause outwards: fsspec's HTTP ``info`` turns
    a 503 into ``FileNotFoundError`` *from* the ``ClientResponseError(503)``, and the cause is what
    counts. Unknown errors are permanent: failing fast beats retrying a programming error.
    """
    chain: list[BaseException] = []
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen and len(chain) < 16:
        seen.add(id(cur))
        chain.append(cur)
        cur = cur.__cause__ or cur.__context__
    for link in reversed(chain):
        verdict = _classify_one(link)
        if verdict is not None:
            return verdict
    return False


def describe(exc: BaseException) -> str:
    """One line for a message: class, status/code when known, text."""
    parts = [type(exc).__name__]
    status, code = _status_of(exc), _code_of(exc)
    if code:
        parts.append(code)
    elif status:
        parts.append(f"HTTP {status}")
    text = str(exc).strip()
    return f"{' '.join(parts)}: {text}" if text else parts[0]


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded exponential backoff with jitter for transient storage errors.

    Attempt ``k`` (0-based) that fails transiently sleeps ``d * (1 - jitter) + U(0, d * jitter)``
    with ``d = min(max_delay, base_delay * 2**k)``; ``jitter=1`` is "full jitter". Retrying stops
    after ``attempts`` calls or when the next sleep would end past ``deadline`` seconds from the
    first call, whichever comes first. ``sleep``, ``clock`` and ``rng`` are injectable for tests;
    the policy is picklable as long as they are (the defaults are).

    This policy is the only retry that happens: a :class:`Remote` (what ``CachedSource`` reads
    through) turns the backend's own retries off, so ``attempts`` calls are ``attempts``
    requests. For S3 (s3fs) that is botocore's ``retries={"total_max_attempts": 1}`` and s3fs's
    own retry loop set to one try; without that each of our attempts was up to 5 botocore
    attempts, and s3fs retried connection errors 5 times with up to ~11 s of backoff of its own.
    A ``retries`` entry you put in ``storage_options["config_kwargs"]`` is kept (then both
    retry). Tools that do not retry themselves (``verify``, ``merge``, ``ShardWriter``) keep the
    backend's defaults. docs/REMOTE.md "Retries".
    """

    attempts: int = 6
    base_delay: float = 0.2
    max_delay: float = 10.0
    jitter: float = 0.5
    deadline: float = 120.0
    sleep: Callable[[float], None] = field(default=time.sleep, compare=False, repr=False)
    clock: Callable[[], float] = field(default=time.monotonic, compare=False, repr=False)
    rng: random.Random | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.attempts, int) or self.attempts < 1:
            raise ConfigError(f"attempts must be an int >= 1, got {self.attempts!r}")
        for name in ("base_delay", "max_delay", "deadline"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value < 0:
                raise ConfigError(f"{name} must be a number >= 0, got {value!r}")
        if not 0.0 <= self.jitter <= 1.0:
            raise ConfigError(f"jitter must be in [0, 1], got {self.jitter!r}")

    def delay(self, attempt: int) -> float:
        """The sleep after failed attempt number ``attempt`` (0-based)."""
        d = min(self.max_delay, self.base_delay * (2.0 ** attempt))
        u = (self.rng or random).random()
        return d * (1.0 - self.jitter) + u * d * self.jitter


def call_with_retry(
    fn: Callable[[], T],
    *,
    url: str,
    what: str,
    policy: RetryPolicy,
    on_retry: Callable[[BaseException, float], None] | None = None,
) -> T:
    """Call ``fn()`` until it succeeds, a permanent error occurs or ``policy`` is exhausted.

    Raises :class:`StorageError` naming ``url``: ``transient=False`` at once for a permanent
    error, ``transient=True`` after the last attempt of a transient one. ``on_retry(exc, delay)``
    is called before each sleep (stats, logging).
    """
    start = policy.clock()
    for attempt in range(policy.attempts):
        try:
            return fn()
        except StorageError:
            raise
        except Exception as exc:  # noqa: BLE001 - classified below, re-raised as StorageError
            transient = is_transient(exc)
            if not transient:
                raise StorageError(f"{what} {url} failed: {describe(exc)}", url=url,
                                   transient=False) from exc
            delay = policy.delay(attempt)
            elapsed = policy.clock() - start
            if attempt + 1 >= policy.attempts or elapsed + delay > policy.deadline:
                raise StorageError(
                    f"{what} {url} failed after {attempt + 1} attempts in {elapsed:.1f}s "
                    f"(transient): {describe(exc)}", url=url, transient=True) from exc
            if on_retry is not None:
                on_retry(exc, delay)
            policy.sleep(delay)
    raise AssertionError("unreachable: the loop returns or raises")  # pragma: no cover


class Remote:
    """An fsspec filesystem for one dataset URL, created lazily and again after ``fork``.

    ``join(rel)`` gives the filesystem path of a file relative to the dataset root.
    ``connections``: GETs the owner runs at once; s3fs's connection pool gets that many
    (botocore's ``max_pool_connections`` is 10 by default, so 16 threads queued for 10 sockets),
    unless ``storage_options["config_kwargs"]`` sets it. Picklable: only the URL, the storage
    options and ``connections`` travel.
    """

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None,
                 connections: int | None = None):
        self.url = url.rstrip("/")
        self.storage_options = dict(storage_options or {})
        self.connections = connections
        self.protocol = self.url.split("://", 1)[0] if "://" in self.url else "file"
        from streamshard.remote.obstore_fs import split_backend

        split_backend(self.url, self.storage_options)  # a bad backend is a ConfigError now
        self._fs: Any = None
        self._native: Any = None  # obstore's NativeReader for GETs, when that is the backend
        self._root = ""
        self._pid = -1

    def __getstate__(self) -> dict[str, Any]:
        return {"url": self.url, "storage_options": self.storage_options,
                "connections": self.connections}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["url"], state["storage_options"], state.get("connections"))

    @property
    def fs(self) -> Any:
        if self._fs is None or self._pid != os.getpid():
            from streamshard.remote.obstore_fs import make_fs, split_backend

            backend, opts = split_backend(self.url, self.storage_options)
            if backend == "obstore":  # its own retries are off (obstore_fs); RetryPolicy retries
                from streamshard.remote.obstore_fs import NativeReader

                self._fs, self._root = make_fs(opts), self.url.split("://", 1)[1].rstrip("/")
                self._native = NativeReader(self._root.split("/", 1)[0], opts)
            else:
                opts = single_attempt_options(self.protocol, opts)
                if self.protocol in _S3 and self.connections is not None:
                    opts["config_kwargs"] = {"max_pool_connections": self.connections,
                                             **opts["config_kwargs"]}
                loc = resolve(self.url, opts)
                self._fs, self._root = loc.fs, loc.root.rstrip("/")
                if self.protocol in _S3:  # s3fs's own retry loop: a class attribute, not an argument
                    loc.fs.retries = opts.get("retries", 1)
            self._pid = os.getpid()
        return self._fs

    def path(self, rel: str) -> str:
        self.fs  # noqa: B018 - creating the filesystem also resolves the root path
        return f"{self._root}/{rel}" if self._root else rel

    def url_of(self, rel: str) -> str:
        """The URL of ``rel`` for messages and cache metadata (user info redacted)."""
        return redact(f"{self.url}/{rel}")

    def info(self, rel: str) -> dict[str, Any]:
        path = self.path(rel)
        self.fs.invalidate_cache(path)
        return self.fs.info(path)

    def cat(self, rel: str) -> bytes:
        return self.fs.cat_file(self.path(rel))

    def get(self, rel: str, local_path: str) -> None:
        """Download one whole object to ``local_path`` (one GET for objects below the
        filesystem's multipart threshold, e.g. s3fs's 50 MiB block size)."""
        path = self.path(rel)
        if self._native is not None:
            self._native.get_file(path.split("/", 1)[1], local_path)
            return
        self.fs.get_file(path, local_path)

    def cat_range(self, rel: str, start: int, end: int) -> bytes | memoryview:
        """Bytes ``[start, end)`` of one object (one ranged GET)."""
        path = self.path(rel)
        if self._native is not None:
            return self._native.get_range(path.split("/", 1)[1], start, end)
        return self.fs.cat_file(path, start=start, end=end)


_S3 = ("s3", "s3a")


def single_attempt_options(protocol: str, storage_options: dict[str, Any]) -> dict[str, Any]:
    """``storage_options`` with the backend's own retries off, so :class:`RetryPolicy` is the
    only retry (see its docstring). Options the caller set are kept. The filesystem gets its own
    instance (``skip_instance_cache``): the retry setting must not leak into other users of an
    fsspec-cached instance with the same options."""
    if protocol not in _S3:
        return dict(storage_options)
    opts = dict(storage_options)
    config = dict(opts.get("config_kwargs") or {})
    config.setdefault("retries", {"total_max_attempts": 1, "mode": "standard"})
    opts["config_kwargs"] = config
    opts.setdefault("skip_instance_cache", True)
    opts.pop("retries", None)  # not an s3fs argument: applied to the instance (Remote.fs)
    return opts


def version_token(info: dict[str, Any]) -> str | None:
    """What identifies one version of a remote object without reading it: ETag / last-modified /
    generation, with the size. ``None`` when the store reports only a size (then the index is
    re-read at every start, which is always safe)."""
    keys = ("ETag", "etag", "LastModified", "Last-Modified", "last_modified", "mtime", "updated",
            "generation", "created", "md5Hash", "Content-MD5", "Digest", "md5")
    parts = [f"{k}={info[k]}" for k in keys if info.get(k) not in (None, "")]
    if not parts:
        return None
    return f"size={info.get('size')};" + ";".join(parts)
