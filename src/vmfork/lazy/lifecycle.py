"""The local side of a pulled template: its files, its FUSE server, its mount.

Owns the names of what ``template pull`` leaves in a template's directory,
reading them, and the life of the FUSE server that serves a lazily pulled
template's memory (:mod:`vmfork.lazy.server`, its own process):

    source.json     ``{"url": base URL of the files, "token_file": path or
                    null, "pulled_from": the URL the user gave}``
    token           the bearer token, if the source needs one (0600)
    published.json  the published manifest as pulled (chunk sha256s, working set)
    lazy.json       the memory's status (:class:`LazyStatus`), written by the
                    server (an eager pull writes it once, ``complete``)
    mnt/memory      the memory file as the server serves it (lazy)
    memory.cache    the chunks fetched so far (sparse) and ``chunks.bitmap``
    server.log      the server's output, ``server.pid`` its pid as spawned

Lifecycle: :func:`start_server` spawns the server detached (its own session,
so it outlives the command that pulled) and waits until it has mounted;
:func:`discard` ends it (SIGTERM, then SIGKILL) and unmounts what it left
(``fusermount3 -u``, then lazily: ``umount -l`` as a last resort), before a
template's directory is removed (``template rm``, an undone pull:
:func:`undo_pull`). :func:`revive` is the next command's repair of a
template whose server died (kill -9, a reboot) or ended on its own once
complete: the stale mount goes, then a memory still ``fetching`` gets a new
server (the cache and its bitmap survive, so it resumes), and a ``complete``
one is used from ``memory.cache`` from then on (the template's manifest
points at it). A ``broken`` one is left broken, with its cause.

Nothing here imports the template operations (they import this module).
The functions that touch the catalog are coroutines (the catalog's
connection belongs to the event loop's thread); the rest block, each wait
bounded, and are run in a thread by async callers.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from vmfork.errors import SourceError, TemplateError, VmforkTimeout
from vmfork.files import write_atomic
from vmfork.lazy.mountlock import exit_lock
from vmfork.lazy.published import MEMORY
from vmfork.private import READONLY_MODE, UMASK, opener
from vmfork.records import TemplateManifest, TemplateWork
from vmfork.spec import MemorySpec
from vmfork.store import Store
from vmfork.tasks import finish_in_thread

log = logging.getLogger("vmfork.lazy")

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
POLL = 0.05


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


def _read_json(path: Path) -> Any:
    """The JSON in *path* (at most :data:`MAX_STATUS` bytes), or None."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_STATUS + 1)
        if len(data) > MAX_STATUS:
            return None
        return json.loads(data)
    except (OSError, ValueError):
        return None


