"""Bring a portable snapshot file back: as a running (or paused) VM with
:func:`import_`, or as a template with :func:`import_template`.

Owns the import side of the file format of :mod:`vmfork.snapshots.export`:
every sha256 is checked before anything is started, the kernel and initrd are
extracted next to the VM (or into the template's directory), and the RAM and
device state are loaded from the file's ``mapped-ram`` stream into a fresh
QEMU on a new memory file (``file:F,offset=N``). The new VM gets a new
vmgenid, so the guest knows it is a copy.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import shutil
import time
import uuid
from pathlib import Path

from vmfork import admission, vm
from vmfork.errors import AlreadyExists, InvalidInput, MigrationError, VmforkError
from vmfork.launch import Launch, NewVM
from vmfork.names import internal
from vmfork.qemu import migration
from vmfork.records import TemplateManifest, VMInfo, VMRecord
from vmfork.results import ImportResult
from vmfork.snapshots.export import Header, check_export, read_header
from vmfork.snapshots.save import load_incoming, sync_guest_clock
from vmfork.spec import MemorySpec
from vmfork.store import Store
from vmfork.templates import create
from vmfork.templates.manifest import template_dir
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
    header = read_header(src)
    if store.has_vm(name):
        raise AlreadyExists(f"a VM named {name!r} exists already")
    if header.spec.disks:
        raise MigrationError(f"{src}: its VM had disks, which a snapshot file does not "
                             "carry; it cannot be imported")
    await asyncio.to_thread(check_export, src, header)
    t_checked = time.monotonic()
    if memory_dir:
        mdir = Path(memory_dir).absolute()
    else:
        mdir = store.home / "memory" if persistent else store.memory_dir
    if persistent and not vm.is_persistent_dir(mdir):
        raise InvalidInput(f"--persistent needs a memory dir on disk; {str(mdir)!r} is on "
                           f"{vm.filesystem_type(mdir)}")
    source = header.spec
    qemu = source.qemu if shutil.which(source.qemu) else "qemu-system-x86_64"
    vdir = files_dir or store.vm_dir(name)
    files = {k: str(vdir / k) for k in header.blobs}
    spec = source.with_(
        name=name, qemu=qemu, machine=header.machine, vmgenid=str(uuid.uuid4()),
        kernel=files.get("kernel"), initrd=files.get("initrd"),
        memory=MemorySpec(backend="file", path=str(vm.memory_file_path(mdir, name)),
                          share=True))
    admission.check_new_vm(name, spec.memory_mib, mdir)
    rec = VMRecord(name=name, spec=spec, state="starting",
                   info=VMInfo(owns_memory=True, imported_from=str(src)))
    async with Launch(store, NewVM(store, rec), spec, timeouts=timeouts) as launch:
        with store.lock(name, wait=False):
            vdir.mkdir(parents=True, exist_ok=True)
            await asyncio.to_thread(_extract_blobs, src, header, files)
            m = await launch.spawn(incoming=("defer",))
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


def _extract_blobs(src: Path, header: Header, files: dict[str, str]) -> None:
    """Copy each blob of snapshot file *src* to its path in *files*."""
    with open(src, "rb") as f:
        for key, dest in files.items():
            part = header.blobs[key]
            f.seek(part.offset)
            left = part.size
            with open(dest, "wb") as out:
                while left:
                    chunk = f.read(min(1 << 20, left))
                    if not chunk:
                        raise MigrationError(f"{src} is truncated in its {key}")
                    out.write(chunk)
                    left -= len(chunk)


async def import_template(store: Store, file: Path | str, name: str,
                          persistent: bool = False, memory_dir: Path | str | None = None,
                          timeouts: Timeouts = DEFAULT) -> TemplateManifest:
    """Bring an export file back as template *name*: import it as a paused
    temporary VM (the guest does not run) and freeze that with
    :func:`vmfork.templates.create.create_from_vm`."""
    store.check_new_name(name, "template")
    if store.has_template(name):
        raise AlreadyExists(f"a template named {name!r} exists already")
    tmp_name = internal("import", secrets.token_hex(4))
    # Kernel and initrd go straight to the template's directory, which the
    # template owns (removing the template deletes it).
    tdir = template_dir(store, name)
    tdir.mkdir(parents=True, exist_ok=True)
    try:
        await import_(store, file, tmp_name, persistent=persistent, memory_dir=memory_dir,
                      resume=False, files_dir=tdir, timeouts=timeouts)
        try:
            return await create.create_from_vm(store, name, tmp_name, timeouts,
                                               imported_from=str(Path(file).absolute()))
        except BaseException:
            with contextlib.suppress(VmforkError):
                await vm.stop(store, tmp_name, force=True)
            raise
    except BaseException:
        shutil.rmtree(tdir, ignore_errors=True)
        raise


__all__ = ["import_", "import_template"]
