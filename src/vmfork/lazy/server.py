"""The FUSE server of a lazily pulled template: its memory file, served
while it arrives.

Run as its own process, ``python -m vmfork.lazy.server TEMPLATE_DIR
[--deadline S] [--linger S] [--no-prefetch]`` (``template pull --lazy``
starts it detached).
Owns everything in TEMPLATE_DIR that concerns the memory's arrival:

``published.json`` (read)
    the published manifest as pulled; the server reads its memory's part
    (:class:`~vmfork.lazy.published.PublishedMemory`): the
    memory's size, chunk size, one sha256 per chunk, the working set.
``source.json`` (read)
    ``{"url": base url, "token_file": path or null}``: where chunks come from.
``mnt/`` (mount point, 0700)
    a read-only FUSE file system (libfuse3 through mfusepy; owner only, no
    ``allow_other``; ``auto_unmount``: a watching ``fusermount3`` detaches
    the mount of a server killed with SIGKILL, most of the time; a server
    that finds a dead mount on ``mnt`` detaches it first) holding one
    file, ``memory`` (0400, ``memory_size`` bytes), which clones map
    privately like any template's memory file.
    Mapping is allowed (no ``direct_io``), the kernel keeps what it read
    (``kernel_cache``: the content never changes), its reads are at most a
    chunk (:func:`max_read`) and its readahead is kept to
    :data:`MAX_READAHEAD`.
``memory.cache`` (0600)
    a sparse file of ``memory_size`` bytes: each chunk present is written at
    its offset; chunks of zeros are never fetched nor written (holes).
``chunks.bitmap`` (0600)
    which chunks of the cache are present, tied to the manifest's chunk
    list and to the cache file (device and inode); written atomically,
    after an fdatasync of the cache, every :data:`STATUS_EVERY` seconds
    while chunks arrive, so that a restart resumes where the last server
    stopped, refetching at most the chunks of its last moments.
``lazy.json`` (0600, written atomically)
    :class:`~vmfork.lazy.lifecycle.LazyStatus`: ``fetching``, ``complete``
    or ``broken`` (with a one-line cause), the server's pid (None once it
    has ended), and counts of bytes and chunks. Rewritten every
    :data:`STATUS_EVERY` seconds when something changed, and at every
    change of state.
``mount.lock``
    an flock: a server that is complete and unused takes it exclusively
    before it unmounts; whoever starts a process on ``mnt/memory`` holds it
    shared until that process has the file open
    (:func:`vmfork.lazy.mountlock.exit_lock`).

A read of chunks present is served from the cache. A missing chunk is
fetched (one fetch per chunk however many readers wait for it; a read
waits for the chunks it covers) from the compressed ``memory.zst`` if the
manifest has one (:mod:`vmfork.lazy.pack`: a third of the bytes where a
clone first reads), else from ``memory``, its sha256 checked (a mismatch is fetched
once more, then refused), written to the cache and marked. When every
chunk is local the state becomes ``complete``.

Page faults. QEMU advises its guest RAM for huge pages, and on such a
mapping the kernel reads 4 MiB around every page fault of a file mapping
whatever the readahead setting: 16 chunks, 33 ms of a 1 Gbit/s link, for
one page. So a read of more than a page that needs a chunk never refused
before is refused (EIO: the kernel's readahead gives up, without harm);
the kernel then reads the faulting page alone, and that read is served
(:meth:`LazyMemory._refuse`). Each fault costs one chunk. The chunks a
refused read named are fetched in the background, newest first
(:data:`SPECULATE_THREADS` at a time: the neighbours of a page a clone has
just touched), and every chunk whose pages the kernel may hold unfilled,
with those a clone is about to need (the working set), is pushed into the
kernel's page cache of the mount once local (:mod:`vmfork.lazy.page_cache`),
so that the clone's next faults there never reach this server.

Prefetch brings the working set first, in its recorded order, at full
speed beside the reads, then every other chunk in order, in runs of up to
:data:`PREFETCH_RUN` chunks, only while no read has waited for a fetch for
:data:`QUIET` seconds and the file was not opened (a clone starting) for
:data:`START_QUIET` seconds. A server started by a pull holds its prefetch until
the pull has its other files (its stdin, a pipe, ends): they are on the
first clone's path too.

Failures: the source gone or slow makes a fetch retry with backoff until
``--deadline`` seconds (default 30) have passed; then, as for a refused
chunk, the state becomes ``broken`` with the cause, the read fails with
EIO (a clone mapping the file gets SIGBUS: never wrong data), prefetch
stops, and every later read of a missing chunk fails at once; chunks
present are still served. SIGTERM (or SIGINT, SIGHUP) unmounts and exits 0.
Once complete, with no open file on the mount (a mapping keeps its file
open) for ``--linger`` seconds, the server unmounts and exits 0 by itself;
the state stays ``complete`` and ``memory.cache`` is then the template's
whole memory.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import json
import logging
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mfusepy  # type: ignore[import-untyped]

from vmfork.errors import TemplateError, VmforkError
from vmfork.files import write_atomic
from vmfork.lazy import pack
from vmfork.lazy.mountlock import open_lock
from vmfork.lazy.page_cache import PageCache
from vmfork.lazy.published import MEMORY, PublishedMemory
from vmfork.lazy.source import Source, SourceError
from vmfork.lazy.status import (
    BITMAP_FILE,
    BROKEN,
    CACHE_FILE,
    COMPLETE,
    FETCHING,
    MOUNT_DIR,
    PUBLISHED_FILE,
    SOURCE_FILE,
    LazyStatus,
    is_mounted,
    read_status,
    write_status,
)
from vmfork.private import DIR_MODE, FILE_MODE, READONLY_MODE

log = logging.getLogger("vmfork.lazy.server")

#: Kernel readahead on the mount (bytes): a page fault reads this much
#: around the page, so it spans at most two chunks (a mapping advised for
#: huge pages, as QEMU's guest RAM is, reads 4 MiB whatever this says).
MAX_READAHEAD = 128 << 10
#: Largest read the kernel sends (a readahead is cut into reads of this
#: size, at most a chunk: see :func:`max_read`).
MAX_READ = 1 << 20
PAGE = 4096
#: Chunks per prefetch request (consecutive chunks in one range): of the
#: working set, and of the rest.
WORKING_SET_RUN = 2
PREFETCH_RUN = 4
#: Prefetch requests in flight at once: of the working set (what a clone is
#: about to read: fetched as fast as the link allows, beside the reads),
#: and of the rest (only while no read has waited for a fetch for
#: :data:`QUIET` seconds, so that it never delays a clone).
WORKING_SET_THREADS = 4
PREFETCH_THREADS = 2
#: Fetches of refused chunks at once (see :meth:`LazyMemory._speculate`),
#: and the most consecutive ones in one request.
SPECULATE_THREADS = 2
SPECULATE_RUN = 1
QUIET = 0.5
#: Seconds the rest's prefetch also waits after the memory file was opened:
#: a clone starting (it shares the host's CPUs with the prefetch).
START_QUIET = 1.0
#: Seconds between writes of the bitmap and the status file.
STATUS_EVERY = 0.5
#: Default seconds a fetch retries before the template is broken.
DEADLINE = 30.0
#: Default seconds a complete server waits unused before it exits.
LINGER = 2.0
#: Seconds a stopping server waits for each of its threads.
STOP_WAIT = 2.0
#: Largest chunk a manifest may ask for (one fetch holds it in memory).
MAX_CHUNK = 64 << 20
#: Largest source.json, token file and published.json read.
_MAX_SOURCE = 64 << 10
_MAX_PUBLISHED = 64 << 20
_BITMAP_MAGIC = b"VMFLAZY1"
_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}


def max_read(chunk_size: int) -> int:
    """Reads of at most one chunk, so that a refused readahead
    (:meth:`LazyMemory._refuse`) names few chunks."""
    return min(chunk_size, MAX_READ)


def _read_bounded(path: Path, cap: int) -> bytes:
    with open(path, "rb") as f:
        data = f.read(cap + 1)
    if len(data) > cap:
        raise TemplateError(f"{path} is larger than {cap} bytes")
    return data


def _load_source(template_dir: Path) -> tuple[str, str | None]:
    try:
        d = json.loads(_read_bounded(template_dir / SOURCE_FILE, _MAX_SOURCE))
        url = d["url"]
        token_file = d.get("token_file")
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ValueError(f"bad url {str(url)[:200]!r}")
        if token_file is not None and not isinstance(token_file, str):
            raise ValueError("bad token_file")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise TemplateError(f"{template_dir / SOURCE_FILE} is unusable: {exc}") from exc
    token = None
    if token_file:
        try:
            token = _read_bounded(Path(token_file), 4096).decode().strip() or None
        except (OSError, UnicodeDecodeError) as exc:
            raise TemplateError(f"cannot read the token file {token_file}: {exc}") from exc
    return url, token


def _block_signals() -> None:
    """Keep the process's stop signals away from this thread: libfuse's
    handlers must run on the main thread, which waits in the session loop."""
    signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)


class LazyMemory:
    """The chunk cache, its bitmap, fetches and prefetch of one template."""

    def __init__(self, template_dir: Path, published: PublishedMemory, source: Source,
                 deadline: float, linger: float, prefetch: bool = True) -> None:
        self.dir = template_dir
        self.prefetch = prefetch
        self.pub = published
        self.source = source
        self.deadline = deadline
        self.linger = linger
        self.size = published.memory_size
        self.cs = published.chunk_size
        n = len(published.chunks)
        self.n = n
        self._zero = bytes(1 if c is None else 0 for c in published.chunks)
        #: Where chunks are fetched from: the pack (see :mod:`vmfork.lazy.pack`)
        #: if the manifest has one, and where each chunk starts in it.
        self._file, self._starts = pack.source(published)
        self._have = bytearray(n)
        #: Chunks whose pages the kernel may hold unfilled (a refused
        #: readahead): pushed into its page cache once local.
        self._refused = bytearray(n)
        #: Chunks refused, newest last: fetched in the background, newest first.
        self._wanted: collections.deque[int] = collections.deque()
        self.page_cache: PageCache | None = None
        self._local = bytearray(self._zero)
        self._key = hashlib.sha256(json.dumps(
            [self.size, self.cs, list(published.chunks)]).encode()).digest()
        self._cv = threading.Condition()
        self._inflight: set[int] = set()
        self._demand = 0
        self._last_demand = 0.0
        self._last_open = 0.0
        self._stopping = False
        self._dirty = False
        self.state = FETCHING
        self.cause: str | None = None
        self.fetched = 0
        self.started = time.time()
        self.completed: float | None = None
        self.mounted = False
        self.opens = 0
        self._idle_since = time.monotonic()
        self._threads: list[threading.Thread] = []
        self._status_lock = threading.Lock()
        self._last_status: LazyStatus | None = None
        self._lock_fd: int | None = None
        self._fd = os.open(template_dir / CACHE_FILE,
                           os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, FILE_MODE)
        try:
            self._resume()
        except BaseException:
            os.close(self._fd)
            raise

    @property
    def fd(self) -> int:
        """The cache file, open for reading and writing."""
        return self._fd

    # -- cache and bitmap ------------------------------------------------------------
    def _resume(self) -> None:
        """Take the chunks a previous server left (bitmap of this manifest),
        or start from an empty cache."""
        bits = b""
        st = os.fstat(self._fd)
        # The bits name chunks of this manifest in this very cache file (not
        # one created afresh beside an old bitmap).
        self._head = (_BITMAP_MAGIC + self._key
                      + st.st_dev.to_bytes(8, "little") + st.st_ino.to_bytes(8, "little"))
        try:
            raw = _read_bounded(self.dir / BITMAP_FILE, len(self._head) + self.n // 8 + 1)
            if (raw.startswith(self._head) and st.st_size == self.size
                    and len(raw) == len(self._head) + (self.n + 7) // 8):
                bits = raw[len(self._head):]
        except (OSError, TemplateError):
            pass
        if bits:
            for i in range(self.n):
                if bits[i >> 3] >> (i & 7) & 1 and not self._zero[i]:
                    self._have[i] = self._local[i] = 1
        else:
            os.ftruncate(self._fd, 0)  # unknown content: holes must read as zeros
        os.ftruncate(self._fd, self.size)
        old = read_status(self.dir)
        if old is not None and bits:
            self.fetched = max(0, old.fetched_bytes)
        self._missing = self.n - sum(self._local)
        if self._missing == 0:
            self.state, self.completed = COMPLETE, time.time()
        log.info("%s: %d of %d chunks local", self.dir.name, self.n - self._missing, self.n)

    def _save_bitmap(self) -> None:
        with self._cv:
            if not self._dirty:
                return
            self._dirty = False
            have = bytes(self._have)
        os.fdatasync(self._fd)  # the chunks before the bits that name them
        bits = bytearray((self.n + 7) // 8)
        for i, h in enumerate(have):
            if h:
                bits[i >> 3] |= 1 << (i & 7)
        write_atomic(self.dir / BITMAP_FILE, self._head + bytes(bits))

    def status(self) -> LazyStatus:
        with self._cv:
            local = sum(self._local)
            last = self.n - 1
            local_bytes = local * self.cs
            if self._local[last]:
                local_bytes -= self.n * self.cs - self.size
            return LazyStatus(
                state=self.state, cause=self.cause,
                pid=None if self._stopping else os.getpid(), fetched_bytes=self.fetched,
                local_bytes=local_bytes,
                total_bytes=self.size, chunks_total=self.n, chunks_local=local,
                started=self.started, completed=self.completed)

    def write_status(self) -> None:
        st = self.status()
        with self._status_lock:
            if st != self._last_status:
                write_status(self.dir, st)
                self._last_status = st

    # -- reads and fetches -----------------------------------------------------------
    def read(self, size: int, offset: int) -> bytes:
        end = min(offset + size, self.size)
        if offset >= end:
            return b""
        missing = [i for i in range(offset // self.cs, (end - 1) // self.cs + 1)
                   if not self._local[i]]
        if missing and size > PAGE and self._refuse(missing):
            raise mfusepy.FuseOSError(errno.EIO)
        for i in missing:
            self._ensure(i)
        return os.pread(self._fd, end - offset, offset)

    def _refuse(self, missing: list[int]) -> bool:
        """Whether to refuse a read of more than a page that needs chunks
        *missing*: the kernel's readahead around a page fault (several MiB
        of a mapping QEMU advised for huge pages). Refused, the kernel
        reads the faulting page alone (one page), which is served: only its
        chunk is fetched. A read that needs a chunk refused before is that
        second read (or one of a page near it) and is served."""
        with self._cv:
            if self.state != FETCHING or any(self._refused[i] for i in missing):
                return False
            for i in missing:
                self._refused[i] = 1
            if self.prefetch:
                self._wanted.extend(missing)
                self._cv.notify_all()
            return True

    def _ensure(self, i: int) -> None:
        """Chunk *i* local, fetched by this thread or another; EIO if it
        cannot be."""
        # A fetch ends by its deadline plus one request and a retry.
        end = time.monotonic() + 3 * self.deadline + 30
        with self._cv:
            while not self._local[i]:
                if self.state == BROKEN or self._stopping:
                    raise mfusepy.FuseOSError(errno.EIO)
                if i not in self._inflight:
                    break
                left = end - time.monotonic()
                if left <= 0:
                    raise mfusepy.FuseOSError(errno.EIO)
                self._cv.wait(min(left, 1.0))
            else:
                return
            self._inflight.add(i)
            self._demand += 1
        try:
            self._fetch([i], push=True)
        finally:
            with self._cv:
                self._demand -= 1
                self._last_demand = time.monotonic()
                self._cv.notify_all()
        if not self._local[i]:
            raise mfusepy.FuseOSError(errno.EIO)

    def _fetch(self, run: list[int], push: bool = False) -> None:
        """Fetch consecutive chunks *run* (this thread holds them in flight);
        *push*: into the kernel's page cache too."""
        try:
            parts = self._get(run[0], len(run))
            if parts is None:
                return
            for i, part in zip(run, parts, strict=True):
                if hashlib.sha256(part).hexdigest() != self.pub.chunks[i]:
                    log.warning("chunk %d: sha256 mismatch, fetching it again", i)
                    again = self._get(i, 1)
                    if again is None:
                        return
                    part = again[0]
                    if hashlib.sha256(part).hexdigest() != self.pub.chunks[i]:
                        self._break(f"chunk {i} of {self.source.base}/{self._file} does not "
                                    "match its sha256 in the manifest (fetched twice): refused")
                        return
                if self._stopping:
                    return
                os.pwrite(self._fd, part, i * self.cs)
                self._mark(i, push)
        except OSError as exc:
            self._break(f"cannot write the cache {self.dir / CACHE_FILE}: {exc.strerror}")
        finally:
            with self._cv:
                self._inflight.difference_update(run)
                self._cv.notify_all()

    def _get(self, first: int, count: int) -> list[bytes] | None:
        """Chunks *first* .. *first* + *count* - 1 as received (None, the
        template broken, if they cannot be)."""
        try:
            parts, received = pack.fetch_run(self.source, self.pub, first, count,
                                             time.monotonic() + self.deadline, self._starts)
        except SourceError as exc:
            self._break(str(exc))
            return None
        with self._cv:
            self.fetched += received
        return parts

    def _mark(self, i: int, push: bool) -> None:
        with self._cv:
            if self._local[i] or self._stopping:
                return
            self._have[i] = self._local[i] = 1
            if (push or self._refused[i]) and self.page_cache is not None:
                self.page_cache.push(i * self.cs, min(self.cs, self.size - i * self.cs))
            self._dirty = True
            self._missing -= 1
            done = self._missing == 0 and self.state == FETCHING
            if done:
                self.state, self.completed = COMPLETE, time.time()
        if done:
            log.info("%s: %s -> %s (%d bytes fetched)", self.dir.name, FETCHING, COMPLETE,
                     self.fetched)
            self._save_bitmap()
            self.write_status()

    def _break(self, cause: str) -> None:
        cause = " ".join(cause.split())[:500]
        with self._cv:
            if self.state == BROKEN or self._stopping:
                return
            old, self.state, self.cause = self.state, BROKEN, cause
            self._cv.notify_all()
        log.error("%s: %s -> %s: %s", self.dir.name, old, BROKEN, cause)
        self.write_status()

    # -- prefetch --------------------------------------------------------------------
    def _order(self) -> list[int]:
        seen = bytearray(self.n)
        order: list[int] = []
        for i in (*self.pub.working_set, *range(self.n)):
            if not seen[i] and not self._zero[i]:
                seen[i] = 1
                order.append(i)
        return order

    def _prefetch(self, order: list[int], pos: list[int], most: int, polite: bool) -> None:
        """Fetch the chunks of *order* from *pos* on, *most* consecutive
        ones per request; *polite*: only while reads have not waited for a
        fetch for :data:`QUIET` seconds."""
        _block_signals()
        while True:
            with self._cv:
                while (polite and not self._stopping and self.state == FETCHING
                       and (self._demand or time.monotonic() - self._last_demand < QUIET
                            or time.monotonic() - self._last_open < START_QUIET)):
                    self._cv.wait(0.05)
                if self._stopping or self.state != FETCHING:
                    return
                run: list[int] = []
                while pos[0] < len(order) and not run:
                    i = order[pos[0]]
                    pos[0] += 1
                    if not self._local[i] and i not in self._inflight:
                        run.append(i)
                while (run and len(run) < most and pos[0] < len(order)
                       and order[pos[0]] == run[-1] + 1
                       and not self._local[order[pos[0]]]
                       and order[pos[0]] not in self._inflight):
                    run.append(order[pos[0]])
                    pos[0] += 1
                if not run:
                    return
                self._inflight.update(run)
            self._fetch(run, push=not polite)

    def _speculate(self) -> None:
        """Fetch refused chunks, newest first, up to :data:`SPECULATE_RUN`
        consecutive ones per request: the neighbours of a page a clone has
        just faulted on, which it may read next. The kernel's readahead would have fetched them
        before the faulting page was served; here the clone goes on
        meanwhile."""
        _block_signals()
        while True:
            with self._cv:
                run: list[int] = []
                while not run:
                    if self._stopping or self.state != FETCHING:
                        return
                    while self._wanted and not run:
                        i = self._wanted.pop()
                        if not self._local[i] and i not in self._inflight:
                            run.append(i)
                    if not run:
                        self._cv.wait(1.0)
                while (len(run) < SPECULATE_RUN and run[-1] + 1 < self.n
                       and self._refused[run[-1] + 1] and not self._local[run[-1] + 1]
                       and run[-1] + 1 not in self._inflight):
                    run.append(run[-1] + 1)
                self._inflight.update(run)
            self._fetch(run)

    def _prefetch_all(self) -> None:
        """The working set at full speed, then the rest politely."""
        self._held()
        ws = [i for i in dict.fromkeys(self.pub.working_set) if not self._zero[i]]
        self._prefetch_with(WORKING_SET_THREADS, ws, WORKING_SET_RUN, False)
        self._prefetch_with(PREFETCH_THREADS, self._order(), PREFETCH_RUN, True)

    def _prefetch_with(self, threads: int, order: list[int], most: int, polite: bool) -> None:
        """:meth:`_prefetch` of *order* on *threads* threads (this one among
        them) sharing one position; returns when all are done."""
        pos = [0]
        others = [threading.Thread(target=self._prefetch, args=(order, pos, most, polite),
                                   daemon=True, name="vmfork-lazy-prefetch")
                  for _ in range(threads - 1)]
        for t in others:
            t.start()
        self._prefetch(order, pos, most, polite)
        for t in others:
            t.join()

    def _keeper(self) -> None:
        """Every STATUS_EVERY seconds: the bitmap and the status; and the
        exit of a complete server nobody uses."""
        _block_signals()
        while True:
            with self._cv:
                self._cv.wait(STATUS_EVERY)
                if self._stopping:
                    return
            try:
                self._save_bitmap()
                self.write_status()
            except OSError as exc:
                log.error("cannot write %s: %s", self.dir, exc)
            if self._unused_long_enough() and self._take_exit_lock():
                log.info("%s: complete and unused: unmounting", self.dir.name)
                os.kill(os.getpid(), signal.SIGTERM)
                return

    def _unused_long_enough(self) -> bool:
        with self._cv:
            return (self.state == COMPLETE and self.opens == 0
                    and time.monotonic() - self._idle_since >= self.linger)

    def _take_exit_lock(self) -> bool:
        fd = open_lock(self.dir)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        if not self._unused_long_enough():  # opened before the lock was free
            os.close(fd)
            return False
        self._lock_fd = fd  # held until the process exits
        return True

    # -- lifecycle -------------------------------------------------------------------
    def _held(self) -> None:
        """Wait until the pulling process lets prefetch begin: the end of
        this process's stdin (closed by it, or by its end); at once if stdin
        is not a pipe."""
        with contextlib.suppress(OSError, ValueError):
            if stat.S_ISFIFO(os.fstat(0).st_mode):
                os.read(0, 1)

    def start(self) -> None:
        """On the mount's init: threads for prefetch and the keeper."""
        with self._cv:
            self.mounted = True
        self.write_status()
        log.info("%s: serving %s (%s)", self.dir.name, self.dir / MOUNT_DIR / MEMORY, self.state)
        targets: list[Callable[[], None]] = [self._keeper]
        if self.prefetch:
            targets.append(self._prefetch_all)
            targets.extend([self._speculate] * SPECULATE_THREADS)
        for t in targets:
            th = threading.Thread(target=t, daemon=True, name="vmfork-lazy")
            th.start()
            self._threads.append(th)

    def opened(self) -> None:
        with self._cv:
            self.opens += 1
            self._last_open = time.monotonic()

    def released(self) -> None:
        with self._cv:
            self.opens -= 1
            if self.opens == 0:
                self._idle_since = time.monotonic()

    def stop(self) -> None:
        """After the unmount: end the threads, save the bitmap, a last status."""
        with self._cv:
            self._stopping = True
            self.mounted = False
            self._cv.notify_all()
        if self.page_cache is not None:
            self.page_cache.close(STOP_WAIT)
        for th in self._threads:  # a fetch in flight is not waited for
            th.join(timeout=STOP_WAIT)
        try:
            self._save_bitmap()
        finally:
            self.write_status()
            if not any(th.is_alive() for th in self._threads):
                os.close(self._fd)  # else the process's exit closes it


