"""Bring a portable snapshot file back: as a running (or paused) VM with
:func:`import_`, or as a template with :func:`import_template`.

Owns the import side of the file format of :mod:`vmfork.snapshots.export`:
every sha256 is checked before anything is started, the kernel and initrd are
extracted next to the VM (or into the template's directory), and the RAM and
device state are loaded from the file's ``mapped-ram`` stream into a fresh
QEMU on a new memory file (``file:F,offset=N``). The new VM gets a new
vmgenid, so the guest knows it is a copy.

A snapshot file is untrusted input. Before anything is written the header
passes its strict schema and layout (:func:`~vmfork.snapshots.export.read_header`),
its machine type must be one the local QEMU offers (:func:`check_machine`),
what it will write must fit in the target directories (:func:`check_space`),
and every sha256 must match. The file never names a program: the import runs
:data:`~vmfork.spec.DEFAULT_QEMU`, whatever binary the header names. It never
names a path either: the VM's name, directories and memory file are the
importer's, and the blobs are written only as ``kernel`` and ``initrd`` inside
the target directory (:func:`extract_blobs`: ``O_EXCL|O_NOFOLLOW`` relative to
the opened directory, hashed again while copied). Every refusal is
:class:`~vmfork.errors.BadSnapshotFile` (exit status 2), and a failed import
leaves nothing behind: no catalog row, VM or template directory, memory file.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import secrets
import time
import uuid
from collections.abc import Collection
from pathlib import Path
from typing import BinaryIO

from vmfork import admission, checkpoints, vm
from vmfork.errors import AlreadyExists, BadSnapshotFile, InvalidInput
from vmfork.launch import Launch, NewVM, undo_all_abandoned
from vmfork.names import internal
from vmfork.private import make_dirs, private_dir
from vmfork.qemu import features, migration
from vmfork.records import TemplateManifest, VMInfo, VMRecord
from vmfork.results import ImportResult
from vmfork.snapshots.export import BLOB_NAMES, Header, check_export, read_header
from vmfork.snapshots.save import load_incoming, sync_guest_clock
from vmfork.spec import DEFAULT_QEMU, MIB, MemorySpec, VMSpec
from vmfork.store import Store
from vmfork.tasks import finish_in_thread
from vmfork.templates import create
from vmfork.timeouts import DEFAULT, Timeouts

log = logging.getLogger("vmfork.snapshot")


async def import_(store: Store, file: Path | str, name: str, persistent: bool = False,
                  memory_dir: Path | str | None = None, resume: bool = True,
                  files_dir: Path | None = None,
                  timeouts: Timeouts = DEFAULT) -> ImportResult:
    """Bring an export file back as VM *name*, on a new memory file, running
    (or paused with ``resume=False``). Every sha256 is checked first. The
    kernel and initrd go to *files_dir* (default: the VM's own directory)."""
    t0 = time.monotonic()
    src = Path(file).absolute()
    store.check_new_name(name)
    await undo_all_abandoned(store, timeouts)
    header = read_header(src)
    if store.has_vm(name):
        raise AlreadyExists(f"a VM named {name!r} exists already")
    if memory_dir:
        mdir = Path(memory_dir).absolute()
    else:
        mdir = store.home / "memory" if persistent else store.memory_dir
    private_dir(mdir, "memory dir")  # UnsafePath before anything is made
    if persistent and not vm.is_persistent_dir(mdir):
        raise InvalidInput(f"--persistent needs a memory dir on disk; {str(mdir)!r} is on "
                           f"{vm.filesystem_type(mdir)}")
    vdir = files_dir or store.vm_dir(name)
    qemu = DEFAULT_QEMU
    feats = await features.of_binary(qemu, features.FeatureCache(store.cache_dir),
                                     timeouts=timeouts)
    check_machine(src, header, feats.machines, feats.version)
    check_space(src, header, vdir, mdir)
    await asyncio.to_thread(check_export, src, header)
    t_checked = time.monotonic()
    spec = import_spec(header, name, vdir, vm.memory_file_path(mdir, name), qemu)
    admission.check_new_vm(name, spec.memory_mib, mdir)
    rec = VMRecord(name=name, spec=spec, state="starting",
                   info=VMInfo(owns_memory=True, imported_from=str(src)))
    async with Launch(store, NewVM(store, rec), spec, timeouts=timeouts) as launch:
        with store.lock(name, wait=False):
            make_dirs(vdir)
            await finish_in_thread(extract_blobs, src, header, vdir)
            await checkpoints.checkpoint("import.extracted")
            m = await launch.spawn(incoming=("defer",))
            await checkpoints.checkpoint("import.spawned")
            t_spawned = time.monotonic()
            await load_incoming(m, f"file:{src},offset={header.ram.offset}",
                                timeouts.ram_copy, {}, x_ignore_shared=False, mapped_ram=True)
            t_loaded = time.monotonic()
            await migration.set_capabilities(m, mapped_ram=False)
            if resume:
                await m.resume()
            rec.state = "running" if resume else "paused"
            store.update_vm(rec)
            await m.disconnect()
    clock = await sync_guest_clock(store, rec, timeouts) if resume else False
    log.info("%s: imported from %s", name, src)
    return ImportResult(name=name, state=rec.state, pid=rec.pid, file=str(src),
                        memory_file=spec.memory.path, memory_mib=spec.memory_mib,
                        seconds=time.monotonic() - t0, check_seconds=t_checked - t0,
                        load_seconds=t_loaded - t_spawned, clock_synced=clock)


def import_spec(header: Header, name: str, files_dir: Path, memory_file: Path | str,
                qemu: str = DEFAULT_QEMU) -> VMSpec:
    """The spec of a VM imported from *header*: the exported VM's memory size,
    CPUs, kernel command line, network and flags (all checked by VMSpec), with
    the importer's own name, QEMU binary, kernel and initrd paths (in
    *files_dir*), memory file and a new vmgenid. Nothing the header names as a
    path or a program is kept."""
    return header.spec.with_(
        name=name, qemu=qemu, machine=header.machine, vmgenid=str(uuid.uuid4()),
        kernel=str(files_dir / "kernel"),
        initrd=str(files_dir / "initrd") if "initrd" in header.blobs else None,
        memory=MemorySpec(backend="file", path=str(memory_file), share=True))


def check_machine(src: Path, header: Header, machines: Collection[str], version: str) -> None:
    """Raise BadSnapshotFile unless the header's machine type is one that the
    local QEMU (version *version*) offers."""
    if header.machine not in machines:
        raise BadSnapshotFile(f"{src}: its machine type {header.machine!r} is not one that "
                              f"the local QEMU {version} offers")


def _free_bytes(path: Path) -> tuple[int, int]:
    """(device, bytes free to an unprivileged user) of the file system that
    holds *path*, or would hold it once created."""
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    st = os.statvfs(p)
    return os.stat(p).st_dev, st.f_bavail * st.f_frsize


def check_space(src: Path, header: Header, files_dir: Path, memory_dir: Path) -> None:
    """Raise BadSnapshotFile if the blobs the header declares do not fit in
    *files_dir*, or the guest RAM in *memory_dir* (both, if they share a file
    system), before anything is written: a small sparse file cannot declare
    its way into filling a disk."""
    need: dict[int, int] = {}
    free: dict[int, int] = {}
    where: dict[int, Path] = {}
    for d, size in ((files_dir, sum(p.size for p in header.blobs.values())),
                    (memory_dir, header.memory_mib * MIB)):
        dev, avail = _free_bytes(d)
        need[dev] = need.get(dev, 0) + size
        free[dev], where[dev] = avail, d
    for dev, n in need.items():
        if n > free[dev]:
            raise BadSnapshotFile(f"{src}: the import needs {n} bytes in {where[dev]}, "
                                  f"which has {free[dev]} free")


def extract_blobs(src: Path, header: Header, target: Path) -> dict[str, str]:
    """Write each blob of snapshot file *src* as ``target/NAME`` (NAME in
    :data:`~vmfork.snapshots.export.BLOB_NAMES`), a new file (O_EXCL,
    O_NOFOLLOW, mode 0600) opened relative to *target* itself (not a
    symlink), and check each one's sha256 again as it is copied (the file may
    have changed since it was checked). Return the paths; on any failure
    remove what was written and raise."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        dfd = os.open(target, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise InvalidInput(f"cannot open directory {str(target)!r}: {exc.strerror}") from exc
    made: list[str] = []
    try:
        real = os.path.realpath(f"/proc/self/fd/{dfd}")
        with open(src, "rb") as f:
            for key in BLOB_NAMES:
                part = header.blobs.get(key)
                if part is None:
                    continue
                fd = os.open(key, flags, 0o600, dir_fd=dfd)
                made.append(key)
                with os.fdopen(fd, "wb") as out:
                    _copy(f, part.offset, part.size, part.sha256, out, f"{src}: its {key}")
                if os.path.realpath(target / key) != os.path.join(real, key):
                    raise BadSnapshotFile(f"{target / key} resolves outside {target}")
    except OSError as exc:
        _remove(dfd, made)
        raise InvalidInput(f"cannot extract {src} into {target}: {exc.strerror}") from exc
    except BaseException:
        _remove(dfd, made)
        raise
    finally:
        os.close(dfd)
    return {k: str(target / k) for k in made}


def _copy(f: BinaryIO, offset: int, size: int, sha256: str, out: BinaryIO, what: str) -> None:
    h = hashlib.sha256()
    pos, end = offset, offset + size
    while pos < end:
        chunk = os.pread(f.fileno(), min(1 << 20, end - pos), pos)
        if not chunk:
            raise BadSnapshotFile(f"{what} is truncated")
        h.update(chunk)
        out.write(chunk)
        pos += len(chunk)
    if h.hexdigest() != sha256:
        raise BadSnapshotFile(f"{what} changed: its sha256 differs from the header")


def _remove(dfd: int, names: list[str]) -> None:
    for name in names:
        with contextlib.suppress(OSError):
            os.unlink(name, dir_fd=dfd)


async def import_template(store: Store, file: Path | str, name: str,
                          persistent: bool = False, memory_dir: Path | str | None = None,
                          timeouts: Timeouts = DEFAULT) -> TemplateManifest:
    """Bring an export file back as template *name*: reserve the name
    (:func:`vmfork.templates.create.reserved`), import the file as a paused
    temporary VM (the guest does not run) whose kernel and initrd go straight
    to the template's directory, and freeze that VM into the template. A
    failed or interrupted import removes the temporary VM and the directory."""
    store.check_new_name(name, "template")
    read_header(file)  # a file refused up front reserves nothing
    tmp_name = internal("import", secrets.token_hex(4))
    async with create.reserved(store, name, tmp_name, timeouts, owned=True,
                               imported_from=str(Path(file).absolute())) as work:
        await import_(store, file, tmp_name, persistent=persistent, memory_dir=memory_dir,
                      resume=False, files_dir=Path(work.directory), timeouts=timeouts)
        return await create.freeze_into(store, work, timeouts)


__all__ = ["check_machine", "check_space", "extract_blobs", "import_", "import_spec",
           "import_template"]
