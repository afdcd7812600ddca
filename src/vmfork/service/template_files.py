"""``/v1/templates/{name}/files/{file}``: a template's published files, read-only.

Owns serving the published layout of a template (:mod:`vmfork.lazy.publish`)
to ``vmfork template pull`` on other hosts: ``GET`` and ``HEAD`` of
``manifest.json``, ``state``, ``memory``, ``memory.zst``, ``kernel``, ``initrd`` and
``disk{i}.qcow2``, with ``Accept-Ranges: bytes``. One range per request
(``Range: bytes=A-B``, ``bytes=A-``, ``bytes=-N``) answers 206 with
``Content-Range``; a range that starts past the end, or several ranges,
answer 416 (``range_not_satisfiable``, with ``Content-Range: bytes */SIZE``);
a ``Range`` that is not a byte range is ``invalid`` (400). The daemon's
bearer token applies as to every route. The layout is built on first use
(hashing the memory, flattening disks) in a worker thread, one build per
template at a time. The path of a template's memory (and its pack), once found, is kept
for as long as the template's manifest in the catalog is the same: a range
of memory (what a lazy puller asks for on a clone's page fault) then costs
one catalog read and one ``pread``, in the event loop (the memory file lives
in memory).

Owns the daemon's rate limit on these answers (``vmfork serve --rate-limit``,
:class:`RateLimit`): one token bucket that every file answer draws from
before each block it sends, so their sum never exceeds the rate — a link of
that speed, for benchmarks. An answer that fits in one read block draws
its bytes at once and is sent whole; a larger one is streamed, block by
block.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from vmfork.errors import InvalidInput, NotFound
from vmfork.lazy import publish
from vmfork.lazy.published import MANIFEST, MEMORY, MEMORY_PACK
from vmfork.names import check_name
from vmfork.records import TemplateManifest
from vmfork.service.state import ServiceState, state_of
from vmfork.templates.manifest import template_dir
from vmfork.timeouts import Timeouts

router = APIRouter(prefix="/v1/templates", tags=["templates"])

#: Bytes read from a file at once, and sent at once under a rate limit.
READ_BLOCK = 1 << 20
SEND_BLOCK = 64 << 10
#: Key of the rate limit in :attr:`ServiceState.parts`.
PART = "file_rate"
#: Key of the memory paths known ((template name, file) -> (catalog
#: manifest, path, read in the event loop)).
_MEMORY_PATHS = "file_memory_paths"
#: The longest ``Range`` header read.
MAX_RANGE_HEADER = 200
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")
#: Memory paths kept (templates served recently).
_MAX_MEMORY_PATHS = 64


class RateLimit:
    """A token bucket of *rate* bytes per second holding at most *burst*
    bytes: :meth:`take` waits until its bytes may go. Callers are served in
    turn, so *N* bytes through it take at least ``(N - burst) / rate``
    seconds, however many answers share it."""

    def __init__(self, rate: float, burst: int = SEND_BLOCK) -> None:
        if not rate > 0:
            raise InvalidInput(f"invalid rate {rate!r}: must be above 0 bytes/s")
        self.rate = float(rate)
        self.burst = burst
        self._tokens = float(burst)
        self._t = time.monotonic()
        self._lock = asyncio.Lock()

    async def take(self, n: int) -> None:
        async with self._lock:
            now = time.monotonic()
            self._tokens = min(self.burst, self._tokens + (now - self._t) * self.rate) - n
            self._t = now
            if self._tokens < 0:
                await asyncio.sleep(-self._tokens / self.rate)


def parse_rate(text: str) -> float:
    """A rate such as ``125M`` (bytes per second; K, M, G are powers of
    1000, so ``125M`` is 1 Gbit/s; Ki, Mi, Gi powers of 1024; an optional
    ``B`` or ``B/s`` after it)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgG]i?)?(?:B(?:/s)?)?\s*", text or "")
    if not m:
        raise InvalidInput(f"invalid rate {text!r}: bytes per second, e.g. 125M (1 Gbit/s)")
    unit = (m.group(2) or "").lower()
    scale = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9,
             "ki": 1 << 10, "mi": 1 << 20, "gi": 1 << 30}[unit]
    rate = float(m.group(1)) * scale
    if rate < 1:
        raise InvalidInput(f"invalid rate {text!r}: at least 1 byte per second")
    return rate


def rate_limit_of(state: ServiceState) -> RateLimit | None:
    limit = state.parts.get(PART)
    return limit if isinstance(limit, RateLimit) else None


def set_rate_limit(state: ServiceState, rate: float | None) -> None:
    """Limit every file answer of the daemon to *rate* bytes/s in all (None: no limit)."""
    if rate is None:
        state.parts.pop(PART, None)
    else:
        state.parts[PART] = RateLimit(rate)


