"""obstore (Rust ``object_store``) through its fsspec adapter, as an opt-in S3 client.

``storage_options={"backend": "obstore", ...}`` on an ``s3://`` URL builds an
``obstore.fsspec.FsspecStore`` from the s3fs-style options (``key``, ``secret``, ``token``,
``endpoint_url`` / ``client_kwargs.endpoint_url``, ``client_kwargs.region_name``); any other
option is a ``ConfigError`` rather than silently ignored. obstore's own retries are turned off:
:class:`~streamshard.remote.storage.RetryPolicy` is the one retry policy, and
:func:`classify` tells it which obstore errors are transient. Measured against s3fs on the
latency-capped moto server in ``benchmarks/bench_remote.py`` (see docs/REMOTE.md).
"""

from __future__ import annotations

import datetime
import os
import re
from typing import Any

from streamshard.errors import ConfigError
from streamshard.remote.parts import pwrite_all

BACKENDS = ("s3fs", "obstore")
_KNOWN = {"backend", "key", "secret", "token", "endpoint_url", "client_kwargs",
          "skip_instance_cache", "config_kwargs"}
_PERMANENT = {"NotFoundError", "PermissionDeniedError", "UnauthenticatedError", "InvalidPathError",
              "NotSupportedError", "UnknownConfigurationKeyError", "AlreadyExistsError",
              "PreconditionError", "NotModifiedError"}
_TRANSIENT_TEXT = re.compile(
    r"connect|timed? ?out|reset|broken pipe|incomplete|closed|status(?: code)?:? ?(?:5\d\d|429|408)"
    r"|SlowDown|ServiceUnavailable|InternalError|Throttl", re.IGNORECASE)


def split_backend(url: str, storage_options: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """``(backend, fsspec options)``: the ``backend`` key popped and checked."""
    opts = dict(storage_options)
    backend = opts.pop("backend", "s3fs")
    if backend not in BACKENDS:
        raise ConfigError(f"storage_options backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "obstore" and not url.startswith("s3://"):
        raise ConfigError(f"backend 'obstore' supports s3:// URLs only, got {url.split('://')[0]}://")
    return backend, opts


def uses_obstore(url: str, storage_options: dict[str, Any] | None) -> bool:
    """Whether ``url`` is read through obstore with these storage options."""
    return bool(storage_options) and storage_options.get("backend") == "obstore" \
        and url.startswith("s3://")


def worker_context(streams: Any, storage_options: dict[str, Any] | None,
                   context: Any) -> Any:
    """The ``multiprocessing_context`` for DataLoader workers of ``streams`` (``Stream``
    values; ``storage_options`` the loader-wide default): obstore's Rust runtime does not
    survive ``fork`` (a forked child blocks on its first request, even with a new store:
    measured with obstore 0.12.1), so with an obstore stream no context means
    ``"forkserver"`` (workers forked from a clean server process that never used obstore) and
    ``"fork"`` is a ``ConfigError``. Any other stream: ``context`` unchanged."""
    if not any(uses_obstore(s.source, s.storage_options if s.storage_options is not None
                            else storage_options) for s in streams):
        return context
    if context is None:
        return "forkserver"
    method = context if isinstance(context, str) else context.get_start_method()
    if method == "fork":
        raise ConfigError("storage_options backend 'obstore' does not survive fork (its Rust "
                          "runtime blocks in forked workers): use multiprocessing_context="
                          "'forkserver' or 'spawn' (the default with obstore), or backend 's3fs'")
    return context


def _config(opts: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """obstore's ``(config, client_options)`` from s3fs-style options; unknown ones are a
    ``ConfigError`` rather than silently ignored."""
    unknown = sorted(set(opts) - _KNOWN)
    if unknown:
        raise ConfigError(f"backend 'obstore' does not understand storage_options {unknown}")
    client = dict(opts.get("client_kwargs") or {})
    config: dict[str, Any] = {}
    for ours, theirs in (("key", "access_key_id"), ("secret", "secret_access_key"),
                         ("token", "session_token")):
        if opts.get(ours):
            config[theirs] = opts[ours]
    endpoint = opts.get("endpoint_url") or client.get("endpoint_url")
    if endpoint:
        config["endpoint"] = endpoint
    if client.get("region_name"):
        config["region"] = client["region_name"]
    client_options = {"allow_http": True} if str(endpoint or "").startswith("http://") else {}
    return config, client_options


_NO_RETRY = {"max_retries": 0, "retry_timeout": datetime.timedelta(seconds=60)}


def make_fs(opts: dict[str, Any]) -> Any:
    """An ``FsspecStore`` for S3 from s3fs-style options (paths are ``bucket/key`` as in s3fs)."""
    config, client_options = _config(opts)
    try:
        from obstore.fsspec import FsspecStore
    except ImportError as exc:
        raise ConfigError("backend 'obstore' needs `pip install streamshard[obstore]`") from exc
    return FsspecStore("s3", config=config, client_options=client_options,
                       retry_config=_NO_RETRY, skip_instance_cache=True)


class NativeReader:
    """Whole and ranged GETs of one bucket through obstore's own API, not its fsspec adapter.

    The adapter runs each request as a coroutine on fsspec's event-loop thread, copies the body
    into Python ``bytes`` and writes it through a local-file coroutine; here a GET is one
    synchronous obstore call and its buffer goes straight to ``pwrite``. A plain
    parallel download of the 54 MB set of ``benchmarks/bench_remote.py`` through the
    latency-capped proxy (8-32 threads) cost this process 0.13-0.19 CPU seconds through the
    adapter and 0.08-0.12 here (load 5, 2 cores): CPU the reader, on the same cores, gets back.
    Thread-safe (obstore stores are). Not fork-safe, like every obstore object: the owner
    (:class:`~streamshard.remote.storage.Remote`) builds a new one per process.
    """

    def __init__(self, bucket: str, opts: dict[str, Any]):
        config, client_options = _config(opts)
        try:
            from obstore.store import S3Store
        except ImportError as exc:
            raise ConfigError("backend 'obstore' needs `pip install streamshard[obstore]`") from exc
        self._store = S3Store(bucket, config=config, client_options=client_options,
                              retry_config=_NO_RETRY)

    def get_file(self, key: str, local_path: str) -> None:
        """The whole object ``key`` into ``local_path`` (created or truncated)."""
        import obstore

        data = obstore.get(self._store, key).bytes()
        fd = os.open(local_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            pwrite_all(fd, data, 0)
        finally:
            os.close(fd)

    def get_range(self, key: str, start: int, end: int) -> memoryview:
        """Bytes ``[start, end)`` of ``key`` (one ranged GET), as a read-only buffer."""
        import obstore

        return memoryview(obstore.get_range(self._store, key, start=start, end=end))


def classify(exc: BaseException) -> bool | None:
    """True transient, False permanent, None: not an obstore error."""
    mro = [c for c in type(exc).__mro__ if c.__module__.startswith("obstore")]
    if not mro:
        return None
    name = type(exc).__name__
    if name in _PERMANENT:
        return False
    return bool(_TRANSIENT_TEXT.search(str(exc)))