class MemoryFS(mfusepy.Operations):  # type: ignore[misc]
    """The mount: a directory holding one read-only file, ``memory``."""

    use_ns = True

    def __init__(self, mem: LazyMemory, mtime_ns: int) -> None:
        self.mem = mem
        self.uid, self.gid = os.getuid(), os.getgid()
        self.mtime = mtime_ns

    def init_with_config(self, conn: Any, config: Any) -> None:
        if conn is not None:
            conn.max_readahead = min(conn.max_readahead, MAX_READAHEAD)
            conn.max_read = max_read(self.mem.cs)
        if config is not None:
            config.kernel_cache = 1
            config.direct_io = 0
            config.entry_timeout = config.attr_timeout = 3600.0
        try:
            fuse = mfusepy._libfuse.fuse_get_context().contents.fuse
            self.mem.page_cache = PageCache.of_mount(mfusepy._libfuse, fuse, self.mem.fd)
        except (AttributeError, OSError, ValueError) as exc:
            log.warning("no pushing into the page cache: %s", exc)
        self.mem.start()

    def destroy(self, path: str) -> None:
        if self.mem.page_cache is not None:  # before libfuse ends the session
            self.mem.page_cache.close(STOP_WAIT)

    def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
        base = {"st_uid": self.uid, "st_gid": self.gid, "st_atime": self.mtime,
                "st_mtime": self.mtime, "st_ctime": self.mtime}
        if path == "/":
            return {**base, "st_mode": stat.S_IFDIR | (DIR_MODE & 0o500), "st_nlink": 2}
        if path == "/" + MEMORY:
            return {**base, "st_mode": stat.S_IFREG | READONLY_MODE, "st_nlink": 1,
                    "st_size": self.mem.size, "st_blocks": (self.mem.size + 511) // 512}
        raise mfusepy.FuseOSError(errno.ENOENT)

    def readdir(self, path: str, fh: int) -> list[str]:
        if path != "/":
            raise mfusepy.FuseOSError(errno.ENOTDIR)
        return [".", "..", MEMORY]

    def open(self, path: str, flags: int) -> int:
        if path != "/" + MEMORY:
            raise mfusepy.FuseOSError(errno.ENOENT)
        if flags & os.O_ACCMODE != os.O_RDONLY:
            raise mfusepy.FuseOSError(errno.EROFS)
        self.mem.opened()
        return 0

    def release(self, path: str, fh: int) -> int:
        self.mem.released()
        return 0

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        return self.mem.read(size, offset)


def serve(template_dir: Path, deadline: float = DEADLINE, linger: float = LINGER,
          prefetch: bool = True) -> int:
    """Serve *template_dir*'s memory until SIGTERM, or until it is complete
    and unused; the exit status (0, or 1 when it could not start). Without
    *prefetch* only what is read is fetched (to measure what a clone reads)."""
    mem: LazyMemory | None = None
    source: Source | None = None
    try:
        published = template_dir / PUBLISHED_FILE
        try:
            pub = PublishedMemory.from_json(_read_bounded(published, _MAX_PUBLISHED))
        except OSError as exc:
            raise TemplateError(f"cannot read {published}: {exc.strerror}") from exc
        if pub.memory_size <= 0 or pub.chunk_size > MAX_CHUNK:
            raise TemplateError(f"{published}: memory of {pub.memory_size} bytes in chunks of "
                                f"{pub.chunk_size}: not served")
        url, token = _load_source(template_dir)
        mnt = template_dir / MOUNT_DIR
        if is_mounted(mnt):  # left by a server that died
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True,
                           timeout=30, check=False)
        with contextlib.suppress(FileExistsError):
            mnt.mkdir(mode=DIR_MODE)
        if not stat.S_ISDIR(os.lstat(mnt).st_mode):
            raise TemplateError(f"mount point {mnt} is not a directory")
        os.chmod(mnt, DIR_MODE)
        source = Source(url, token)
        mem = LazyMemory(template_dir, pub, source, deadline, linger, prefetch)
    except (VmforkError, OSError, subprocess.SubprocessError) as exc:
        cause = str(exc) if isinstance(exc, VmforkError) else f"{template_dir}: {exc}"
        _fail(template_dir, cause)
        if source is not None:
            source.close()
        return 1
    fs = MemoryFS(mem, (template_dir / PUBLISHED_FILE).stat().st_mtime_ns)
    failure: str | None = None
    try:
        mfusepy.FUSE(fs, str(mnt), foreground=True, ro=True, default_permissions=True,
                     auto_unmount=True, fsname="vmfork-lazy", subtype="vmfork",
                     max_read=max_read(mem.cs))
    except RuntimeError as exc:
        if not mem.mounted:
            failure = f"cannot mount {mnt} (libfuse status {exc})"
    finally:
        mem.stop()
        source.close()
    if failure is not None:
        _fail(template_dir, failure)
        return 1
    log.info("%s: unmounted (%s)", template_dir.name, mem.state)
    return 0


