"""Publishing a template: the files a daemon serves and ``template publish`` writes.

Owns :func:`layout` — a template's published layout (:mod:`vmfork.lazy.published`):
its ``manifest.json`` and where each of its files is on this host — and
:func:`publish_to_dir`, which copies that layout into a directory that any
static HTTP server with Range support (or an object store) can serve.

The memory, the device state and the kernel/initrd are served from the
template's own files. What has to be made lives in ``published/`` of the
template's directory (0700; removed with the template):

* ``disk{i}.qcow2``: each disk of the template's spec flattened into one
  standalone qcow2 image (``qemu-img convert``: overlay and the images under
  it, or a read-only image as it is), remade when its source changes;
* ``memory.zst`` and ``chunks.json``: the memory compressed chunk by chunk
  (:mod:`vmfork.lazy.pack`), the sha256 of each chunk and its length in the
  pack (a 512 MiB memory takes about a second), kept while the memory file
  and the pack are the same (device, inode, size, mtime);
* ``sums.json``: the sha256 of each other whole file, kept the same way;
* ``manifest.json`` and ``manifest.key``: the manifest, and the fingerprint
  of what it was built from (the template's manifest, its files' identities,
  its working set). It is rebuilt when that changes — once after the
  template's first clone has recorded its working set
  (:mod:`vmfork.lazy.working_set`).

:func:`layout` is cheap once built (a few stats; the last answer is kept in
memory per template), so the daemon calls it for every file request. Builds
of one template are serialised by a lock file (``published/.lock``), across
processes and threads.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from vmfork.errors import InvalidInput, StateError, TemplateError
from vmfork.files import read_json, sha256_file, write_atomic
from vmfork.fork.pages import sparse_copy
from vmfork.lazy import pack, working_set
from vmfork.lazy.published import (
    CHUNK_SIZE,
    INITRD,
    KERNEL,
    MANIFEST,
    MEMORY,
    MEMORY_PACK,
    STATE,
    Published,
    PublishedFile,
    disk_file,
)
from vmfork.locking import held
from vmfork.names import check_name
from vmfork.private import UMASK, make_dirs
from vmfork.records import TemplateManifest
from vmfork.results import PublishResult
from vmfork.store import Store
from vmfork.templates.manifest import template_dir
from vmfork.timeouts import DEFAULT, Timeouts

log = logging.getLogger("vmfork.lazy.publish")

#: The directory of a template's published layout, in its template directory.
PUBLISHED = "published"
_CHUNKS = "chunks.json"
_SUMS = "sums.json"
_DISKS = "disks.json"
_KEY = "manifest.key"
_LOCK = ".lock"
#: Largest cache file read back (chunks.json of a 64 GiB memory is ~18 MB).
_MAX_CACHE = 64 << 20
#: Templates whose last layout is kept in memory.
_MEMO_SIZE = 32

Layout = tuple[Published, dict[str, Path]]
_memo: dict[str, tuple[str, Published, dict[str, Path]]] = {}
_memo_lock = threading.Lock()


def layout(store: Store, name: str, timeouts: Timeouts = DEFAULT) -> Layout:
    """The published layout of template *name*: its manifest, and the path
    on this host of each file of the layout by its name (``manifest.json``
    included). Built (or rebuilt) on first use after the template changed."""
    manifest = store.get_template(check_name(name, "template"))
    return layout_of(manifest, template_dir(store, manifest.name), timeouts)


def layout_of(manifest: TemplateManifest, tdir: Path, timeouts: Timeouts = DEFAULT) -> Layout:
    """:func:`layout` of the template of *manifest*, whose directory is
    *tdir* (no catalog access: safe in a worker thread)."""
    key = _fingerprint(manifest, tdir)
    memo_key = str(tdir)
    pdir = tdir / PUBLISHED
    with _memo_lock:
        hit = _memo.get(memo_key)
    # The memo holds while the fingerprint and the built files are the same.
    if (hit and hit[0] and hit[0] == _memo_id(key, pdir)
            and all(p.exists() for p in hit[2].values())):
        return hit[1], dict(hit[2])
    make_dirs(pdir)
    with held(pdir / _LOCK, timeouts.lock,
              f"template {manifest.name}: another vmfork builds its published layout"):
        found = _load(manifest, tdir, key)
        if found is None:
            t0 = time.monotonic()
            found = _build(manifest, tdir, key, timeouts)
            log.info("template %s: published layout built in %.2f s", manifest.name,
                     time.monotonic() - t0)
        memo_id = _memo_id(key, pdir)
    with _memo_lock:
        _memo.pop(memo_key, None)
        _memo[memo_key] = (memo_id, found[0], dict(found[1]))
        while len(_memo) > _MEMO_SIZE:
            _memo.pop(next(iter(_memo)))
    return found


# -- identities and the fingerprint ---------------------------------------------
def _memo_id(key: str, pdir: Path) -> str:
    """*key* and the identity of the built manifest and its key file."""
    try:
        return json.dumps([key, _ident(pdir / MANIFEST), _ident(pdir / _KEY)])
    except FileNotFoundError:
        return ""


def _ident(path: Path | str) -> list[int]:
    """Device, inode, size and mtime of *path*: the same file, unchanged."""
    st = os.stat(path)
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns]


def _ident_or_none(path: Path) -> list[int] | None:
    try:
        return _ident(path)
    except FileNotFoundError:
        return None


def _whole_files(manifest: TemplateManifest) -> dict[str, Path]:
    """The layout's files served as they are: state, kernel, initrd."""
    files = {STATE: manifest.state_path}
    if manifest.spec.kernel:
        files[KERNEL] = Path(manifest.spec.kernel)
    if manifest.spec.initrd:
        files[INITRD] = Path(manifest.spec.initrd)
    return files


