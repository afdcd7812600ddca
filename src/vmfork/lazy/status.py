"""What a pulled template's directory holds, by name, and the memory's status.

Owns the file names of a pulled template (see :mod:`vmfork.lazy.lifecycle`
for what each holds), ``lazy.json`` (:class:`LazyStatus`: read and written
here), ``source.json`` and whether a path is mounted. Imports nothing of
vmfork's catalog or QEMU side: the FUSE server (:mod:`vmfork.lazy.server`,
its own process) starts with little more than this and its FUSE binding.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from vmfork import files
from vmfork.files import write_atomic
from vmfork.lazy.published import MEMORY

SOURCE_FILE = "source.json"
TOKEN_FILE = "token"
PUBLISHED_FILE = "published.json"
STATUS_FILE = "lazy.json"
MOUNT_DIR = "mnt"
CACHE_FILE = "memory.cache"
BITMAP_FILE = "chunks.bitmap"
LOG_FILE = "server.log"
#: The pid of the server as spawned (``lazy.json`` has it once the server runs).
PID_FILE = "server.pid"
#: The module run as the FUSE server: ``python -m vmfork.lazy.server TEMPLATE_DIR``.
SERVER_MODULE = "vmfork.lazy.server"
#: Largest ``lazy.json`` or ``source.json`` read.
MAX_STATUS = 64 << 10
#: The memory's states (``lazy.json``).
FETCHING, COMPLETE, BROKEN = "fetching", "complete", "broken"
#: Seconds between two looks at a starting or ending server.
POLL = 0.01


@dataclass(frozen=True)
class LazyStatus:
    """``lazy.json``: how much of a pulled template's memory is here."""

    state: str
    cause: str | None = None
    pid: int | None = None
    fetched_bytes: int = 0
    local_bytes: int = 0
    total_bytes: int = 0
    chunks_total: int = 0
    chunks_local: int = 0
    started: float | None = None
    completed: float | None = None

    @property
    def local_percent(self) -> float:
        """The share of the memory that is here (100 once complete)."""
        if self.state == COMPLETE:
            return 100.0
        if self.total_bytes > 0:
            return max(0.0, min(100.0, 100.0 * self.local_bytes / self.total_bytes))
        if self.chunks_total > 0:
            return max(0.0, min(100.0, 100.0 * self.chunks_local / self.chunks_total))
        return 0.0

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: Any) -> LazyStatus:
        """Read a status (written by another process: every field checked;
        ValueError for one that is not a status)."""
        if not isinstance(d, dict) or d.get("state") not in (FETCHING, COMPLETE, BROKEN):
            raise ValueError("not a lazy status")

        def count(key: str) -> int:
            v = d.get(key) or 0
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"bad {key}")
            return v

        def when(key: str) -> float | None:
            v = d.get(key)
            if v is None:
                return None
            if isinstance(v, bool) or not isinstance(v, int | float):
                raise ValueError(f"bad {key}")
            return float(v)

        cause = d.get("cause")
        pid = d.get("pid")
        return cls(state=d["state"],
                   cause=" ".join(str(cause).split())[:500] if cause else None,
                   pid=pid if isinstance(pid, int) and not isinstance(pid, bool) and pid > 0
                   else None,
                   fetched_bytes=count("fetched_bytes"), local_bytes=count("local_bytes"),
                   total_bytes=count("total_bytes"), chunks_total=count("chunks_total"),
                   chunks_local=count("chunks_local"), started=when("started"),
                   completed=when("completed"))


def read_json(path: Path) -> Any:
    """The JSON in *path* (at most :data:`MAX_STATUS` bytes), or None."""
    return files.read_json(path, MAX_STATUS)


def read_status(tdir: Path) -> LazyStatus | None:
    """The memory status in *tdir* (None: not a pulled template, or no
    readable status yet)."""
    d = read_json(tdir / STATUS_FILE)
    if d is None:
        return None
    try:
        return LazyStatus.from_dict(d)
    except ValueError:
        return None


def write_status(tdir: Path, status: LazyStatus) -> None:
    write_atomic(tdir / STATUS_FILE, json.dumps(status.to_dict()).encode())


def is_pulled(tdir: Path) -> bool:
    """Whether the template in *tdir* was pulled (it has ``source.json``)."""
    return (tdir / SOURCE_FILE).is_file()


def pulled_from(tdir: Path) -> str | None:
    """The URL the template in *tdir* was pulled from (None: not pulled)."""
    d = read_json(tdir / SOURCE_FILE)
    if not isinstance(d, dict):
        return None
    url = d.get("pulled_from") or d.get("url")
    return str(url)[:2048] if url else None


def write_source(tdir: Path, base: str, pulled_url: str, token: str | None) -> None:
    """Write ``source.json`` (and ``token``, 0600) for the server."""
    token_file = None
    if token is not None:
        token_file = str(tdir / TOKEN_FILE)
        write_atomic(Path(token_file), token.encode() + b"\n")
    write_atomic(tdir / SOURCE_FILE, json.dumps(
        {"url": base, "token_file": token_file, "pulled_from": pulled_url}).encode())


def mount_point(tdir: Path) -> Path:
    return tdir / MOUNT_DIR


def served_memory(tdir: Path) -> Path:
    """The memory file as the FUSE server serves it."""
    return mount_point(tdir) / MEMORY


def _unescape(field: str) -> str:
    """A path of ``/proc/self/mountinfo`` (space, tab, newline, backslash
    are octal escapes there)."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1:i + 4].isdigit() and len(field[i + 1:i + 4]) == 3:
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def is_mounted(path: Path) -> bool:
    """Whether something is mounted on *path* (read from mountinfo: a FUSE
    mount whose server died cannot be stat'ed, so ``os.path.ismount`` says
    no)."""
    target = os.path.join(os.path.realpath(path.parent), path.name)
    try:
        with open("/proc/self/mountinfo") as f:
            return any(_unescape(line.split(" ")[4]) == target for line in f
                       if line.count(" ") >= 4)
    except OSError:
        return False


__all__ = [
    "BITMAP_FILE",
    "BROKEN",
    "CACHE_FILE",
    "COMPLETE",
    "FETCHING",
    "LOG_FILE",
    "MAX_STATUS",
    "MOUNT_DIR",
    "PID_FILE",
    "POLL",
    "PUBLISHED_FILE",
    "SERVER_MODULE",
    "SOURCE_FILE",
    "STATUS_FILE",
    "TOKEN_FILE",
    "LazyStatus",
    "is_mounted",
    "is_pulled",
    "mount_point",
    "pulled_from",
    "read_json",
    "read_status",
    "served_memory",
    "write_source",
    "write_status",
]
