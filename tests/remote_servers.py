"""Real servers for the remote tests, on 127.0.0.1 free ports, started and stopped by the tests.

- :class:`S3Server`: moto's S3 in server mode (``ThreadedMotoServer``), used through ``s3fs`` with
  ``endpoint_url``. It can be stopped and restarted on the same port; moto keeps its buckets in
  process memory, so objects survive the restart.
- :class:`HTTPServer`: files of a directory over HTTP/1.1 with ``Range``, ``HEAD``, ``ETag`` and a
  few fault knobs (queued status codes, always-403 paths, throttled bodies), with a request log.
- :class:`CountingProxy`: an HTTP proxy in front of an S3 server that logs every request and can
  answer 503 SlowDown for chosen object paths, so a test counts what the client really sent.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import xxhash

from tests.net import free_port, wait_port

KEY, SECRET = "testing", "testing"


def s3_options(endpoint: str, *, key: str = KEY, secret: str = SECRET, fast_fail: bool = True) -> dict:
    """s3fs storage options for a loopback endpoint. ``fast_fail`` turns off botocore's and
    s3fs.s own retries so that streamshard's RetryPolicy is the only one under test."""
    opts: dict = {"key": key, "secret": secret, "skip_instance_cache": True,
                  "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}
    if fast_fail:
        opts["config_kwargs"] = {"retries": {"max_attempts": 1, "mode": "standard"},
                                 "connect_timeout": 2, "read_timeout": 5}
    return opts


class S3Server:
    """moto S3 on 127.0.0.1:<free port>, in this process."""

    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._server = None

    def start(self) -> "S3Server":
        import logging

        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
        os.environ.setdefault("AWS_ACCESS_KEY_ID", KEY)
        os.environ.setdefault("AWS_SECRET_ACCESS_KEY", SECRET)
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()
        wait_port(self.port)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    def fs(self, **kw):
        import s3fs

        return s3fs.S3FileSystem(**{**s3_options(self.endpoint), **kw})

    def options(self, **kw) -> dict:
        return s3_options(self.endpoint, **kw)

    def make_bucket(self, name: str) -> None:
        import boto3

        boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                     aws_access_key_id=KEY, aws_secret_access_key=SECRET).create_bucket(Bucket=name)


class AuthS3Server:
    """moto S3 in a ``moto_server`` subprocess that enforces IAM auth
    (``INITIAL_NO_AUTH_ACTION_COUNT=0``): unknown credentials get a real 403."""

    def __init__(self):
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "AuthS3Server":
        env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None


class _Control:
    """Fault knobs and the request log, shared by the handler threads."""

    def __init__(self, root: str):
        self.root = root
        self.lock = threading.Lock()
        self.log: list[tuple[str, str, int]] = []
        self.fail: dict[str, deque[int]] = {}
        self.forbidden: set[str] = set()
        self.throttle: dict[str, tuple[int, float]] = {}  # path -> (chunk bytes, sleep per chunk)

    def next_failure(self, path: str) -> int | None:
        with self.lock:
            queue = self.fail.get(path)
            return queue.popleft() if queue else None

    def record(self, method: str, path: str, status: int) -> None:
        with self.lock:
            self.log.append((method, path, status))

    def count(self, method: str, path: str, status: int | None = None) -> int:
        with self.lock:
            return sum(1 for m, p, s in self.log
                       if m == method and p == path and (status is None or s == status))


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    control: _Control

    def log_message(self, format, *args):  # noqa: A002 - keep test output quiet
        pass

    def do_HEAD(self):  # noqa: N802
        self._serve(body=False)

    def do_GET(self):  # noqa: N802
        self._serve(body=True)

    def _error(self, method: str, path: str, status: int) -> None:
        payload = f"status {status}\n".encode()
        self.control.record(method, path, status)  # before replying: the client may race ahead
        self.send_response(status)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if method == "GET":
            self.wfile.write(payload)

    def _serve(self, body: bool) -> None:
        method = "GET" if body else "HEAD"
        path = self.path.split("?", 1)[0].lstrip("/")
        control = self.control
        status = control.next_failure(path)
        if status is None and path in control.forbidden:
            status = 403
        local = os.path.join(control.root, *path.split("/"))
        if status is None and (not path or ".." in path.split("/") or not os.path.isfile(local)):
            status = 404
        if status is not None:
            self._error(method, path, status)
            return
        with open(local, "rb") as f:
            data = f.read()
        start, end, code = 0, len(data), 200
        match = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range", ""))
        if match and (match.group(1) or match.group(2)):
            if match.group(1):
                start = int(match.group(1))
                end = min(len(data), int(match.group(2)) + 1) if match.group(2) else len(data)
            else:
                start = max(0, len(data) - int(match.group(2)))
            if start >= len(data):
                self._error(method, path, 416)
                return
            code = 206
        stat = os.stat(local)
        control.record(method, path, code)
        self.send_response(code)
        self.send_header("Content-Length", str(end - start))
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", '"%s"' % xxhash.xxh64(data).hexdigest())
        self.send_header("Last-Modified", self.date_time_string(stat.st_mtime))
        if code == 206:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
        self.end_headers()
        if not body:
            return
        chunk, pause = control.throttle.get(path, (1 << 20, 0.0))
        try:
            for pos in range(start, end, chunk):
                self.wfile.write(data[pos:min(end, pos + chunk)])
                if pause:
                    self.wfile.flush()
                    time.sleep(pause)
        except (BrokenPipeError, ConnectionResetError):
            pass


