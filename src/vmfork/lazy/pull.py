"""Pulling a template from another host: ``vmfork template pull``.

Owns :func:`pull`. The source (:class:`~vmfork.lazy.source.Source`) is a
daemon's ``/v1/templates/NAME`` or the base URL of a published directory;
its ``manifest.json`` (:class:`~vmfork.lazy.published.Published`) is
fetched and checked first, before anything is written: a layout this vmfork
reads, a template manifest that is consistent with it (memory size, state
size and sha256, a published file for the kernel, initrd and each disk the
spec names), the QEMU version it was made with equal to the local QEMU's and
its machine type one the local QEMU offers, and room for what it will
write. The manifest never names a program or a path: the template runs the
local :data:`~vmfork.spec.DEFAULT_QEMU`, and every path is rewritten to the
new template's own files.

Then the name is reserved (a catalog row in state ``creating`` with a
:class:`~vmfork.records.TemplateWork` of op ``pull``, under the template's
lock, its directory made ``exist_ok=False``), and the files are fetched
into the template's directory, each checked against its sha256 (one more
try for a file that does not match, then refused): the device state, the
kernel and initrd, the disks (eagerly: each a standalone qcow2 that clones
put their overlays over). The memory:

* **eager**: every chunk that is not all zeros is fetched (runs of chunks
  per request, a few requests at once), checked against its sha256 (a
  mismatch is fetched once more, then refused) and written into a new
  memory file in the memory directory (zero chunks stay holes);
* **lazy**: ``published.json`` and ``source.json`` are written for the FUSE
  server (:mod:`vmfork.lazy.server`), which is started detached and waited
  for until it serves ``mnt/memory`` (:mod:`vmfork.lazy.lifecycle`); the
  clones map that file, whose chunks arrive on first read and in the
  background.

Last, the template is recorded (its manifest, paths rewritten, checked as
any template is before a clone: :func:`vmfork.templates.manifest.check`).
A pull that fails or is interrupted (an error, SIGINT/SIGTERM: the
cancellation stops the fetching threads and waits for them) is undone: the
server ended and unmounted, the memory file and the directory removed, the
reservation dropped; a pull whose vmfork died is undone by the next command
(:func:`vmfork.templates.create.settle_held`). Every file is created 0600
and made 0400 once complete, every directory 0700.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import secrets
import shutil
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import replace
from pathlib import Path
from typing import TypeVar

from vmfork import admission
from vmfork.checkpoints import checkpoint
from vmfork.errors import AlreadyExists, ResourceError, SourceError, StateError, TemplateError
from vmfork.files import sha256_file, write_atomic
from vmfork.lazy import lifecycle, pack
from vmfork.lazy.published import (
    INITRD,
    KERNEL,
    MANIFEST,
    MAX_MANIFEST,
    STATE,
    Published,
    disk_file,
)
from vmfork.lazy.source import Source, read_token_file
from vmfork.private import DIR_MODE, READONLY_MODE, make_dirs, private_dir
from vmfork.proc import process_start_time
from vmfork.qemu import features
from vmfork.records import TEMPLATE_READY, TemplateManifest, TemplateWork
from vmfork.results import PullResult
from vmfork.spec import DEFAULT_QEMU, DiskSpec, MemorySpec
from vmfork.store import Store
from vmfork.tasks import run_to_end
from vmfork.templates import catalog, create
from vmfork.templates import manifest as tmanifest
from vmfork.templates.manifest import disk_record, template_dir
from vmfork.timeouts import DEFAULT, Timeouts

log = logging.getLogger("vmfork.lazy")

T = TypeVar("T")

#: Seconds a source may go without answering (or making progress on a
#: download) before the pull fails: the default of the FUSE server's deadline.
SOURCE_DEADLINE = 30.0
#: Chunks fetched by one range request of an eager pull, and such requests
#: at once.
RUN_CHUNKS = 32
FETCHERS = 4


async def pull(store: Store, url: str, name: str | None = None, *, lazy: bool = True,
               token_file: Path | str | None = None,
               timeouts: Timeouts = DEFAULT) -> PullResult:
    """Pull the template at *url* as template *name* (default: its name at
    the source); see the module docstring. *token_file* holds the source's
    bearer token. Returns once the template is usable."""
    t0 = time.monotonic()
    token = read_token_file(token_file) if token_file is not None else None
    with Source(url, token) as src:
        if name is not None:
            _check_free(store, name)
        raw = await _fetching(src, src.get, MANIFEST, time.monotonic() + SOURCE_DEADLINE,
                              MAX_MANIFEST)
        published = Published.from_json(raw)
        name = name if name is not None else src.daemon_name or published.name
        _check_free(store, name)
        await _check_qemu(store, published, timeouts)
        _check_consistent(published)
        t_manifest = time.monotonic() - t0
        async with _reserved(store, name, url, timeouts) as work:
            tdir = Path(work.directory)
            fetched = len(raw)
            # A lazy pull's memory server starts first: it mounts, and
            # fetches the working set, while the other files arrive.
            server = _start_serving(src, published, tdir, url, token) if lazy else None
            try:
                fetched += await _fetching(src, _fetch_files, src, published, tdir, lazy,
                                           store.memory_dir, store.images_dir)
            finally:
                if server is not None:
                    lifecycle.release(server)
            await checkpoint("pull.files")
            if server is not None:
                memory, state = await _served(src, server, published, tdir, timeouts)
            else:
                memory = _memory_path(store, name)
                _record(store, work, memory_file=str(memory))
                fetched += await _fetching(src, _fetch_memory, src, published, memory)
                os.chmod(memory, READONLY_MODE)
                state = lifecycle.COMPLETE
                _write_complete(tdir, published)
                lifecycle.write_source(tdir, src.base, url, None)
            await checkpoint("pull.memory")
            manifest = _local_manifest(published, name, tdir, memory, url)
            await asyncio.to_thread(tmanifest.check, manifest, None, timeouts, store.cache_dir)
            write_atomic(tdir / "manifest.json", manifest.to_json().encode())
            store.finish_template(manifest, None)
    nonzero = sum(1 for c in published.chunks if c is not None) * published.chunk_size
    result = PullResult(name=name, source=url, mode="lazy" if lazy else "eager", state=state,
                        memory_file=str(memory), memory_mib=published.memory_size >> 20,
                        memory_bytes=min(nonzero, published.memory_size),
                        fetched_bytes=fetched, disks=len(manifest.spec.disks),
                        seconds=time.monotonic() - t0, manifest_seconds=t_manifest)
    log.info("template %s: pulled from %s (%s, memory %s) in %.2f s", name, url,
             result.mode, state, result.seconds)
    return result


# -- checks before anything is written ------------------------------------------------
def _check_free(store: Store, name: str) -> None:
    """Refuse at once a name that is invalid or taken by a ready template
    (one being made or removed is settled, or refused, when reserved)."""
    store.check_new_name(name, "template")
    found = store.template_work(name)
    if found is not None and found[0] == TEMPLATE_READY:
        raise AlreadyExists(f"a template named {name!r} exists already")


async def _check_qemu(store: Store, published: Published, timeouts: Timeouts) -> None:
    """The template was made with the local QEMU's version, on a machine
    type it offers (TemplateError otherwise)."""
    t = published.template
    feats = await features.of_binary(DEFAULT_QEMU, features.FeatureCache(store.cache_dir),
                                     timeouts=timeouts)
    if feats.version != t.qemu_version:
        raise TemplateError(f"template {published.name} was made with QEMU {t.qemu_version}, "
                            f"this QEMU is {feats.version}")
    if t.machine not in feats.machines:
        raise TemplateError(f"template {published.name}: its machine type {t.machine!r} is "
                            f"not one that the local QEMU {feats.version} offers")


def _check_consistent(published: Published) -> None:
    """The published files and the template manifest agree (TemplateError)."""
    t = published.template
    why = None
    state = published.files[STATE]
    if published.memory_size != t.memory_size or t.memory_size != t.spec.memory_mib << 20:
        why = "its memory size differs between the layout, the manifest and the spec"
    elif (state.size, state.sha256) != (t.state_size, t.state_sha256):
        why = "its state file differs from the template manifest's"
    elif t.spec.kernel and KERNEL not in published.files:
        why = "its spec boots a kernel that is not published"
    elif t.spec.initrd and INITRD not in published.files:
        why = "its spec boots an initrd that is not published"
    else:
        missing = [i for i in range(len(t.spec.disks)) if disk_file(i) not in published.files]
        if missing:
            why = f"its disk {missing[0]} is not published"
    if why is not None:
        raise TemplateError(f"published template {published.name}: {why}")


def _check_room(published: Published, tdir: Path, lazy: bool, memory_dir: Path) -> None:
    """What the pull writes fits: the files (and, lazy, the memory's cache)
    in the template's file system, the memory (eager) in the memory
    directory and in MemAvailable. ResourceError otherwise."""
    nonzero = sum(1 for c in published.chunks if c is not None) * published.chunk_size
    files = sum(f.size for f in published.files.values())
    need: dict[int, tuple[int, Path]] = {}
    places = [(tdir, files + (nonzero if lazy else 0))]
    if not lazy:
        places.append((memory_dir, nonzero))
    for where, size in places:
        dev = os.stat(where).st_dev
        have = need.get(dev, (0, where))[0]
        need[dev] = (have + size, where)
    for n, where in need.values():
        free = admission.free_space(where)
        if n > free:
            raise ResourceError(f"template {published.name}: the pull needs {n >> 20} MiB in "
                                f"{where}, which has {free >> 20} MiB free")
    if not lazy:
        admission.check_memory(published.name, nonzero, memory_dir,
                               purpose="template memory")


# -- the reservation ----------------------------------------------------------------------
@contextlib.asynccontextmanager
async def _reserved(store: Store, name: str, url: str,
                    timeouts: Timeouts) -> AsyncIterator[TemplateWork]:
    """Reserve template *name* for a pull from *url* and make its
    directory; undo the pull if the block fails or is cancelled."""
    async with catalog.locked(store, name):
        if store.has_template(name):
            await create.settle_held(store, name, timeouts)
        if store.has_template(name):
            raise store.template_conflict(name)
        tdir = template_dir(store, name)
        work = TemplateWork(name=name, op="pull", pid=os.getpid(),
                            pid_start=process_start_time(os.getpid()), started=time.time(),
                            directory=str(tdir), imported_from=url)
        store.reserve_template(work)
        try:
            make_dirs(store.templates_dir)
            try:
                tdir.mkdir(mode=DIR_MODE)
            except FileExistsError:
                store.set_template_work(replace(work, directory=""))  # not ours to remove
                raise StateError(f"template directory {tdir} exists but no template owns "
                                 "it (left by an earlier vmfork?); remove it") from None
            await checkpoint("pull.reserved")
            yield work
        except BaseException:
            try:
                await run_to_end(_undo(store, name, timeouts.stop))
            except Exception as exc:  # the next command retries; report the cause
                log.warning("template %s: cleaning up after a failed pull failed: %s",
                            name, exc)
            raise


def _record(store: Store, work: TemplateWork, **changes: object) -> TemplateWork:
    """Record a step of the pull in its reservation (before taking it)."""
    work = replace(work, **changes)  # type: ignore[arg-type]
    store.set_template_work(work)
    return work


async def _undo(store: Store, name: str, seconds: float) -> None:
    """Undo the pull of *name* as its reservation records it now."""
    found = store.template_work(name)
    if found is not None and found[0] == "creating" and found[1] is not None \
            and found[1].op == "pull":
        await lifecycle.undo_pull(store, found[1], seconds)


async def _fetching(src: Source, fn: Callable[..., T], *args: object) -> T:
    """Run *fn* in a thread; if the caller is cancelled, stop the source's
    requests and wait for the thread to end before the cancellation goes on
    (the undo must not race with a thread still writing)."""
    task = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        src.cancel()
        while not task.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait({task})
        if not task.cancelled():
            task.exception()  # retrieved: the cancellation is what matters
        raise


# -- files ---------------------------------------------------------------------------------
def _fetch_files(src: Source, published: Published, tdir: Path, lazy: bool,
                 memory_dir: Path, images_dir: Path) -> int:
    """Fetch every whole file of the layout into *tdir* (each checked,
    made read-only); return the bytes fetched. A kernel or initrd that this
    host's images have already (same size and sha256) is copied from there."""
    if not lazy:
        private_dir(memory_dir, "memory dir")
    _check_room(published, tdir, lazy, memory_dir)
    total = 0
    order = [STATE, *sorted(k for k in published.files if k != STATE)]
    for key in order:
        f = published.files[key]
        if key in (KERNEL, INITRD) and _copy_local(images_dir, f.size, f.sha256, tdir / key):
            continue
        total += _fetch_file(src, key, f.size, f.sha256, tdir / key)
    return total


def _copy_local(images_dir: Path, size: int, sha256: str, dest: Path) -> bool:
    """Copy to *dest* (0400) a file of this host's images (``IMAGE/FILE``)
    of *size* bytes whose sha256 is *sha256*; whether one was found. A
    template's boot files are a kernel and an initrd that every host of a
    fleet usually has."""
    try:
        images = sorted(p for p in images_dir.iterdir() if p.is_dir())
    except OSError:
        return False
    for image in images:
        with contextlib.suppress(OSError):
            for cand in sorted(image.iterdir()):
                if (cand.is_symlink() or not cand.is_file() or cand.stat().st_size != size
                        or sha256_file(cand) != sha256):
                    continue
                try:
                    shutil.copyfile(cand, dest)
                    if sha256_file(dest) != sha256:  # changed while copied
                        raise OSError(f"{cand} changed")
                    os.chmod(dest, READONLY_MODE)
                except BaseException:
                    with contextlib.suppress(FileNotFoundError):
                        dest.unlink()
                    raise
                log.info("%s: copied from %s (same sha256)", dest.name, cand)
                return True
    return False


def _fetch_file(src: Source, key: str, size: int, sha256: str, dest: Path) -> int:
    """Download *key* to *dest* (a new file, 0600, then 0400); a file whose
    sha256 does not match is fetched once more, then refused."""
    fetched = 0
    for attempt in (1, 2):
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        ok = False
        try:
            with os.fdopen(fd, "wb") as out:
                digest = src.download(key, out, size, SOURCE_DEADLINE)
            fetched += size
            ok = digest == sha256
        finally:
            if not ok:
                with contextlib.suppress(FileNotFoundError):
                    dest.unlink()
        if ok:
            os.chmod(dest, READONLY_MODE)
            return fetched
        log.warning("%s: sha256 differs from the manifest (try %d)", src.file_url(key),
                    attempt)
    raise SourceError(f"{src.file_url(key)}: its sha256 differs from the manifest's (fetched "
                      "twice); refusing it")


# -- memory --------------------------------------------------------------------------------
def _memory_path(store: Store, name: str) -> Path:
    return store.memory_dir / f"tpl-{name}-{secrets.token_hex(4)}.mem"


def _runs(chunks: tuple[str | None, ...], limit: int) -> list[tuple[int, int]]:
    """(first chunk, count) of each run of non-zero chunks, at most *limit* long."""
    runs: list[tuple[int, int]] = []
    first = None
    for i, c in enumerate((*chunks, None)):
        if c is not None and first is None:
            first = i
        if first is not None and (c is None or i - first == limit):
            runs.append((first, i - first))
            first = i if c is not None else None
    return runs


def _fetch_memory(src: Source, published: Published, path: Path) -> int:
    """Fetch every non-zero chunk into the new memory file *path* (zero
    chunks stay holes); return the bytes fetched."""
    size, cs = published.memory_size, published.chunk_size
    mem = published.memory
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    failed = threading.Event()
    fetched = 0
    lock = threading.Lock()

    source, starts = pack.source(mem)

    def fetch(first: int, count: int) -> None:
        nonlocal fetched
        if failed.is_set():
            return
        parts, got = pack.fetch_run(src, mem, first, count,
                                    time.monotonic() + SOURCE_DEADLINE, starts)
        for i, piece in enumerate(parts, first):
            if hashlib.sha256(piece).hexdigest() != published.chunks[i]:
                again, more = pack.fetch_run(src, mem, i, 1,
                                             time.monotonic() + SOURCE_DEADLINE, starts)
                piece = again[0]
                got += more
                if hashlib.sha256(piece).hexdigest() != published.chunks[i]:
                    raise SourceError(f"{src.file_url(source)}: chunk {i} (memory bytes "
                                      f"{i * cs}-{i * cs + len(piece) - 1}) does not match "
                                      "its sha256 in the manifest (fetched twice); refusing it")
            _pwrite_all(fd, piece, i * cs)
        with lock:
            fetched += got

    try:
        os.ftruncate(fd, size)
        with ThreadPoolExecutor(FETCHERS, thread_name_prefix="vmfork-pull") as pool:
            futures = [pool.submit(fetch, f, n) for f, n in _runs(published.chunks,
                                                                   RUN_CHUNKS)]
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            for f in done:
                exc = f.exception()
                if exc is not None:
                    failed.set()
                    src.cancel()  # the other requests end soon; this error is the one
                    for other in futures:
                        other.cancel()
                    raise exc
    finally:
        os.close(fd)
    return fetched


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _write_complete(tdir: Path, published: Published) -> None:
    """``lazy.json`` of an eager pull: complete from the start."""
    now = time.time()
    n = len(published.chunks)
    lifecycle.write_status(tdir, lifecycle.LazyStatus(
        state=lifecycle.COMPLETE, fetched_bytes=sum(
            1 for c in published.chunks if c is not None) * published.chunk_size,
        local_bytes=published.memory_size, total_bytes=published.memory_size,
        chunks_total=n, chunks_local=n, started=now, completed=now))


def _start_serving(src: Source, published: Published, tdir: Path, url: str,
                   token: str | None) -> subprocess.Popen[bytes]:
    """Start the FUSE server of a lazy pull (detached; the pull's undo ends
    it through its pid file)."""
    write_atomic(tdir / lifecycle.PUBLISHED_FILE, published.to_json())
    lifecycle.write_source(tdir, src.base, url, token)
    lifecycle.mount_point(tdir).mkdir(mode=DIR_MODE)
    return lifecycle.spawn_server(tdir, hold=True)


async def _served(src: Source, server: subprocess.Popen[bytes], published: Published,
                  tdir: Path, timeouts: Timeouts) -> tuple[Path, str]:
    """Wait until the FUSE server of a lazy pull serves the memory; return
    the memory file clones map and the memory's state."""
    state = await _fetching(src, lifecycle.wait_mounted, tdir, server, published.memory_size,
                            timeouts.start)
    await checkpoint("pull.mounted")
    if state == lifecycle.COMPLETE:
        cache = tdir / lifecycle.CACHE_FILE
        os.chmod(cache, READONLY_MODE)
        return cache, state
    return lifecycle.served_memory(tdir), state


# -- the local template --------------------------------------------------------------------
def _local_manifest(published: Published, name: str, tdir: Path, memory: Path,
                    url: str) -> TemplateManifest:
    """The published template as template *name* of this host: its own
    files, the local QEMU, no parent (that template is not here)."""
    t = published.template
    disks: list[DiskSpec] = []
    for i, d in enumerate(t.spec.disks):
        path = str(tdir / disk_file(i))
        disks.append(DiskSpec(path=path, format="qcow2",
                              readonly=d.readonly and d.backing is None))
    entries = tuple(disk_record(Path(d.path), i, None) for i, d in enumerate(disks))
    spec = t.spec.with_(
        name=name, qemu=DEFAULT_QEMU, disks=tuple(disks),
        kernel=str(tdir / KERNEL) if t.spec.kernel else None,
        initrd=str(tdir / INITRD) if t.spec.initrd else None,
        memory=MemorySpec(backend="file", path=str(memory), share=False, readonly=True))
    return replace(t, name=name, created=time.time(), parent=None, memory_file=str(memory),
                   state_file=str(tdir / STATE), qemu=DEFAULT_QEMU, spec=spec, disks=entries,
                   imported_from=url, fork_of=None)


__all__ = ["SOURCE_DEADLINE", "pull"]
