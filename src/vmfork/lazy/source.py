"""The HTTP side of a puller: ranges and whole files of a published layout.

Owns :class:`Source` (one base URL, one httpx client, thread-safe) and
:class:`SourceError`. A URL whose path ends in ``/v1/templates/<name>`` is a
daemon's and its files live under ``.../files``; any other URL is the base
itself. Requests are retried with exponential backoff (0.1 s doubling to
2 s) until the caller's deadline (a :func:`time.monotonic` value); 401, 403
and 404 fail at once.
"""

from __future__ import annotations

import re
import time
from urllib.parse import urlsplit

import httpx

from vmfork.errors import VmforkError

#: Largest whole file :meth:`Source.get` accepts.
MAX_FILE = 1 << 30
_DAEMON = re.compile(r"/v1/templates/[^/]+/?$")
_FINAL = (401, 403, 404)


class SourceError(VmforkError):
    """The source cannot give what was asked (gone, refused, or wrong)."""


class _Final(Exception):
    """A failure that retrying cannot mend."""


def base_url(url: str) -> str:
    """Where a source's files live (see the module docstring)."""
    u = url.rstrip("/")
    if _DAEMON.search(urlsplit(u).path):
        u += "/files"
    return u


class Source:
    """The files under one base URL; see the module docstring."""

    def __init__(self, url: str, token: str | None = None) -> None:
        self.base = base_url(url)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._client = httpx.Client(headers=headers, follow_redirects=False)

    def close(self) -> None:
        self._client.close()

    def get(self, file: str, deadline: float) -> bytes:
        """The whole of *file* (at most :data:`MAX_FILE` bytes)."""
        return self._retry(file, None, MAX_FILE, deadline)

    def get_range(self, file: str, start: int, length: int, deadline: float) -> bytes:
        """*length* bytes of *file* from *start* (a 206 of exactly that range)."""
        return self._retry(file, (start, length), length, deadline)

    def _retry(self, file: str, span: tuple[int, int] | None, cap: int,
               deadline: float) -> bytes:
        url = f"{self.base}/{file}"
        delay = 0.1
        while True:
            left = deadline - time.monotonic()
            try:
                if left <= 0:
                    raise TimeoutError("deadline passed")
                return self._once(url, span, cap, min(left, 10.0))
            except _Final as exc:
                raise SourceError(f"{url}: {exc}") from None
            except (httpx.HTTPError, OSError, ValueError) as exc:
                left = deadline - time.monotonic()
                if left <= 0:
                    cause = str(exc) or type(exc).__name__
                    raise SourceError(f"{url}: {cause}") from exc
                time.sleep(min(delay, left))
                delay = min(delay * 2, 2.0)

    def _once(self, url: str, span: tuple[int, int] | None, cap: int,
              timeout: float) -> bytes:
        headers = {}
        if span is not None:
            headers["Range"] = f"bytes={span[0]}-{span[0] + span[1] - 1}"
        with self._client.stream("GET", url, headers=headers, timeout=timeout) as r:
            if r.status_code in _FINAL:
                raise _Final(f"HTTP {r.status_code}")
            want = 206 if span is not None else 200
            if r.status_code != want:
                raise ValueError(f"HTTP {r.status_code}, expected {want}")
            if span is not None:
                expect = f"bytes {span[0]}-{span[0] + span[1] - 1}/"
                if not r.headers.get("content-range", "").startswith(expect):
                    raise _Final("answer is not the range asked for")
            buf = bytearray()
            for part in r.iter_bytes():
                buf += part
                if len(buf) > cap:
                    raise _Final(f"answer larger than {cap} bytes")
        if span is not None and len(buf) != span[1]:
            raise ValueError(f"short answer ({len(buf)} of {span[1]} bytes)")
        return bytes(buf)


__all__ = ["MAX_FILE", "Source", "SourceError", "base_url"]
