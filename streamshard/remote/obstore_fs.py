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
import re
from typing import Any

from streamshard.errors import ConfigError

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


def make_fs(opts: dict[str, Any]) -> Any:
    """An ``FsspecStore`` for S3 from s3fs-style options (paths are ``bucket/key`` as in s3fs)."""
    unknown = sorted(set(opts) - _KNOWN)
    if unknown:
        raise ConfigError(f"backend 'obstore' does not understand storage_options {unknown}")
    try:
        from obstore.fsspec import FsspecStore
    except ImportError as exc:
        raise ConfigError("backend 'obstore' needs `pip install streamshard[obstore]`") from exc
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
    return FsspecStore("s3", config=config, client_options=client_options,
                       retry_config={"max_retries": 0,
                                     "retry_timeout": datetime.timedelta(seconds=60)},
                       skip_instance_cache=True)


def classify(exc: BaseException) -> bool | None:
    """True transient, False permanent, None: not an obstore error."""
    mro = [c for c in type(exc).__mro__ if c.__module__.startswith("obstore")]
    if not mro:
        return None
    name = type(exc).__name__
    if name in _PERMANENT:
        return False
    return bool(_TRANSIENT_TEXT.search(str(exc)))