def parse_range(header: str, size: int) -> tuple[int, int] | None:
    """The first and last byte of a ``Range`` header's one range within a
    file of *size* bytes; None when it cannot be satisfied (starts past
    the end, several ranges); InvalidInput when it is not a byte range."""
    text = header.strip()
    if len(text) > MAX_RANGE_HEADER:
        raise InvalidInput("Range header too long")
    if "," in text:
        return None
    m = _RANGE.fullmatch(text.replace(" ", ""))
    if not m or (not m.group(1) and not m.group(2)):
        raise InvalidInput(f"invalid Range header {text[:80]!r}: use bytes=FIRST-LAST")
    first, last = m.group(1), m.group(2)
    if not first:  # the last N bytes
        n = int(last)
        if n == 0 or size == 0:
            return None
        return max(0, size - n), size - 1
    a = int(first)
    b = size - 1 if not last else min(int(last), size - 1)
    if last and int(last) < a:
        raise InvalidInput(f"invalid Range header {text[:80]!r}: last byte before the first")
    if a >= size:
        return None
    return a, b


@dataclass
class _Opened:
    """A file of a layout opened for one answer, in a worker thread: its
    descriptor (None once closed), its size, the bytes to send (*first* to
    *last*; *partial* for a range; *unsatisfiable* for a range that cannot
    be), and those bytes themselves when they fit in one read block."""

    fd: int | None
    size: int
    first: int
    last: int
    partial: bool
    unsatisfiable: bool = False
    data: bytes | None = None

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _prepare(manifest: TemplateManifest, tdir: Path, file: str, header: str | None,
             body: bool, timeouts: Timeouts) -> tuple[_Opened, Path]:
    """Open *file* of the layout and find the range of *header*; read it at
    once if it fits in one block (one trip to a worker thread for a chunk).
    Also the file's path."""
    _published, paths = publish.layout_of(manifest, tdir, timeouts)
    path = paths.get(file)
    if path is None:
        raise NotFound(f"template {manifest.name} has no file {file[:80]!r} (it has "
                       f"{', '.join(sorted(paths))})")
    return _read_range(manifest.name, file, path, header, body), path


def _read_range(name: str, file: str, path: Path, header: str | None,
                body: bool) -> _Opened:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NotFound(f"{file} of template {name} is gone") from None
    opened = _Opened(fd, 0, 0, -1, False)
    try:
        opened.size = os.fstat(fd).st_size
        opened.last = opened.size - 1
        if header is not None:
            r = parse_range(header, opened.size)
            if r is None:
                opened.unsatisfiable = True
                opened.close()
                return opened
            opened.first, opened.last, opened.partial = r[0], r[1], True
        length = opened.last - opened.first + 1
        if not body:
            opened.close()
        elif length <= READ_BLOCK:
            opened.data = os.pread(fd, length, opened.first)
            opened.close()
        return opened
    except BaseException:
        opened.close()
        raise


def _close_opened(task: asyncio.Future[tuple[_Opened, Path]]) -> None:
    """Close what an abandoned request opened."""
    if not task.cancelled() and task.exception() is None:
        task.result()[0].close()


def _first_build_lock(state: ServiceState, name: str) -> asyncio.Lock | None:
    """A lock for the requests of template *name* until its layout was built
    once by this daemon (they would all wait for that build, each in a
    worker thread); None after that."""
    if name in _built(state):
        return None
    locks = state.parts.setdefault("file_build_locks", {})
    assert isinstance(locks, dict)
    lock = locks.setdefault(name, asyncio.Lock())
    assert isinstance(lock, asyncio.Lock)
    return lock


def _built(state: ServiceState) -> set[str]:
    built = state.parts.setdefault("file_layouts_built", set())
    assert isinstance(built, set)
    return built


def _memory_paths(state: ServiceState) -> dict[tuple[str, str], tuple[str, Path, bool]]:
    paths = state.parts.setdefault(_MEMORY_PATHS, {})
    assert isinstance(paths, dict)
    return paths


