"""A small static HTTP server for tests: serves one directory read-only with
single-range `Range` support (Python's http.server has none), HEAD, 206 with
`Content-Range`, 416 for a range past the end, `Accept-Ranges: bytes`,
threaded, optionally limited to a number of bytes per second over all
responses (a token bucket, like a slow link), or over the responses for some
files only (``rate_only``: their names); a GET that touches one of the byte
spans in ``refuse`` (file name, first byte, last byte) answers 503, like a
source that cannot serve part of a file. Started on a free loopback port and
stopped by the test or benchmark that owns it:

    with RangeServer(directory, rate=10_000_000, rate_only=("memory",)) as srv:
        url = srv.url            # http://127.0.0.1:PORT
        srv.requests             # (method, path, range header) seen so far
        srv.stop()               # idempotent; the with block calls it too

`stop()` closes open connections too, so a client in the middle of a body
sees the source vanish, like a killed host. `python -m tests.range_server DIR
[--port P] [--rate BYTES] [--rate-only NAME ...]` runs one in the foreground
and prints its URL (for a test that kills the server's process)."""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import socket
import sys
import threading
import time
import urllib.parse
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any

_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")
_BLOCK = 64 * 1024
_Request = socket.socket | tuple[bytes, socket.socket]


class TokenBucket:
    """Bytes per second shared by every response of one server; a burst of
    at most one block so the rate holds over short spans too."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self._lock = threading.Lock()
        self._tokens = float(_BLOCK)
        self._last = time.monotonic()

    def take(self, n: int, stop: threading.Event) -> bool:
        """Wait until n bytes may be sent; False when the server stops."""
        while True:
            with self._lock:
                now = time.monotonic()
                self._tokens = min(float(_BLOCK), self._tokens + (now - self._last) * self.rate)
                self._last = now
                if self._tokens >= n:
                    self._tokens -= n
                    return True
                wait = (n - self._tokens) / self.rate
            if stop.wait(min(wait, 0.5)):
                return False


def parse_range(header: str, size: int) -> tuple[int, int] | None:
    """The inclusive (start, end) of a single-range header within a file of
    `size` bytes, or None when it cannot be satisfied. Raises ValueError for a
    header this server does not understand (then the whole file is sent, as
    RFC 9110 allows)."""
    m = _RANGE.match(header.strip())
    if not m or (not m.group(1) and not m.group(2)):
        raise ValueError(header)
    first, last = m.group(1), m.group(2)
    if not first:  # suffix: the last N bytes
        n = int(last)
        if n == 0 or size == 0:
            return None
        return max(0, size - n), size - 1
    start = int(first)
    end = int(last) if last else size - 1
    if start >= size or end < start:
        return None
    return start, min(end, size - 1)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass  # tests read .requests instead

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    def _file(self) -> Path | None:
        rel = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path).lstrip("/")
        root = self.server.root
        path = (root / rel).resolve()
        if path != root and root not in path.parents:
            return None
        return path if path.is_file() else None

    def _serve(self, body: bool) -> None:
        rng = self.headers.get("Range")
        with self.server.lock:
            self.server.requests.append((self.command, self.path, rng))
        path = self._file()
        if path is None:
            self._empty(HTTPStatus.NOT_FOUND)
            return
        try:
            f = path.open("rb")
        except OSError:
            self._empty(HTTPStatus.NOT_FOUND)
            return
        with f:
            size = os.fstat(f.fileno()).st_size
            start, end, status = 0, size - 1, HTTPStatus.OK
            if rng is not None:
                try:
                    span = parse_range(rng, size)
                except ValueError:
                    span = (0, size - 1) if size else None
                    rng = None
                if rng is not None:
                    if span is None:
                        self.send_response(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
                        self.send_header("Content-Range", f"bytes */{size}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    start, end, status = span[0], span[1], HTTPStatus.PARTIAL_CONTENT
            if body and self._refused(path.name, start, end):
                self._empty(HTTPStatus.SERVICE_UNAVAILABLE)
                return
            length = max(0, end - start + 1)
            self.send_response(status)
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(length))
            if status == HTTPStatus.PARTIAL_CONTENT:
                self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
            self.end_headers()
            if body:
                limited = not self.server.rate_only or path.name in self.server.rate_only
                self._send_body(f.fileno(), start, length, limited)

    def _refused(self, name: str, start: int, end: int) -> bool:
        return any(f == name and start <= last and first <= end
                   for f, first, last in self.server.refuse)

    def _send_body(self, fd: int, start: int, length: int, limited: bool) -> None:
        srv = self.server
        sent = 0
        while sent < length:
            n = min(_BLOCK, length - sent)
            if limited and srv.bucket is not None and not srv.bucket.take(n, srv.stopping):
                return
            if srv.stopping.is_set():
                return
            data = os.pread(fd, n, start + sent)
            if not data:
                return
            try:
                self.wfile.write(data)
            except OSError:
                return
            sent += len(data)
            with srv.lock:
                srv.bytes_sent += len(data)

    def _empty(self, status: HTTPStatus) -> None:
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, root: Path, rate: int | None, rate_only: tuple[str, ...],
                 refuse: tuple[tuple[str, int, int], ...], port: int) -> None:
        self.root = root.resolve()
        self.bucket = TokenBucket(rate) if rate else None
        self.rate_only = rate_only
        self.refuse = refuse
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.requests: list[tuple[str, str, str | None]] = []
        self.bytes_sent = 0
        self.conns: set[socket.socket] = set()
        super().__init__(("127.0.0.1", port), _Handler)

    def process_request(self, request: _Request, client_address: Any) -> None:
        if isinstance(request, socket.socket):
            with self.lock:
                self.conns.add(request)
        super().process_request(request, client_address)

    def handle_error(self, request: _Request, client_address: Any) -> None:
        """A client that went away (reset, broken pipe) is normal here; any
        other error is printed as socketserver does."""
        exc = sys.exc_info()[1]
        if not isinstance(exc, OSError):
            super().handle_error(request, client_address)

    def shutdown_request(self, request: _Request) -> None:
        if isinstance(request, socket.socket):
            with self.lock:
                self.conns.discard(request)
        super().shutdown_request(request)


class RangeServer:
    """One server on 127.0.0.1 (port 0 = a free one), serving `root`; see the
    module docstring."""

    def __init__(self, root: Path, rate: int | None = None, port: int = 0,
                 rate_only: tuple[str, ...] = (),
                 refuse: tuple[tuple[str, int, int], ...] = ()) -> None:
        self._srv = _Server(Path(root), rate, tuple(rate_only), tuple(refuse), port)
        self.port: int = self._srv.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(
            target=self._srv.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True
        )
        self._thread.start()
        self._stopped = False

    @property
    def requests(self) -> list[tuple[str, str, str | None]]:
        with self._srv.lock:
            return list(self._srv.requests)

    @property
    def bytes_sent(self) -> int:
        with self._srv.lock:
            return self._srv.bytes_sent

    def stop(self) -> None:
        """Stop serving and drop open connections; idempotent."""
        if self._stopped:
            return
        self._stopped = True
        self._srv.stopping.set()
        self._srv.shutdown()
        self._srv.server_close()
        with self._srv.lock:
            conns = list(self._srv.conns)
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
        self._thread.join(timeout=5)

    def __enter__(self) -> RangeServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("directory", type=Path)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--rate", type=int, default=None, help="bytes per second")
    p.add_argument("--rate-only", action="append", default=[], metavar="NAME",
                   help="limit only the answers for files of this name (repeatable)")
    a = p.parse_args()
    srv = RangeServer(a.directory, rate=a.rate, port=a.port, rate_only=tuple(a.rate_only))
    print(srv.url, flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        srv.stop()


if __name__ == "__main__":
    main()
