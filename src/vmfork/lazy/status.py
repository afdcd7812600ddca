"""The files a lazy template's memory server keeps in its template dir, and
what others read of them.

Owns the names (:data:`STATUS` ``lazy.json``, :data:`CACHE`, ...), the
states, :class:`LazyStatus` with :func:`read_status` and
:func:`write_status`, :func:`exit_lock` (the lock a launcher holds so that
a complete server does not unmount under it) and :func:`mounted`. Imports
no FUSE binding: the operations that only look at a pulled template (its
status, its clones) need none. The server itself is
:mod:`vmfork.lazy.server`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from vmfork.errors import TemplateError
from vmfork.private import FILE_MODE

#: The Published manifest as pulled (read by the server).
PUBLISHED = "published.json"
#: ``{"url": base url, "token_file": path or null}`` (read by the server).
SOURCE = "source.json"
#: The mount point; the file clones map is ``mnt/memory``.
MOUNT = "mnt"
#: The chunks present, at their offsets (sparse, 0600): the whole memory once
#: complete.
CACHE = "memory.cache"
#: Which chunks of the cache are present (resumed by a restart).
BITMAP = "chunks.bitmap"
#: :class:`LazyStatus`, rewritten atomically.
STATUS = "lazy.json"
#: Held shared by a launcher (:func:`exit_lock`), exclusively by a server
#: about to unmount.
LOCK = "mount.lock"

FETCHING = "fetching"
COMPLETE = "complete"
BROKEN = "broken"

#: Largest lazy.json read.
_MAX_STATUS = 64 << 10


@dataclass(frozen=True)
class LazyStatus:
    """``lazy.json``: how far the memory of a pulled template has arrived."""

    state: str
    cause: str | None
    #: The server's pid while it runs; None once it has exited cleanly.
    pid: int | None
    #: Whether ``mnt/memory`` is being served.
    mounted: bool
    #: Bytes fetched from the source (carried over a restart).
    fetched_bytes: int
    #: Bytes of memory available locally (chunks present and chunks of zeros).
    local_bytes: int
    total_bytes: int
    chunks_total: int
    chunks_local: int
    #: Wall-clock times (seconds since the epoch) the server started and
    #: the memory became complete.
    started: float
    completed: float | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def local_percent(self) -> float:
        return 100.0 * self.local_bytes / self.total_bytes if self.total_bytes else 100.0


def write_status(template_dir: Path, status: LazyStatus) -> None:
    """Replace *template_dir*'s ``lazy.json`` atomically (0600; no fsync: a
    status, rewritten often)."""
    path = template_dir / STATUS
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW,
                 FILE_MODE)
    try:
        os.write(fd, json.dumps(status.to_dict()).encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)


def read_status(template_dir: Path) -> LazyStatus | None:
    """The status in *template_dir*'s ``lazy.json``, or None when there is
    none or it cannot be read."""
    try:
        with open(template_dir / STATUS, "rb") as f:
            d = json.loads(f.read(_MAX_STATUS))
        state = str(d["state"])
        if state not in (FETCHING, COMPLETE, BROKEN):
            return None
        cause = d.get("cause")
        pid = d.get("pid")
        completed = d.get("completed")
        return LazyStatus(
            state=state, cause=None if cause is None else str(cause)[:1000],
            pid=None if pid is None else int(pid), mounted=bool(d.get("mounted")),
            fetched_bytes=int(d["fetched_bytes"]), local_bytes=int(d["local_bytes"]),
            total_bytes=int(d["total_bytes"]), chunks_total=int(d["chunks_total"]),
            chunks_local=int(d["chunks_local"]), started=float(d["started"]),
            completed=None if completed is None else float(completed))
    except (OSError, ValueError, KeyError, TypeError):
        return None


@contextlib.contextmanager
def exit_lock(template_dir: Path, timeout: float) -> Iterator[None]:
    """Hold ``mount.lock`` shared: a complete server does not unmount while
    it is held. Hold it from reading ``lazy.json`` (is the mount live?) until
    the process given ``mnt/memory`` has it open. TemplateError after
    *timeout* seconds."""
    fd = os.open(template_dir / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW,
                 FILE_MODE)
    try:
        end = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= end:
                    raise TemplateError(f"the lazy memory server of {template_dir} holds "
                                        f"{LOCK} for more than {timeout:g} s") from None
                time.sleep(0.02)
        yield
    finally:
        os.close(fd)


def mounted(path: Path) -> bool:
    """Whether *path* is a mount point (a dead FUSE mount included)."""
    target = str(path).encode()
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            fields = line.split(b" ")
            if len(fields) > 4 and fields[4].decode("unicode_escape").encode("latin-1") == target:
                return True
    return False



__all__ = ["BITMAP", "BROKEN", "CACHE", "COMPLETE", "FETCHING", "LOCK", "MOUNT", "PUBLISHED",
           "SOURCE", "STATUS", "LazyStatus", "exit_lock", "mounted", "read_status",
           "write_status"]