def _fail(template_dir: Path, cause: str) -> None:
    """A server that cannot start: a broken status and one line on stderr."""
    print(f"vmfork lazy server: {cause}", file=sys.stderr)
    old = read_status(template_dir) or LazyStatus(state=BROKEN)
    with contextlib.suppress(OSError):
        write_status(template_dir, dataclasses.replace(
            old, state=BROKEN, cause=cause[:500], pid=None, started=time.time(),
            completed=None))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vmfork.lazy.server",
                                description="Serve a lazily pulled template's memory.")
    p.add_argument("template_dir", type=Path)
    p.add_argument("--deadline", type=float, default=DEADLINE,
                   help="seconds a fetch retries before the template is broken")
    p.add_argument("--linger", type=float, default=LINGER,
                   help="seconds a complete, unused server waits before it exits")
    p.add_argument("--no-prefetch", dest="prefetch", action="store_false",
                   help="fetch only what is read (to measure what a clone reads)")
    a = p.parse_args(argv)
    if not a.deadline > 0 or not a.linger >= 0:
        p.error("--deadline must be above 0 and --linger at least 0")
    os.umask(0o077)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("mfusepy").setLevel(logging.WARNING)
    return serve(a.template_dir.absolute(), a.deadline, a.linger, a.prefetch)


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["LazyMemory", "MemoryFS", "main", "serve"]