class _Server(ThreadingHTTPServer):
    allow_reuse_address = True
    daemon_threads = True


class _Serving:
    """``start()`` / ``stop()`` of a threaded HTTP server on 127.0.0.1:``port`` (restartable)."""

    port: int
    _server: _Server | None = None
    _thread: threading.Thread | None = None

    def _handler(self) -> type:
        raise NotImplementedError

    def start(self):
        self._server = _Server(("127.0.0.1", self.port), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=10)
            self._server = None


class HTTPServer(_Serving):
    """Serves ``root`` on 127.0.0.1; ``url`` is its base URL. Restartable on the same port."""

    def __init__(self, root: str, port: int | None = None):
        self.control = _Control(root)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"

    def _handler(self) -> type:
        return type("Handler", (_Handler,), {"control": self.control})


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    proxy: "CountingProxy"

    def log_message(self, format, *args):  # noqa: A002 - keep test output quiet
        pass

    def _forward(self) -> None:
        import http.client

        proxy = self.proxy
        path = self.path.split("?", 1)[0]
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        failing = any(path.endswith(suffix) for suffix in proxy.unavailable)
        with proxy.lock:
            proxy.log.append((self.command, path, 503 if failing else None))
        if failing:
            payload = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>ServiceUnavailable'
                       b'</Code><Message>injected by the test proxy</Message></Error>')
            self.send_response(503)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)
            return
        conn = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=30)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
            conn.request(self.command, self.path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            self.send_response(resp.status)
            for k, v in resp.getheaders():
                if k.lower() not in ("connection", "transfer-encoding", "content-length"):
                    self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
        finally:
            conn.close()

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _forward  # noqa: N815


class CountingProxy(_Serving):
    """127.0.0.1 proxy to ``upstream`` (an :class:`S3Server`): ``log`` holds ``(method, path,
    injected status or None)`` of every request; paths ending in a suffix of ``unavailable``
    get 503 ServiceUnavailable (a transient error every S3 client retries) without reaching
    the server."""

    def __init__(self, upstream: S3Server):
        self.upstream_port = upstream.port
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.lock = threading.Lock()
        self.log: list[tuple[str, str, int | None]] = []
        self.unavailable: set[str] = set()

    def _handler(self) -> type:
        return type("ProxyHandler", (_ProxyHandler,), {"proxy": self})

    def requests_for(self, suffix: str) -> list[tuple[str, str, int | None]]:
        with self.lock:
            return [r for r in self.log if r[1].endswith(suffix)]


# ---- child-process bodies (module level so that the "spawn" start method can import them) ---
def race_for_shard(url: str, cache_dir: str, shard, barrier, results) -> None:
    """Open a CachedSource, wait for the other racers, fetch ``shard``; report hash and stats."""
    from streamshard.remote import CachedSource
    from streamshard.remote.cache import file_xxh64

    src = CachedSource(url, cache_dir=cache_dir)
    src.read_index()
    barrier.wait(timeout=30)
    path = src.shard_path(shard)
    results.put((os.getpid(), file_xxh64(path), src.stats()))
    src.close()


def download_forever(url: str, cache_dir: str, shard) -> None:
    """Fetch ``shard`` (from a throttled server: the parent SIGKILLs us mid-download)."""
    from streamshard.remote import CachedSource

    src = CachedSource(url, cache_dir=cache_dir)
    src.read_index()
    src.shard_path(shard)