async def _open(state: ServiceState, name: str, file: str, header: str | None,
                body: bool) -> _Opened:
    store = state.host.store
    name = check_name(name, "template")
    row = store.template_row(name) if file in (MEMORY, MEMORY_PACK) else None
    if row is not None:
        known = _memory_paths(state).get((name, file))
        if known is not None and row == (known[0], "ready"):
            if known[2]:
                return _read_range(name, file, known[1], header, body)
            return await asyncio.to_thread(_read_range, name, file, known[1], header, body)
    manifest = store.get_template(name)
    tdir = template_dir(store, manifest.name)
    lock = _first_build_lock(state, manifest.name)
    async with lock if lock is not None else contextlib.nullcontext():
        job = asyncio.ensure_future(asyncio.to_thread(
            _prepare, manifest, tdir, file, header, body, state.host.timeouts))
        try:
            opened, path = await asyncio.shield(job)
        except asyncio.CancelledError:
            job.add_done_callback(_close_opened)
            raise
        _built(state).add(manifest.name)
    if row is not None:
        # Kept under the catalog's manifest as read before this request:
        # another manifest since then is another key, never matched.
        paths = _memory_paths(state)
        paths.pop((name, file), None)
        # A memory file in the memory directory is read in the event loop;
        # elsewhere (a pack on disk, a pulled template's own FUSE mount) in a
        # worker thread.
        paths[(name, file)] = (row[0], path, path.parent == store.memory_dir)
        while len(paths) > _MAX_MEMORY_PATHS:
            paths.pop(next(iter(paths)))
    return opened


async def _answer(request: Request, name: str, file: str, body: bool) -> Response:
    state = state_of(request)
    header = request.headers.get("range")
    opened = await _open(state, name, file, header, body)
    try:
        if opened.unsatisfiable:
            return JSONResponse(
                {"error": {"code": "range_not_satisfiable",
                           "message": f"range {(header or '').strip()[:80]!r} is not within "
                                      f"the {opened.size} bytes of {file}, or not one range"}},
                status_code=416, headers={"Content-Range": f"bytes */{opened.size}",
                                          "Accept-Ranges": "bytes"})
        media = "application/json" if file == MANIFEST else "application/octet-stream"
        length = opened.last - opened.first + 1
        headers = {"Accept-Ranges": "bytes", "Content-Length": str(length)}
        if opened.partial:
            headers["Content-Range"] = f"bytes {opened.first}-{opened.last}/{opened.size}"
        status = 206 if opened.partial else 200
        limit = rate_limit_of(state)
        if not body or (opened.data is not None and limit is None):
            return Response(opened.data or b"", status_code=status, headers=headers,
                            media_type=media)
        if opened.data is not None:
            assert limit is not None
            await limit.take(len(opened.data))
            return Response(opened.data, status_code=status, headers=headers,
                            media_type=media)
        return StreamingResponse(_blocks(opened, limit), status_code=status, headers=headers,
                                 media_type=media)
    except BaseException:
        opened.close()
        raise


async def _sent(data: bytes, limit: RateLimit | None) -> AsyncIterator[bytes]:
    """*data* in blocks drawn from *limit*."""
    view = memoryview(data)
    for off in range(0, len(data), SEND_BLOCK):
        part = view[off:off + SEND_BLOCK]
        if limit is not None:
            await limit.take(len(part))
        yield bytes(part)


async def _blocks(opened: _Opened, limit: RateLimit | None) -> AsyncIterator[bytes]:
    """The range of *opened*, read in blocks and sent through *limit*;
    closes its file at the end (or when the answer is abandoned)."""
    try:
        pos, end = opened.first, opened.last + 1
        while pos < end and opened.fd is not None:
            data = await asyncio.to_thread(os.pread, opened.fd, min(READ_BLOCK, end - pos), pos)
            if not data:
                return  # the file shrank: the client sees a short body
            pos += len(data)
            if limit is None:
                yield data
            else:
                async for part in _sent(data, limit):
                    yield part
    finally:
        opened.close()


_RESPONSES: dict[int | str, dict[str, object]] = {
    200: {"description": "the whole file", "content": {"application/octet-stream": {}}},
    206: {"description": "one byte range of the file (Content-Range)",
          "content": {"application/octet-stream": {}}},
    416: {"description": "range_not_satisfiable: past the end, or several ranges"},
}


@router.get("/{name}/files/{file}", response_class=Response, responses=_RESPONSES)
async def get_template_file(name: str, file: str, request: Request) -> Response:
    """A file of the template's published layout (``manifest.json``, ``state``,
    ``memory``, ``kernel``, ``initrd``, ``disk{i}.qcow2``), whole or one byte
    range (``Range: bytes=A-B``)."""
    return await _answer(request, name, file, body=True)


@router.head("/{name}/files/{file}", response_class=Response, responses=_RESPONSES)
async def head_template_file(name: str, file: str, request: Request) -> Response:
    """The headers ``GET`` would answer (``Content-Length``, ``Accept-Ranges``)."""
    return await _answer(request, name, file, body=False)


__all__ = ["PART", "RateLimit", "parse_range", "parse_rate", "rate_limit_of", "router",
           "set_rate_limit"]