def _disk_sources(manifest: TemplateManifest) -> dict[int, list[Any]]:
    """What each flattened disk is made from: its image and the one under it."""
    out: dict[int, list[Any]] = {}
    for i, d in enumerate(manifest.spec.disks):
        out[i] = [d.path, d.format, _ident(d.path),
                  d.backing, _ident(d.backing) if d.backing else None]
    return out


def _fingerprint(manifest: TemplateManifest, tdir: Path) -> str:
    """What a layout is built from: the template's manifest, the identity of
    each of its files and of its working set's."""
    try:
        parts: dict[str, Any] = {
            "manifest": manifest.to_dict(),
            "memory": _ident(manifest.memory_path),
            "files": {k: _ident(p) for k, p in _whole_files(manifest).items()},
            "disks": _disk_sources(manifest),
            "working_set": _ident_or_none(tdir / working_set.FILE),
        }
    except FileNotFoundError as exc:
        raise TemplateError(f"template {manifest.name}: {exc.filename} is missing") from None
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


# -- the cache ----------------------------------------------------------------------
def _read_json(path: Path) -> Any:
    """The JSON in *path* (None if missing, too large or unreadable)."""
    return read_json(path, _MAX_CACHE)


def _paths(manifest: TemplateManifest, tdir: Path) -> dict[str, Path]:
    pdir = tdir / PUBLISHED
    paths = {MANIFEST: pdir / MANIFEST, MEMORY: manifest.memory_path,
             MEMORY_PACK: pdir / MEMORY_PACK, **_whole_files(manifest)}
    for i in range(len(manifest.spec.disks)):
        paths[disk_file(i)] = pdir / disk_file(i)
    return paths


def _load(manifest: TemplateManifest, tdir: Path, key: str) -> Layout | None:
    """The layout built before from the same fingerprint *key*, if it is whole."""
    pdir = tdir / PUBLISHED
    try:
        if (pdir / _KEY).read_text().strip() != key:
            return None
        published = Published.from_json((pdir / MANIFEST).read_bytes())
    except (OSError, TemplateError):
        return None
    paths = _paths(manifest, tdir)
    if not all(p.exists() for p in paths.values()):
        return None
    return published, paths


