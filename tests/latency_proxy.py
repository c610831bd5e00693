"""An HTTP proxy in front of an S3-compatible server (moto) that behaves like a far object store:
every response's first byte comes ``latency`` seconds after its request, and each client
connection's body bytes are paced to ``bandwidth`` bytes/s (a per-connection cap, as on real
object stores, so throughput comes from parallel connections).

It also has fault knobs for the tests (``corrupt_ranged``: flip one byte in the body of the next N
ranged GETs of a key) and a request log. Listens on 127.0.0.1 only; runs in a thread of the test
(:class:`LatencyProxy`) or as a process for the benchmark (``python -m tests.latency_proxy``), so
that it does not compete with the reader for the GIL.
"""

from __future__ import annotations

import argparse
import http.client
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "upgrade",
        "content-length"}
_PACE_CHUNK = 256 << 10


class _Knobs:
    def __init__(self, upstream_port: int, latency: float, bandwidth: float):
        self.upstream_port = upstream_port
        self.latency = latency
        self.bandwidth = bandwidth
        self.lock = threading.Lock()
        self.corrupt: dict[str, int] = {}  # object key suffix -> ranged GETs left to corrupt
        self.log: list[tuple[str, str, str, int]] = []  # method, path, range, status
        self.active_gets = 0  # GETs between request and last body byte, now and at most
        self.peak_gets = 0

    def get_started(self) -> None:
        with self.lock:
            self.active_gets += 1
            self.peak_gets = max(self.peak_gets, self.active_gets)

    def get_ended(self) -> None:
        with self.lock:
            self.active_gets -= 1

    def take_corruption(self, path: str) -> bool:
        with self.lock:
            for suffix, left in self.corrupt.items():
                if left > 0 and path.endswith(suffix):
                    self.corrupt[suffix] = left - 1
                    return True
            return False

    def record(self, method: str, path: str, rng: str, status: int) -> None:
        with self.lock:
            self.log.append((method, path, rng, status))


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    knobs: _Knobs

    def log_message(self, format, *args):  # noqa: A002 - keep output quiet
        pass

    def setup(self) -> None:
        super().setup()
        self._upstream: http.client.HTTPConnection | None = None

    def finish(self) -> None:
        if self._upstream is not None:
            self._upstream.close()
        super().finish()

    def _forward(self) -> None:
        knobs, t0 = self.knobs, time.monotonic()
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length > 0 else None
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
        if body is not None:
            headers["Content-Length"] = str(len(body))
        for attempt in range(2):  # the upstream may close an idle keep-alive connection
            if self._upstream is None:
                self._upstream = http.client.HTTPConnection("127.0.0.1", knobs.upstream_port, timeout=30)
            try:
                self._upstream.request(self.command, self.path, body=body, headers=headers)
                resp = self._upstream.getresponse()
                data = resp.read()
                break
            except (ConnectionError, http.client.HTTPException):
                self._upstream.close()
                self._upstream = None
                if attempt:
                    raise
        path = self.path.split("?", 1)[0]
        rng = self.headers.get("Range", "")
        if self.command == "GET" and rng and resp.status == 206 and data and knobs.take_corruption(path):
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        knobs.record(self.command, path, rng, resp.status)
        wait = knobs.latency - (time.monotonic() - t0)
        if wait > 0:
            time.sleep(wait)  # first-byte latency of a far server
        self.send_response(resp.status, resp.reason)
        for k, v in resp.getheaders():
            if k.lower() not in _HOP:
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command == "HEAD" or not data:
            return
        self._paced_write(data)

    def _paced_write(self, data: bytes) -> None:
        rate, start = self.knobs.bandwidth, time.monotonic()
        view = memoryview(data)
        for pos in range(0, len(data), _PACE_CHUNK):
            self.wfile.write(view[pos:pos + _PACE_CHUNK])
            if rate > 0:
                due = start + (pos + _PACE_CHUNK) / rate  # bytes sent so far at the cap
                ahead = due - time.monotonic()
                if ahead > 0:
                    time.sleep(ahead)

    def _serve(self) -> None:
        counted = self.command == "GET"
        if counted:
            self.knobs.get_started()
        try:
            self._forward()
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        finally:
            if counted:
                self.knobs.get_ended()

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _serve  # noqa: N815


class _Server(ThreadingHTTPServer):
    allow_reuse_address = True
    daemon_threads = True
    # socketserver's default listen backlog is 5: 64 connects at once had 39 SYNs dropped
    # (/proc/net/netstat ListenDrops) and 21 connects waited for the kernel's 1 s SYN retry,
    # a stall no object store adds; with 128: no drop (the kernel caps it at somaxconn)
    request_queue_size = 128


class LatencyProxy:
    """``latency`` s first byte and ``bandwidth`` B/s per connection in front of 127.0.0.1:
    ``upstream_port``; ``endpoint`` is its URL. ``knobs.corrupt[key] = n`` corrupts the next
    ``n`` ranged GETs of ``key``; ``knobs.log`` lists (method, path, range, status);
    ``knobs.peak_gets`` is the most GETs it was serving at once (request to last body byte)."""

    def __init__(self, upstream_port: int, *, latency: float = 0.02, bandwidth: float = 50e6,
                 port: int = 0):
        self.knobs = _Knobs(upstream_port, latency, bandwidth)
        handler = type("Handler", (_Handler,), {"knobs": self.knobs})
        self._server = _Server(("127.0.0.1", port), handler)
        self.port = self._server.server_address[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._thread: threading.Thread | None = None

    def start(self) -> "LatencyProxy":
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def ranged_gets(self, suffix: str) -> list[tuple[str, int]]:
        with self.knobs.lock:
            return [(r, s) for m, p, r, s in self.knobs.log if m == "GET" and r and p.endswith(suffix)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--upstream-port", type=int, required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--latency", type=float, default=0.02, help="first-byte latency, seconds")
    ap.add_argument("--bandwidth", type=float, default=50e6, help="bytes/s per connection")
    args = ap.parse_args()
    proxy = LatencyProxy(args.upstream_port, latency=args.latency, bandwidth=args.bandwidth,
                         port=args.port)
    proxy._server.serve_forever(poll_interval=0.2)


if __name__ == "__main__":
    main()