def read_status(tdir: Path) -> LazyStatus | None:
    """The memory status in *tdir* (None: not a pulled template, or no
    readable status yet)."""
    d = _read_json(tdir / STATUS_FILE)
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
    d = _read_json(tdir / SOURCE_FILE)
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


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def _is_server(pid: int, tdir: Path) -> bool:
    """Whether *pid* runs (not a zombie) the FUSE server of *tdir*."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                return False
    except (OSError, IndexError):
        return False
    argv = _cmdline(pid)
    return SERVER_MODULE in argv and str(tdir) in argv


def server_pid(tdir: Path) -> int | None:
    """The pid of the running FUSE server of *tdir* (from ``lazy.json``, or
    ``server.pid`` before the server wrote its status; checked against the
    process's command line), or None."""
    status = read_status(tdir)
    spawned = _read_json(tdir / PID_FILE)
    for pid in (status.pid if status else None,
                spawned.get("pid") if isinstance(spawned, dict) else None):
        if isinstance(pid, int) and not isinstance(pid, bool) and pid > 0 \
                and _is_server(pid, tdir):
            return pid
    return None


def _log_tail(tdir: Path) -> str:
    try:
        with open(tdir / LOG_FILE, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 2000))
            lines = f.read().decode(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(line.strip() for line in lines[-3:])


def spawn_server(tdir: Path) -> subprocess.Popen[bytes]:
    """Start the FUSE server of *tdir*, detached (its own session; its
    output goes to ``server.log``). A thread of this process reaps it if it
    ends while this process lives."""
    with open(tdir / LOG_FILE, "ab", opener=opener) as out:
        proc = subprocess.Popen([sys.executable, "-m", SERVER_MODULE, str(tdir)],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                cwd="/", start_new_session=True, umask=UMASK,
                                close_fds=True)
    threading.Thread(target=proc.wait, name=f"reaper {proc.pid}", daemon=True).start()
    write_atomic(tdir / PID_FILE, json.dumps({"pid": proc.pid}).encode())
    return proc


def wait_mounted(tdir: Path, proc: subprocess.Popen[bytes], memory_size: int,
                 seconds: float) -> str:
    """Wait until the server *proc* of *tdir* serves ``mnt/memory`` of
    *memory_size* bytes; return ``fetching`` (served) or ``complete`` (the
    server completed the memory and ended already: ``memory.cache`` has it).
    SourceError if the server ended otherwise or reports the memory broken;
    VmforkTimeout after *seconds*."""
    end = time.monotonic() + seconds
    mem = served_memory(tdir)
    while True:
        status = read_status(tdir)
        if status is not None and status.state == BROKEN:
            raise SourceError(f"{tdir.name}: the memory cannot be fetched: "
                              f"{status.cause or 'no cause given'}")
        code = proc.poll()
        if code is not None:
            if code == 0 and status is not None and status.state == COMPLETE:
                return COMPLETE
            tail = _log_tail(tdir)
            raise SourceError(f"{tdir.name}: the FUSE server ended (status {code}) before it "
                              f"served the memory" + (f": {tail}" if tail else ""))
        if is_mounted(mount_point(tdir)):
            with contextlib.suppress(OSError):
                if mem.stat().st_size == memory_size:
                    return FETCHING
        if time.monotonic() >= end:
            raise VmforkTimeout("the FUSE server to mount the memory", seconds,
                                _log_tail(tdir))
        time.sleep(POLL)


def start_server(tdir: Path, memory_size: int, seconds: float) -> str:
    """Spawn the server of *tdir* and wait until it serves (see
    :func:`wait_mounted`); on failure it is ended and unmounted again."""
    proc = spawn_server(tdir)
    try:
        return wait_mounted(tdir, proc, memory_size, seconds)
    except BaseException:
        _end(proc.pid, tdir, seconds)
        unmount(mount_point(tdir), seconds)
        raise


def _gone(pid: int, tdir: Path, seconds: float) -> bool:
    end = time.monotonic() + seconds
    while _is_server(pid, tdir):
        if time.monotonic() >= end:
            return False
        time.sleep(POLL)
    return True


def _end(pid: int, tdir: Path, seconds: float) -> None:
    """SIGTERM the server *pid* of *tdir* (it unmounts and exits), then
    SIGKILL, each with *seconds* to take effect."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if not _is_server(pid, tdir):
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        if _gone(pid, tdir, seconds):
            return
        log.warning("%s: the FUSE server (pid %d) did not end on %s", tdir.name, pid,
                    signal.Signals(sig).name)


def unmount(mnt: Path, seconds: float) -> bool:
    """Unmount *mnt* if something is mounted there: ``fusermount3 -u``, then
    ``fusermount3 -uz`` and ``umount -l`` (detached now, gone once unused).
    True if nothing is mounted there any more."""
    tries = (["fusermount3", "-u"], ["fusermount3", "-uz"], ["umount", "-l"])
    for argv in tries:
        if not is_mounted(mnt):
            return True
        if shutil.which(argv[0]) is None:
            continue
        try:
            p = subprocess.run([*argv, str(mnt)], capture_output=True, timeout=seconds,
                               stdin=subprocess.DEVNULL, check=False)
        except subprocess.TimeoutExpired:
            log.warning("%s: %s timed out", mnt, " ".join(argv))
            continue
        if p.returncode != 0:
            log.debug("%s: %s: %s", mnt, " ".join(argv), p.stderr.decode(errors="replace"))
    if is_mounted(mnt):
        log.warning("%s: still mounted; unmount it by hand (fusermount3 -u)", mnt)
        return False
    return True


def discard(tdir: Path, seconds: float) -> None:
    """End the FUSE server of *tdir* and unmount what it served (before the
    directory is removed). Idempotent."""
    pid = server_pid(tdir)
    if pid is not None:
        _end(pid, tdir, seconds)
    unmount(mount_point(tdir), seconds)


def remove_dir(tdir: Path, seconds: float) -> None:
    """:func:`discard`, then remove *tdir*; never follows into a mount
    (a directory still mounted is left, with a warning)."""
    discard(tdir, seconds)
    if is_mounted(mount_point(tdir)):
        log.warning("%s: left in place: %s is still mounted", tdir, mount_point(tdir))
        return
    shutil.rmtree(tdir, ignore_errors=True)


async def undo_pull(store: Store, work: TemplateWork, seconds: float) -> None:
    """Undo a pull that failed, was interrupted, or whose vmfork died: the
    server ended and unmounted, the eager memory file and the directory
    removed (in a thread that a cancellation lets finish), then the
    reservation dropped. The caller holds the template's lock."""
    await finish_in_thread(_remove_pulled, work, seconds)
    store.drop_reservation(work.name)
    log.warning("template %s: pull undone", work.name)


def _remove_pulled(work: TemplateWork, seconds: float) -> None:
    tdir = Path(work.directory) if work.directory else None
    if tdir is not None:
        discard(tdir, seconds)
    if work.memory_file and not (tdir is not None
                                 and Path(work.memory_file).is_relative_to(tdir)):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(work.memory_file)
    if tdir is not None:
        remove_dir(tdir, seconds)


# -- the next command's repair ----------------------------------------------------------
def needs_revival(tdir: Path, manifest: TemplateManifest) -> bool:
    """Whether template *manifest* (in *tdir*) has its memory served by a
    FUSE server that no longer runs. Cheap for a template that was not
    pulled lazily (one string comparison)."""
    if manifest.memory_file != str(served_memory(tdir)):
        return False
    return server_pid(tdir) is None


def use_cache(store: Store, tdir: Path, manifest: TemplateManifest) -> TemplateManifest:
    """Point complete template *manifest* at ``memory.cache`` (read-only
    from now on) instead of the served file; return the new manifest."""
    cache = tdir / CACHE_FILE
    size = cache.stat().st_size
    if size != manifest.memory_size:
        raise SourceError(f"template {manifest.name}: {cache} has {size} bytes, the memory "
                          f"{manifest.memory_size}")
    os.chmod(cache, READONLY_MODE)
    spec = manifest.spec.with_(memory=MemorySpec(backend="file", path=str(cache), share=False,
                                                 readonly=True))
    new = replace(manifest, memory_file=str(cache), spec=spec)
    store.set_template_manifest(new)
    write_atomic(tdir / "manifest.json", new.to_json().encode())
    log.info("template %s: memory complete; clones now map %s", manifest.name, cache)
    return new


@contextlib.contextmanager
def memory_held(store: Store, tdir: Path, manifest: TemplateManifest,
                seconds: float) -> Iterator[TemplateManifest]:
    """Keep the memory of template *manifest* (in *tdir*) where its clones
    can map it while the block runs; yield the manifest to start them from.

    A template whose memory a FUSE server serves: ``mount.lock`` is held
    shared, so a complete server does not unmount meanwhile
    (:func:`vmfork.lazy.mountlock.exit_lock`); a server that already ended
    with the memory complete leaves the template on its cache first; one
    that ended otherwise is a TemplateError naming the state (the next
    template command restarts it). Any other template: as it is."""
    if manifest.memory_file != str(served_memory(tdir)):
        yield manifest
        return
    with exit_lock(tdir, seconds):
        if not is_mounted(mount_point(tdir)):
            status = read_status(tdir)
            if status is None or status.state != COMPLETE:
                why = f": {status.cause}" if status is not None and status.cause else ""
                raise TemplateError(f"template {manifest.name}: its memory server is not "
                                    f"running ({status.state if status else 'no status'}"
                                    f"{why}); 'vmfork template ls' starts it again")
            manifest = use_cache(store, tdir, manifest)
        yield manifest


async def revive(store: Store, tdir: Path, manifest: TemplateManifest, seconds: float) -> str:
    """Repair template *manifest* whose server died or ended (see the
    module docstring); return what was done: ``restarted``, ``complete``
    (now from the cache) or ``broken`` (left so). The caller holds the
    template's lock."""
    await finish_in_thread(unmount, mount_point(tdir), seconds)
    status = read_status(tdir)
    if status is not None and status.state == BROKEN:
        log.warning("template %s: its memory is broken (%s); its FUSE server is gone",
                    manifest.name, status.cause)
        return BROKEN
    if status is None or status.state != COMPLETE:
        log.warning("template %s: its FUSE server is gone; starting it again", manifest.name)
        if await finish_in_thread(start_server, tdir, manifest.memory_size,
                                  seconds) != COMPLETE:
            return "restarted"
    use_cache(store, tdir, manifest)
    return COMPLETE


__all__ = [
    "BITMAP_FILE", "BROKEN", "CACHE_FILE", "COMPLETE", "FETCHING", "LOG_FILE", "MOUNT_DIR",
    "PID_FILE", "PUBLISHED_FILE", "SERVER_MODULE", "SOURCE_FILE", "STATUS_FILE", "TOKEN_FILE",
    "LazyStatus", "discard", "is_mounted", "is_pulled", "mount_point", "needs_revival",
    "pulled_from", "read_status", "remove_dir", "revive", "served_memory", "server_pid",
    "spawn_server", "start_server", "undo_pull", "unmount", "use_cache", "wait_mounted",
    "write_source", "write_status",
]