def _chunks(memory: Path, pdir: Path) -> tuple[tuple[str | None, ...], tuple[int, ...]]:
    """The chunk sha256s of *memory* and the length of each chunk in its
    pack ``memory.zst``; from ``chunks.json`` while the memory and the pack
    are the same files, else made afresh (one read of the memory)."""
    ident = _ident(memory)
    pack_path = pdir / MEMORY_PACK
    cached = _read_json(pdir / _CHUNKS)
    n = -(-ident[2] // CHUNK_SIZE)
    if (isinstance(cached, dict) and cached.get("id") == ident
            and cached.get("chunk_size") == CHUNK_SIZE
            and cached.get("pack") == _ident_or_none(pack_path)
            and isinstance(cached.get("chunks"), list) and len(cached["chunks"]) == n
            and isinstance(cached.get("packed"), list) and len(cached["packed"]) == n):
        return tuple(cached["chunks"]), tuple(cached["packed"])
    tmp = pdir / f".{MEMORY_PACK}.tmp"
    tmp.unlink(missing_ok=True)
    try:
        chunks, packed = pack.build(memory, CHUNK_SIZE, tmp)
        os.replace(tmp, pack_path)
    finally:
        tmp.unlink(missing_ok=True)
    write_atomic(pdir / _CHUNKS, json.dumps({
        "id": ident, "chunk_size": CHUNK_SIZE, "pack": _ident(pack_path),
        "chunks": list(chunks), "packed": list(packed)}).encode())
    return chunks, packed


def _flatten(manifest: TemplateManifest, pdir: Path, timeouts: Timeouts) -> None:
    """Make ``disk{i}.qcow2`` of each disk whose source changed since it was made."""
    sources = _disk_sources(manifest)
    cached = _read_json(pdir / _DISKS)
    made: dict[str, Any] = cached if isinstance(cached, dict) else {}
    for i, d in enumerate(manifest.spec.disks):
        dst = pdir / disk_file(i)
        if made.get(str(i)) == sources[i] and dst.exists():
            continue
        tmp = pdir / f".{dst.name}.tmp"
        argv = ["qemu-img", "convert", "-U", "-q", "-f", d.format, "-O", "qcow2", d.path,
                str(tmp)]
        try:
            p = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                               umask=UMASK, timeout=timeouts.ram_copy)
            if p.returncode != 0:
                raise TemplateError(f"template {manifest.name}: cannot flatten disk {i} "
                                    f"({d.path}): {' '.join((p.stderr or p.stdout).split())}")
            os.replace(tmp, dst)
        except subprocess.TimeoutExpired:
            raise TemplateError(f"template {manifest.name}: flattening disk {i} took more "
                                f"than {timeouts.ram_copy:g} s") from None
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        made[str(i)] = sources[i]
        write_atomic(pdir / _DISKS, json.dumps(made).encode())


def _sums(paths: dict[str, Path], pdir: Path) -> dict[str, PublishedFile]:
    """Size and sha256 of each file of *paths*, from ``sums.json`` while it
    is the same file."""
    cached = _read_json(pdir / _SUMS)
    sums: dict[str, Any] = cached if isinstance(cached, dict) else {}
    out: dict[str, PublishedFile] = {}
    changed = False
    for name, path in paths.items():
        ident = _ident(path)
        entry = sums.get(str(path))
        if not (isinstance(entry, dict) and entry.get("id") == ident
                and isinstance(entry.get("sha256"), str)):
            entry = {"id": ident, "sha256": sha256_file(path)}
            sums[str(path)] = entry
            changed = True
        out[name] = PublishedFile(ident[2], entry["sha256"])
    if changed:
        write_atomic(pdir / _SUMS, json.dumps(sums).encode())
    return out


