"""The HTTP side of a puller: fetching the files of a published template.

Owns :class:`Source` — one base URL under which the published layout
(:mod:`vmfork.lazy.published`) lives — and the rule that tells the two kinds
of URL apart (:func:`base_url`): a daemon's ``http(s)://HOST:PORT/v1/
templates/NAME`` (its files are under ``.../files``) or any other URL, taken
as the base of a published directory behind a static HTTP server. Also the
bearer token a puller sends (:func:`read_token_file`).

Answers from a source are untrusted and bounded: a whole file is read up to
a size cap, a range must come back as ``206`` with the ``Content-Range`` and
length asked for, and a download must have the size the manifest gives.
Every request retries with exponential backoff (0.1 s doubling to 2 s) on
transport errors, 408, 429 and 5xx until its deadline, then raises
:class:`~vmfork.errors.SourceError` with one line naming the URL and the
cause; 401, 403, 404 and other refusals fail at once. A ``Source`` is
thread-safe (a pool of keep-alive connections, one per request in
flight); its :meth:`Source.cancel` makes every request in flight or to come
end soon with SourceError (a pull that is interrupted stops its fetching
threads).

Requests go through the standard library's :mod:`http.client`: a lazily
pulled template's FUSE server asks for one chunk per page fault of a
clone, so the cost of a request is on the clone's path (about a third of
httpx's, measured), and the server starts sooner without httpx to import.

Deadlines are points in time on :func:`time.monotonic`'s clock (``deadline
= time.monotonic() + seconds``), so that a caller's several requests share
one.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import logging
import re
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO, TypeVar

from vmfork.errors import InvalidInput, SourceError

log = logging.getLogger("vmfork.lazy.source")

T = TypeVar("T")

#: First and longest pause between two tries of a request.
BACKOFF_FIRST = 0.1
BACKOFF_MAX = 2.0
#: Seconds one try may wait to connect, or between two reads of its answer.
TRY_TIMEOUT = 10.0
#: Largest file :meth:`Source.get` reads into memory unless told otherwise.
MAX_GET = 64 << 20
#: Largest token file read.
MAX_TOKEN = 4096
#: Bytes read from an answer at once.
BLOCK = 1 << 20
#: Idle connections kept.
MAX_IDLE = 16
#: Statuses worth another try: the source may recover.
_RETRY = frozenset({408, 425, 429, 500, 502, 503, 504})
_DAEMON_PATH = re.compile(r"^(?P<prefix>.*)/v1/templates/(?P<name>[^/]+)/?$")


def base_url(url: str) -> tuple[str, str | None]:
    """The base URL of the published files at *url*, and the template's name
    if *url* is a daemon's (``.../v1/templates/NAME``: its files are under
    ``.../v1/templates/NAME/files``). InvalidInput for anything that is not
    an ``http``/``https`` URL with a host, or has a query, a fragment or
    credentials (give a token with a token file)."""
    if not isinstance(url, str) or len(url) > 2048 or any(c.isspace() or ord(c) < 32
                                                           for c in url):
        raise InvalidInput(f"invalid source URL {str(url)[:100]!r}")
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise InvalidInput(f"invalid source URL {url!r}: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidInput(f"invalid source URL {url!r}: expected http(s)://HOST[:PORT]/PATH "
                           "(a daemon's /v1/templates/NAME or a published directory)")
    if parts.query or parts.fragment:
        raise InvalidInput(f"invalid source URL {url!r}: no query or fragment, please")
    if parts.username is not None or parts.password is not None:
        raise InvalidInput(f"invalid source URL {url!r}: give credentials with --token-file, "
                           "not in the URL")
    del port  # checked above (a port that is not a number raises)
    path = parts.path.rstrip("/")
    m = _DAEMON_PATH.match(path)
    name = urllib.parse.unquote(m.group("name")) if m else None
    if m:
        path = f"{path}/files"
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, "", "")), name


def read_token_file(path: Path | str) -> str:
    """The bearer token in the file *path* (its first line); InvalidInput if
    the file cannot be read or holds no usable token."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_TOKEN + 1)
    except OSError as exc:
        raise InvalidInput(f"cannot read token file {str(path)!r}: {exc.strerror}") from None
    try:
        token = data.decode().strip()
    except UnicodeDecodeError:
        token = ""
    if (len(data) > MAX_TOKEN or not token or not token.isprintable()
            or any(c.isspace() for c in token)):
        raise InvalidInput(f"token file {str(path)!r} holds no usable token")
    return token


