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
from dataclasses import replace
from pathlib import Path

from vmfork.errors import SourceError, TemplateError, VmforkTimeout
from vmfork.files import write_atomic
from vmfork.lazy.mountlock import exit_lock
from vmfork.lazy.status import (
    BITMAP_FILE,
    BROKEN,
    CACHE_FILE,
    COMPLETE,
    FETCHING,
    LOG_FILE,
    MOUNT_DIR,
    PID_FILE,
    POLL,
    PUBLISHED_FILE,
    SERVER_MODULE,
    SOURCE_FILE,
    STATUS_FILE,
    TOKEN_FILE,
    LazyStatus,
    is_mounted,
    is_pulled,
    mount_point,
    pulled_from,
    read_json,
    read_status,
    served_memory,
    write_source,
    write_status,
)
from vmfork.private import READONLY_MODE, UMASK, opener
from vmfork.records import TemplateManifest, TemplateWork
from vmfork.spec import MemorySpec
from vmfork.store import Store
from vmfork.tasks import finish_in_thread

log = logging.getLogger("vmfork.lazy")

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
    spawned = read_json(tdir / PID_FILE)
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


def spawn_server(tdir: Path, hold: bool = False) -> subprocess.Popen[bytes]:
    """Start the FUSE server of *tdir*, detached (its own session; its
    output goes to ``server.log``). A thread of this process reaps it if it
    ends while this process lives. *hold*: the server serves reads but
    prefetches nothing until :func:`release` (or this process's end), so
    that the caller's own downloads have the link to themselves."""
    with open(tdir / LOG_FILE, "ab", opener=opener) as out:
        proc = subprocess.Popen([sys.executable, "-m", SERVER_MODULE, str(tdir)],
                                stdin=subprocess.PIPE if hold else subprocess.DEVNULL,
                                stdout=out, stderr=out,
                                cwd="/", start_new_session=True, umask=UMASK,
                                close_fds=True)
    threading.Thread(target=proc.wait, name=f"reaper {proc.pid}", daemon=True).start()
    write_atomic(tdir / PID_FILE, json.dumps({"pid": proc.pid}).encode())
    return proc


def release(proc: subprocess.Popen[bytes]) -> None:
    """Let a server spawned with *hold* prefetch (its stdin ends)."""
    if proc.stdin is not None:
        with contextlib.suppress(OSError):
            proc.stdin.close()


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
    "pulled_from", "read_status", "release", "remove_dir", "revive", "served_memory",
    "server_pid", "spawn_server", "start_server", "undo_pull", "unmount", "use_cache",
    "wait_mounted", "write_source", "write_status",
]