def _build(manifest: TemplateManifest, tdir: Path, key: str, timeouts: Timeouts) -> Layout:
    pdir = tdir / PUBLISHED
    memory = manifest.memory_path
    try:
        if memory.stat().st_size != manifest.memory_size:
            raise TemplateError(f"template {manifest.name}: memory file {memory} was resized")
        chunks, packed = _chunks(memory, pdir)
        _flatten(manifest, pdir, timeouts)
        paths = _paths(manifest, tdir)
        whole = {k: p for k, p in paths.items() if k not in (MANIFEST, MEMORY, MEMORY_PACK)}
        files = _sums(whole, pdir)
    except FileNotFoundError as exc:
        raise TemplateError(f"template {manifest.name}: {exc.filename} is missing") from None
    ws = tuple(i for i in working_set.read(tdir) if i < len(chunks) and chunks[i] is not None)
    published = Published(name=manifest.name, template=manifest, files=files,
                          memory_size=manifest.memory_size, chunk_size=CHUNK_SIZE,
                          chunks=chunks, working_set=ws, packed=packed)
    write_atomic(pdir / MANIFEST, published.to_json())
    write_atomic(pdir / _KEY, key.encode())
    return published, paths


# -- a published directory ------------------------------------------------------------
def publish_to_dir(store: Store, name: str, directory: Path | str,
                   timeouts: Timeouts = DEFAULT) -> PublishResult:
    """Write the published layout of template *name* into *directory*
    (:func:`write_layout`)."""
    manifest = store.get_template(check_name(name, "template"))
    return write_layout(manifest, template_dir(store, manifest.name), directory, timeouts)


def write_layout(manifest: TemplateManifest, tdir: Path, directory: Path | str,
                 timeouts: Timeouts = DEFAULT,
                 stop: threading.Event | None = None) -> PublishResult:
    """Write the published layout of the template of *manifest* (directory
    *tdir*) into *directory* (made 0700 if missing; an existing one must be
    empty). Files are 0600 and the memory keeps its holes; ``manifest.json``
    is written last, so a directory with it is complete. On failure, or
    when *stop* is set (checked between blocks), what was written is removed
    (StateError for a stop)."""
    t0 = time.monotonic()
    published, paths = layout_of(manifest, tdir, timeouts)
    out = Path(directory)
    made = not os.path.lexists(out)
    if not made:
        if out.is_symlink() or not out.is_dir():
            raise InvalidInput(f"{str(out)!r} is not a directory")
        if any(out.iterdir()):
            raise InvalidInput(f"directory {str(out)!r} is not empty")
    else:
        try:
            make_dirs(out)
        except OSError as exc:
            raise InvalidInput(f"cannot create {str(out)!r}: {exc.strerror}") from None
    written: list[Path] = []
    total = 0
    try:
        for fname in sorted(paths, key=lambda f: f == MANIFEST):
            if stop is not None and stop.is_set():
                raise StateError(f"publishing template {manifest.name} was stopped")
            dst = out / fname
            written.append(dst)
            total += sparse_copy(paths[fname], dst, stop, sync=True)
    except BaseException as exc:
        for p in written:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        if made:
            shutil.rmtree(out, ignore_errors=True)
        if isinstance(exc, OSError):
            raise TemplateError(f"template {manifest.name}: publishing to {out} failed: "
                                f"{exc.strerror or exc}") from None
        raise
    size = sum(os.stat(out / f).st_size for f in paths)
    log.info("template %s: published to %s (%d MiB of data)", manifest.name, out, total >> 20)
    return PublishResult(name=published.name, directory=str(out.resolve()),
                         files=tuple(sorted(paths)), size=size, data=total,
                         memory_size=published.memory_size,
                         chunks=len(published.chunks),
                         zero_chunks=sum(c is None for c in published.chunks),
                         working_set=len(published.working_set),
                         seconds=time.monotonic() - t0)


__all__ = ["PUBLISHED", "Layout", "layout", "layout_of", "publish_to_dir",
           "write_layout"]