def _cause(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:200]


class _Retry(Exception):
    """One try failed in a way worth another try."""


class Source:
    """The published files under one base URL (see the module docstring).

    *url* is the URL as the user gave it; :attr:`base` the base of its
    files, :attr:`daemon_name` the template's name in a daemon's URL (None
    for a published directory). *token*: sent as ``Authorization: Bearer``."""

    def __init__(self, url: str, token: str | None = None) -> None:
        self.url = url
        self.base, self.daemon_name = base_url(url)
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        parts = urllib.parse.urlsplit(self.base)
        self._https = parts.scheme == "https"
        self._host = parts.hostname or ""
        self._port = parts.port
        self._idle: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()
        self._closed = False
        self._cancelled = threading.Event()

    def __repr__(self) -> str:
        return f"<Source {self.base}>"

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def cancel(self) -> None:
        """Make every request, in flight (at its next read or retry) or to
        come, end with SourceError."""
        self._cancelled.set()

    def file_url(self, file: str) -> str:
        return f"{self.base}/{urllib.parse.quote(file)}"

    # -- requests -----------------------------------------------------------------
    def get(self, file: str, deadline: float, limit: int = MAX_GET) -> bytes:
        """The whole of *file*, at most *limit* bytes (SourceError if it is
        larger)."""
        url = self.file_url(file)

        def once() -> bytes:
            with self._answer(url, {}) as r:
                self._check(r, url, 200)
                declared = r.headers.get("content-length")
                if declared is not None and declared.isdigit() and int(declared) > limit:
                    raise SourceError(f"{url}: {declared} bytes, more than the {limit} "
                                      "allowed")
                out = bytearray()
                for block in self._blocks(r):
                    out += block
                    if len(out) > limit:
                        raise SourceError(f"{url}: more than the {limit} allowed")
                self._complete(r, url, len(out))
                return bytes(out)
        return self._retrying(url, deadline, once)

    def get_range(self, file: str, start: int, length: int, deadline: float) -> bytes:
        """Bytes *start* to *start* + *length* of *file* (a ``206`` answer
        with exactly that range, else SourceError)."""
        if start < 0 or length <= 0:
            raise ValueError(f"bad range {start}+{length}")
        url = self.file_url(file)
        end = start + length - 1

        def once() -> bytes:
            with self._answer(url, {"Range": f"bytes={start}-{end}"}) as r:
                self._check(r, url, 206)
                self._check_range(r, url, start, end)
                out = bytearray()
                for block in self._blocks(r):
                    out += block
                    if len(out) > length:
                        break
                if len(out) != length:
                    self._short(url, f"{len(out)} bytes for a range of {length}")
                return bytes(out)
        return self._retrying(url, deadline, once)

    def download(self, file: str, out: BinaryIO, size: int, patience: float) -> str:
        """Write *file* (of *size* bytes, as the manifest says) to *out*
        from its current position; return its sha256 (hex). A transfer cut
        short goes on with a range from the byte reached; SourceError when
        the source has made no progress for *patience* seconds, or sends
        another size."""
        url = self.file_url(file)
        h = hashlib.sha256()
        start = out.tell()
        done = 0
        deadline = time.monotonic() + patience

        def once() -> None:
            nonlocal done, deadline
            headers = {"Range": f"bytes={done}-{size - 1}"} if done else {}
            with self._answer(url, headers) as r:
                if done:
                    self._check(r, url, 206)
                    self._check_range(r, url, done, size - 1)
                else:
                    self._check(r, url, 200)
                for block in self._blocks(r):
                    if done + len(block) > size:
                        raise SourceError(f"{url}: more than the {size} bytes of its manifest")
                    out.write(block)
                    h.update(block)
                    done += len(block)
                    deadline = time.monotonic() + patience
                if done != size:
                    self._short(url, f"{done} of {size} bytes")

        self._retrying(url, deadline, once, progress=lambda: deadline)
        out.seek(start + size)
        return h.hexdigest()

    # -- the parts ----------------------------------------------------------------
    def _connection(self, fresh: bool = False) -> tuple[http.client.HTTPConnection, bool]:
        """A connection, and whether it was kept from an earlier request."""
        with self._lock:
            if self._idle and not fresh:
                return self._idle.pop(), True
        return self._new(), False

    def _new(self) -> http.client.HTTPConnection:
        if self._https:
            import ssl  # only for https sources

            return http.client.HTTPSConnection(self._host, self._port, timeout=TRY_TIMEOUT,
                                               context=ssl.create_default_context())
        return http.client.HTTPConnection(self._host, self._port, timeout=TRY_TIMEOUT)

    def _release(self, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            if not self._closed and len(self._idle) < MAX_IDLE:
                self._idle.append(conn)
                return
        conn.close()

    @contextlib.contextmanager
    def _answer(self, url: str, headers: dict[str, str]) -> Iterator[_Answer]:
        """One GET of *url*: its answer, read by the block. The connection
        goes back to the pool if the answer was read to its end."""
        if self._cancelled.is_set():
            raise SourceError(f"{url}: the pull was cancelled")
        conn, kept = self._connection()
        reusable = False
        try:
            while True:
                try:
                    conn.request("GET", urllib.parse.urlsplit(url).path,
                                 headers={**self._headers, **headers})
                    answer = _Answer(url, conn.getresponse())
                    break
                except (OSError, http.client.HTTPException) as exc:
                    conn.close()
                    if not kept:
                        raise _Retry(_cause(exc)) from None
                    # A kept connection the source closed meanwhile (its
                    # keep-alive ended): once more at once, on a new one.
                    conn, kept = self._connection(fresh=True)
            yield answer
            reusable = answer.r.isclosed() and not answer.r.will_close
        finally:
            if reusable:
                self._release(conn)
            else:
                conn.close()

    def _blocks(self, r: _Answer) -> Iterator[bytes]:
        while True:
            if self._cancelled.is_set():
                raise SourceError(f"{r.url}: the pull was cancelled")
            try:
                block = r.r.read(BLOCK)
            except (OSError, http.client.HTTPException) as exc:
                raise _Retry(_cause(exc)) from None
            if not block:
                return
            yield block

    @staticmethod
    def _check(r: _Answer, url: str, expected: int) -> None:
        if r.status_code == expected:
            return
        if r.status_code in _RETRY:
            raise _Retry(f"HTTP {r.status_code}")
        why = {401: "the token was refused (401): give the source's token with "
                    "--token-file",
               403: "access refused (403)",
               404: "not found (404)",
               416: "range not satisfiable (416)"}.get(r.status_code)
        if why is None and expected == 206 and r.status_code == 200:
            why = "the source answered a range request with the whole file (no Range support)"
        raise SourceError(f"{url}: {why or f'unexpected answer HTTP {r.status_code}'}")

    @staticmethod
    def _check_range(r: _Answer, url: str, start: int, end: int) -> None:
        got = r.headers.get("content-range", "")
        m = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+|\*)", got.strip())
        if m is None or (int(m.group(1)), int(m.group(2))) != (start, end):
            raise SourceError(f"{url}: asked for bytes {start}-{end}, the source sent "
                              f"Content-Range {got[:80]!r}")

    @staticmethod
    def _complete(r: _Answer, url: str, n: int) -> None:
        declared = r.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) != n:
            Source._short(url, f"{n} of {declared} bytes")

    @staticmethod
    def _short(url: str, what: str) -> None:
        raise _Retry(f"the answer ended early ({what})")

    def _retrying(self, url: str, deadline: float, once: Callable[[], T],
                  progress: Callable[[], float] | None = None) -> T:
        """*once()* until it succeeds, with backoff; SourceError at the
        deadline (read again from *progress* after each try, if given)."""
        pause = BACKOFF_FIRST
        tries = 0
        while True:
            if self._cancelled.is_set():
                raise SourceError(f"{url}: the pull was cancelled")
            tries += 1
            try:
                return once()
            except _Retry as exc:
                cause = str(exc)
            if progress is not None:
                deadline = progress()
            left = deadline - time.monotonic()
            if left <= 0:
                raise SourceError(f"{url}: no answer after {tries} tries ({cause})")
            log.debug("%s: %s; trying again in %.1f s", url, cause, pause)
            if self._cancelled.wait(min(pause, left)):
                raise SourceError(f"{url}: the pull was cancelled")
            pause = min(pause * 2, BACKOFF_MAX)


class _Answer:
    """The answer to one request, its body not read yet."""

    def __init__(self, url: str, r: http.client.HTTPResponse) -> None:
        self.url = url
        self.r = r
        self.status_code = r.status
        self.headers = r.headers


__all__ = ["BACKOFF_FIRST", "BACKOFF_MAX", "MAX_GET", "Source", "SourceError", "base_url",
           "read_token_file"]
