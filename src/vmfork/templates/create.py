"""Making templates: freeze a running VM into one.

Owns :func:`create_from_vm`: the VM is paused and its device state saved with
``x-ignore-shared`` (RAM is not written); QEMU ends; its shared memory file
becomes the template's read-only memory file (0400, like its state), and its
qcow2 overlays become the template's (``disk{i}.qcow2`` in the template
directory, 0400; each clone writes to an overlay of its own over them).
When the VM has
qemu-guest-agent and writable disks, its file systems are frozen right
before the pause, so disk and memory are saved at one instant; each clone
thaws them right after it runs, before anything writes. A VM whose memory is
private (a clone) first gets a shared memory file of its own by a copy
update, so a clone can become a template in turn (chained templates: the
manifest's ``parent``). Also :func:`create_demo`: boot the demo guest,
prepare it, freeze it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import shutil
import time
from dataclasses import replace
from pathlib import Path

from vmfork import vm
from vmfork.errors import AlreadyExists, GuestError, TemplateError, VmforkTimeout
from vmfork.files import write_atomic
from vmfork.names import build_name
from vmfork.private import FILE_MODE, READONLY_MODE, make_dirs
from vmfork.qemu import features, migration
from vmfork.records import TemplateDisk, TemplateManifest, TemplateSave, VMRecord
from vmfork.spec import DiskSpec, MemorySpec, VMSpec
from vmfork.store import Store
from vmfork.templates.manifest import disk_record, template_dir
from vmfork.timeouts import DEFAULT, Timeouts
from vmfork.update import live

log = logging.getLogger("vmfork.template")


async def create_from_vm(store: Store, name: str, vm_name: str,
                         timeouts: Timeouts = DEFAULT,
                         on_clone: str | None = None, *,
                         imported_from: str | None = None) -> TemplateManifest:
    """Freeze the running VM *vm_name* into template *name*; the VM ends.

    Its disk overlays become the template's (read-only). With
    qemu-guest-agent and disks, the guest's file systems are frozen right
    before the pause; if anything fails before QEMU ends, the VM is resumed
    and thawed. *on_clone* is the default hook of the template's clones;
    *imported_from* names the snapshot file the VM was imported from."""
    store.check_new_name(name, "template")
    if store.has_template(name):
        raise AlreadyExists(f"a template named {name!r} exists already")
    rec = vm.get_live(store, vm_name)
    check_disks_templatable(rec.spec)
    if rec.spec.memory.backend != "file" or not rec.spec.memory.share:
        rec = await _share_memory(store, rec, timeouts)
    tdir = template_dir(store, name)
    make_dirs(tdir)
    t0 = time.monotonic()
    frozen = False
    t_frozen = 0.0
    try:
        async with vm.attached(store, vm_name, timeouts) as (rec, m):
            was_running = await m.status() == "running"
            ident = await features.qemu_identity(m)
            if was_running and rec.spec.qga and any(not d.readonly for d in rec.spec.disks):
                await _freeze(store, rec, timeouts)
                frozen = True
                t_frozen = time.monotonic() - t0
            try:
                await m.pause()
                try:
                    stats, digest = await migration.save_state(
                        m, tdir / "state", timeouts.migrate, x_ignore_shared=True)
                except OSError as exc:
                    raise TemplateError(f"{vm_name}: writing the template state failed: "
                                        f"{exc}") from exc
            except BaseException:
                if was_running:
                    with contextlib.suppress(Exception):
                        await m.resume()
                if frozen:
                    await _thaw_quietly(store, rec, timeouts)
                raise
            t_saved = time.monotonic() - t0
            await m.shutdown()
    except BaseException:
        shutil.rmtree(tdir, ignore_errors=True)
        raise
    # QEMU has ended: the VM's overlays (and files it kept in its directory)
    # and its memory file become the template's, read-only.
    src_dir = store.vm_dir(vm_name)
    try:
        disks, entries, files = await asyncio.to_thread(_adopt_files, rec.spec, src_dir, tdir)
    except BaseException:
        shutil.rmtree(tdir, ignore_errors=True)
        raise
    src = Path(str(rec.spec.memory.path))
    mem = src.with_name(f"tpl-{name}-{secrets.token_hex(4)}.mem")
    os.rename(src, mem)
    os.chmod(mem, READONLY_MODE)
    spec = rec.spec.with_(name=name, machine=ident["machine"], disks=disks,
                          kernel=files.get("kernel", rec.spec.kernel),
                          initrd=files.get("initrd", rec.spec.initrd),
                          memory=MemorySpec(backend="file", path=str(mem), share=False,
                                            readonly=True))
    state = tdir / "state"
    os.chmod(state, READONLY_MODE)
    manifest = TemplateManifest(
        name=name, created=time.time(), source_vm=vm_name, parent=rec.template,
        memory_file=str(mem), memory_size=mem.stat().st_size,
        state_file=str(state), state_size=state.stat().st_size, state_sha256=digest,
        qemu_version=ident["qemu_version"], machine=ident["machine"], qemu=rec.spec.qemu,
        spec=spec, guest=rec.info.guest or "demo",
        save=TemplateSave(stats, freeze_seconds=t_frozen, total_seconds=t_saved),
        disks=tuple(entries), frozen=frozen, on_clone=on_clone, imported_from=imported_from)
    write_atomic(tdir / "manifest.json", manifest.to_json().encode())
    store.add_template(manifest)
    shutil.rmtree(store.run_dir(vm_name), ignore_errors=True)
    shutil.rmtree(src_dir, ignore_errors=True)
    store.remove_vm(vm_name)
    log.info("template %s: created from %s (state %d bytes, %d disks%s)", name, vm_name,
             manifest.state_size, len(entries), ", frozen" if frozen else "")
    return manifest


def check_disks_templatable(spec: VMSpec) -> None:
    """Refuse a VM whose writable disk is not an overlay: a template cannot
    take over an image the user attached (``--no-overlay``)."""
    for disk in spec.disks:
        if disk.backing is None and not disk.readonly:
            raise TemplateError(f"{spec.name}: disk {disk.path} is attached without an overlay "
                                "(--no-overlay); a template needs its disks as overlays")


def _adopt_files(spec: VMSpec, src_dir: Path, tdir: Path
                 ) -> tuple[tuple[DiskSpec, ...], list[TemplateDisk], dict[str, str]]:
    """Move the VM's disk overlays into *tdir* as ``disk{i}.qcow2`` (read-only),
    and a kernel or initrd that lives in its directory *src_dir*. Returns the
    template's disks, their manifest entries and the moved boot files; on a
    failure everything moved goes back."""
    moved: list[tuple[Path, Path]] = []

    def move(src: Path, dst: Path) -> None:
        shutil.move(src, dst)
        moved.append((src, dst))

    try:
        disks: list[DiskSpec] = []
        entries: list[TemplateDisk] = []
        for i, disk in enumerate(spec.disks):
            if disk.backing is None:  # a read-only image: shared as it is
                disks.append(disk)
                continue
            dst = tdir / f"disk{i}.qcow2"
            move(Path(disk.path), dst)
            os.chmod(dst, READONLY_MODE)
            disks.append(replace(disk, path=str(dst), readonly=False))
            entries.append(disk_record(dst, i, disk.backing))
        files: dict[str, str] = {}
        for key in ("kernel", "initrd"):
            path = getattr(spec, key)
            if path and Path(path).is_relative_to(src_dir):
                dst = tdir / key
                move(Path(path), dst)
                files[key] = str(dst)
        return tuple(disks), entries, files
    except BaseException:
        for src, dst in reversed(moved):
            with contextlib.suppress(OSError):
                os.chmod(dst, FILE_MODE)
                shutil.move(dst, src)
        raise


async def _freeze(store: Store, rec: VMRecord, timeouts: Timeouts) -> None:
    """Freeze the guest's file systems (QGA), or thaw and raise TemplateError."""
    try:
        async with vm.qga_for(store, rec, timeouts) as g:
            n = await g.fsfreeze_freeze(timeout=timeouts.exec)
    except (GuestError, VmforkTimeout) as exc:
        await _thaw_quietly(store, rec, timeouts)
        raise TemplateError(f"{rec.name}: freezing the guest's file systems failed: "
                            f"{exc}") from exc
    log.info("%s: %d file systems frozen", rec.name, n)


async def _thaw_quietly(store: Store, rec: VMRecord, timeouts: Timeouts) -> None:
    """Best effort thaw of the source VM after a failed template creation.
    A freeze that timed out may still be running in the agent, so the
    session may wait as long as a command."""
    try:
        async with vm.qga_for(store, rec, replace(timeouts, agent=timeouts.exec)) as g:
            await g.fsfreeze_thaw(timeout=timeouts.exec)
    except Exception as exc:
        log.warning("%s: could not thaw the guest's file systems: %s", rec.name, exc)


async def _share_memory(store: Store, rec: VMRecord, timeouts: Timeouts) -> VMRecord:
    """Give a VM with private memory (a clone) a shared memory file of its own
    by a local copy migration, so it can become a template (chained templates)."""
    await live.update(store, rec.name, mode="copy", timeouts=timeouts)
    new = store.get_vm(rec.name)
    if new.spec.memory.backend != "file" or not new.spec.memory.share:
        raise TemplateError(f"{rec.name}: could not move its memory to a shared file")
    return new


async def create_demo(store: Store, name: str, memory_mib: int = 512,
                      prepare: str | None = None, accel: str = "auto",
                      timeouts: Timeouts = DEFAULT,
                      on_clone: str | None = None) -> TemplateManifest:
    """Boot the demo guest, run *prepare* in it, and freeze it as *name*
    (*on_clone*: the clones' default hook)."""
    store.check_new_name(name, "template")
    if store.has_template(name):
        raise AlreadyExists(f"a template named {name!r} exists already")
    build = build_name(name)
    await vm.run(store, vm.RunOptions(name=build, memory_mib=memory_mib, demo=True,
                                      accel=accel), timeouts)
    try:
        if prepare:
            r = await vm.exec_(store, build, prepare, timeouts=timeouts)
            if r.exit_code != 0:
                raise TemplateError(f"--prepare failed with status {r.exit_code}: "
                                    f"{(r.stderr or r.stdout).strip()[-200:]}")
        return await create_from_vm(store, name, build, timeouts, on_clone=on_clone)
    finally:
        if store.has_vm(build):
            await vm.stop(store, build, force=True)
