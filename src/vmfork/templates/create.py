"""Making templates: freeze a running VM into one, crash-safely.

Owns :func:`create_from_vm`: the VM is paused and its device state saved with
``x-ignore-shared`` (RAM is not written); QEMU ends; its shared memory file
becomes the template's read-only memory file (0400, like its state), and its
qcow2 overlays become the template's (``disk{i}.qcow2`` in the template
directory, 0400; each clone writes to an overlay of its own over them).
When the VM has qemu-guest-agent and writable disks, its file systems are
frozen right before the pause, so disk and memory are saved at one instant;
each clone thaws them right after it runs, before anything writes. A VM
whose memory is private (a clone) first gets a shared memory file of its own
by a copy update, so a clone can become a template in turn (chained
templates: the manifest's ``parent``). Also :func:`create_demo`: boot the
demo guest, prepare it, freeze it.

**Crash safety.** Before any work the name is reserved (:func:`reserved`):
under the template's lock (:func:`vmfork.templates.catalog.locked`, held
until the creation ends) a catalog row in state ``creating`` records a
:class:`~vmfork.records.TemplateWork` (creator pid and start time, source
VM, directory), and the template's directory is made with
``exist_ok=False``; a second creation of the name is refused at once, and
every file of a creation lives in its own directory. Each step is recorded
before it is taken (``frozen`` before fsfreeze, ``paused`` before the pause,
then the save's statistics), with a checkpoint after it (``template.*``).
Whatever ends the creation early — an error, a cancellation, or the next
vmfork command finding a reservation whose creator died
(:mod:`vmfork.templates.recovery`) — :func:`resolve` decides from the facts:

* the source VM's QEMU has ended after a complete state save (the state file
  exists: it is written under a temporary name and renamed): **finish** — the
  files are adopted (idempotently) and the template recorded, the source VM
  removed in the same catalog transaction;
* otherwise **undo**: the template directory goes first (so that nothing can
  finish the creation once the guest runs again), then a live source QEMU is
  resumed if vmfork paused it and its file systems thawed if they were
  frozen; if its QEMU ended, the files moved so far go back to the VM. A VM
  the creation made itself (the demo build VM, an import's temporary VM) is
  removed. The reservation goes last.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import shutil
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

from vmfork import agents, vm
from vmfork.checkpoints import checkpoint
from vmfork.errors import GuestError, StateError, TemplateError, VmforkError, VmforkTimeout
from vmfork.files import sha256_file, write_atomic
from vmfork.launch import attach
from vmfork.lazy import lifecycle
from vmfork.names import build_name
from vmfork.private import FILE_MODE, READONLY_MODE, make_dirs
from vmfork.proc import process_alive, process_start_time
from vmfork.qemu import features, migration
from vmfork.records import (
    TEMPLATE_CREATING,
    TemplateDisk,
    TemplateManifest,
    TemplateSave,
    TemplateWork,
    VMRecord,
)
from vmfork.results import MigrationStats
from vmfork.spec import DiskSpec, MemorySpec, VMSpec
from vmfork.store import Store
from vmfork.tasks import run_to_end
from vmfork.templates import catalog
from vmfork.templates.manifest import disk_record, template_dir
from vmfork.timeouts import DEFAULT, Timeouts
from vmfork.update import live

log = logging.getLogger("vmfork.template")

T = TypeVar("T")

#: The device state in a template's directory (written by
#: :func:`vmfork.qemu.migration.save_state`: complete once it has this name).
STATE_FILE = "state"


async def create_from_vm(store: Store, name: str, vm_name: str,
                         timeouts: Timeouts = DEFAULT,
                         on_clone: str | None = None, *,
                         imported_from: str | None = None) -> TemplateManifest:
    """Freeze the running VM *vm_name* into template *name*; the VM ends.

    Its disk overlays become the template's (read-only). With
    qemu-guest-agent and disks, the guest's file systems are frozen right
    before the pause; if anything fails (or the call is cancelled) before
    QEMU ends, the VM is resumed and thawed. *on_clone* is the default hook
    of the template's clones; *imported_from* names the snapshot file the VM
    was imported from."""
    store.check_new_name(name, "template")
    check_disks_templatable(vm.get_live(store, vm_name).spec)
    async with reserved(store, name, vm_name, timeouts, on_clone=on_clone,
                        imported_from=imported_from) as work:
        return await freeze_into(store, work, timeouts)


@contextlib.asynccontextmanager
async def reserved(store: Store, name: str, source_vm: str, timeouts: Timeouts = DEFAULT, *,
                   owned: bool = False, on_clone: str | None = None,
                   imported_from: str | None = None) -> AsyncIterator[TemplateWork]:
    """Reserve template *name* for a creation from VM *source_vm* (*owned*:
    a VM the creation makes itself) and make its directory; yield the work
    record. Holds the template's lock throughout. A reservation whose
    creator died is settled first; a template or a live creation of the name
    is refused at once (AlreadyExists, StateError). If the block fails or is
    cancelled, :func:`resolve` finishes or undoes the creation."""
    store.check_new_name(name, "template")
    async with catalog.locked(store, name):
        if store.has_template(name):
            await settle_held(store, name, timeouts)
        if store.has_template(name):
            raise store.template_conflict(name)
        tdir = template_dir(store, name)
        work = TemplateWork(name=name, op="create", pid=os.getpid(),
                            pid_start=process_start_time(os.getpid()), started=time.time(),
                            source_vm=source_vm, source_owned=owned, directory=str(tdir),
                            on_clone=on_clone, imported_from=imported_from)
        store.reserve_template(work)
        try:
            make_dirs(store.templates_dir)
            try:
                tdir.mkdir(mode=0o700)
            except FileExistsError:
                work = replace(work, directory="")  # not ours: undo leaves it
                store.set_template_work(work)
                raise StateError(f"template directory {tdir} exists but no template owns "
                                 "it (left by an earlier vmfork?); remove it") from None
            await checkpoint("template.reserved")
            yield work
        except BaseException:
            try:
                await run_to_end(_resolve_reserved(store, name, timeouts))
            except VmforkError as exc:  # the next command retries; report the cause
                log.warning("template %s: cleaning up after a failed creation failed: %s",
                            name, exc)
            raise


async def _resolve_reserved(store: Store, name: str, timeouts: Timeouts) -> None:
    found = store.template_work(name)
    if found is not None and found[0] == TEMPLATE_CREATING and found[1] is not None:
        await resolve(store, found[1], timeouts)


def _record(store: Store, work: TemplateWork, **changes: Any) -> TemplateWork:
    """Record a step of the creation in its reservation (before taking it)."""
    work = replace(work, **changes)
    store.set_template_work(work)
    return work


async def freeze_into(store: Store, work: TemplateWork, timeouts: Timeouts = DEFAULT
                      ) -> TemplateManifest:
    """Freeze the source VM of reservation *work* into its template (inside
    :func:`reserved`, which cleans up on failure)."""
    vm_name = str(work.source_vm)
    rec = vm.get_live(store, vm_name)
    check_disks_templatable(rec.spec)
    if rec.spec.memory.backend != "file" or not rec.spec.memory.share:
        await _share_memory(store, rec, timeouts)
    tdir = Path(work.directory)
    async with store.lock_async(vm_name):
        rec = vm.get_live(store, vm_name)
        src = Path(str(rec.spec.memory.path))
        work = _record(store, work,
                       memory_file=str(src.with_name(f"tpl-{work.name}-"
                                                     f"{secrets.token_hex(4)}.mem")))
        t0 = time.monotonic()
        t_frozen = 0.0
        m = await attach(store, rec, timeouts)
        try:
            was_running = await m.status() == "running"
            ident = await features.qemu_identity(m)
            work = _record(store, work, qemu_version=ident["qemu_version"],
                           machine=ident["machine"])
            if was_running and rec.info.agent is None:
                # Kept with the template: its clones start out knowing it.
                rec.info.agent = await agents.find_agent(store, rec, timeouts) or "none"
                store.update_vm(rec)
            writable = any(not d.readonly for d in rec.spec.disks)
            if was_running and writable and await agents.qga_answers(store, rec, timeouts):
                work = _record(store, work, frozen=True)
                await _freeze(store, rec, timeouts)
                t_frozen = time.monotonic() - t0
                await checkpoint("template.frozen")
            if was_running:
                work = _record(store, work, paused=True)
            await m.pause()
            await checkpoint("template.paused")
            try:
                stats, _digest = await migration.save_state(
                    m, tdir / STATE_FILE, timeouts.migrate, x_ignore_shared=True)
            except OSError as exc:
                raise TemplateError(f"{vm_name}: writing the template state failed: "
                                    f"{exc}") from exc
            work = _record(store, work, saved=TemplateSave(
                stats, freeze_seconds=t_frozen, total_seconds=time.monotonic() - t0))
            await checkpoint("template.saved")
            await m.shutdown()
            await checkpoint("template.qemu-quit")
        finally:
            await m.disconnect()
        manifest = await finish(store, work, store.get_vm(vm_name))
    await checkpoint("template.recorded")
    return manifest


# -- finish or undo -----------------------------------------------------------------
async def resolve(store: Store, work: TemplateWork, timeouts: Timeouts = DEFAULT
                  ) -> TemplateManifest | None:
    """Finish or undo the creation *work* (see the module docstring); return
    the manifest if it was finished. The caller holds the template's lock
    and nobody else works on the creation."""
    rec = store.get_vm(work.source_vm) if work.source_vm and store.has_vm(
        work.source_vm) else None
    if rec is not None and state_complete(work) and not process_alive(rec.pid, rec.pid_start):
        try:
            async with store.lock_async(rec.name):
                manifest = await finish(store, work, store.get_vm(rec.name))
            log.warning("template %s: a creation whose vmfork ended was finished", work.name)
            return manifest
        except VmforkError as exc:
            log.warning("template %s: the creation cannot be finished (%s); undoing it",
                        work.name, exc)
    await _undo(store, work, rec, timeouts)
    return None


def state_complete(work: TemplateWork) -> bool:
    """The creation's device state was saved in full."""
    return bool(work.directory) and (Path(work.directory) / STATE_FILE).is_file()


async def finish(store: Store, work: TemplateWork, rec: VMRecord) -> TemplateManifest:
    """Make the template of *work* from its source VM *rec*, whose QEMU has
    ended after the save: adopt its files, write the manifest, record the
    template and remove the VM. Each step may be repeated (after a crash)."""
    tdir = Path(work.directory)
    if work.memory_file is None or work.qemu_version is None or work.machine is None:
        raise TemplateError(f"template {work.name}: its creation record is incomplete")
    mem = Path(work.memory_file)
    try:
        disks, entries, files = await asyncio.to_thread(_adopt_files, rec.spec,
                                                        store.vm_dir(rec.name), tdir, mem)
    except OSError as exc:
        raise TemplateError(f"template {work.name}: taking over the files of {rec.name} "
                            f"failed: {exc}") from exc
    state = tdir / STATE_FILE
    os.chmod(state, READONLY_MODE)
    digest = await asyncio.to_thread(sha256_file, state)
    size = state.stat().st_size
    save = work.saved or TemplateSave(MigrationStats("completed", 0.0, None, None, 0, size))
    spec = rec.spec.with_(name=work.name, machine=work.machine, disks=disks,
                          kernel=files.get("kernel", rec.spec.kernel),
                          initrd=files.get("initrd", rec.spec.initrd),
                          memory=MemorySpec(backend="file", path=str(mem), share=False,
                                            readonly=True))
    manifest = TemplateManifest(
        name=work.name, created=time.time(), source_vm=rec.name, parent=rec.template,
        memory_file=str(mem), memory_size=mem.stat().st_size,
        state_file=str(state), state_size=size, state_sha256=digest,
        qemu_version=work.qemu_version, machine=work.machine, qemu=rec.spec.qemu,
        spec=spec, guest=rec.info.guest or "demo", save=save, disks=tuple(entries),
        frozen=work.frozen, on_clone=work.on_clone, imported_from=work.imported_from,
        agent=rec.info.agent)
    write_atomic(tdir / "manifest.json", manifest.to_json().encode())
    shutil.rmtree(store.run_dir(rec.name), ignore_errors=True)
    shutil.rmtree(store.vm_dir(rec.name), ignore_errors=True)
    store.finish_template(manifest, rec.name)
    log.info("template %s: created from %s (state %d bytes, %d disks%s)", work.name, rec.name,
             manifest.state_size, len(entries), ", frozen" if work.frozen else "")
    return manifest


async def _undo(store: Store, work: TemplateWork, rec: VMRecord | None,
                timeouts: Timeouts) -> None:
    """Undo the creation *work*: the directory goes first, then the source VM
    is given back (resumed and thawed, or its files moved back), then an
    owned source VM is removed, then the reservation."""
    tdir = Path(work.directory) if work.directory else None
    if rec is not None:
        async with store.lock_async(rec.name):
            rec = store.get_vm(rec.name)
            if tdir is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tdir / STATE_FILE)
            if process_alive(rec.pid, rec.pid_start):
                if not work.source_owned:
                    await _give_back(store, work, rec, timeouts)
            elif tdir is not None:
                await asyncio.to_thread(_return_files, rec.spec, store.vm_dir(rec.name), tdir,
                                        work.memory_file)
        if work.source_owned:
            await vm.stop(store, rec.name, force=True, timeouts=timeouts)
    if tdir is not None:
        shutil.rmtree(tdir, ignore_errors=True)
    store.drop_reservation(work.name)
    log.warning("template %s: creation undone%s", work.name,
                f"; {rec.name} is as before" if rec is not None and not work.source_owned
                else "")


async def _give_back(store: Store, work: TemplateWork, rec: VMRecord,
                     timeouts: Timeouts) -> None:
    """Let the live source VM run as before the creation: resume it if vmfork
    paused it, thaw its file systems if they were frozen."""
    try:
        m = await attach(store, rec, timeouts)
    except VmforkError as exc:
        raise StateError(f"template {work.name}: cannot reach {rec.name} to give it back "
                         f"({exc})") from exc
    try:
        status = await m.status()
        if work.paused and status in ("paused", "postmigrate"):
            await m.resume()
    finally:
        await m.disconnect()
    if work.frozen:
        await _thaw_quietly(store, rec, timeouts)


def check_disks_templatable(spec: VMSpec) -> None:
    """Refuse a VM whose writable disk is not an overlay: a template cannot
    take over an image the user attached (``--no-overlay``)."""
    for disk in spec.disks:
        if disk.backing is None and not disk.readonly:
            raise TemplateError(f"{spec.name}: disk {disk.path} is attached without an overlay "
                                "(--no-overlay); a template needs its disks as overlays")


def _moves(spec: VMSpec, src_dir: Path, tdir: Path, memory_file: str | None
           ) -> list[tuple[str, Path, Path]]:
    """What a template takes over from its VM: (what, from, to) for each disk
    overlay (to ``disk{i}.qcow2``), a kernel or initrd in the VM's directory
    *src_dir*, and the memory file (to *memory_file*)."""
    moves = [(f"disk{i}", Path(d.path), tdir / f"disk{i}.qcow2")
             for i, d in enumerate(spec.disks) if d.backing is not None]
    for key in ("kernel", "initrd"):
        path = getattr(spec, key)
        if path and Path(path).is_relative_to(src_dir):
            moves.append((key, Path(path), tdir / key))
    if memory_file and spec.memory.path:
        moves.append(("memory", Path(spec.memory.path), Path(memory_file)))
    return moves


def _adopt_files(spec: VMSpec, src_dir: Path, tdir: Path, memory_file: Path
                 ) -> tuple[tuple[DiskSpec, ...], list[TemplateDisk], dict[str, str]]:
    """Move the VM's disk overlays, the kernel or initrd in its directory
    *src_dir* and its memory file into the template (read-only). A file
    already moved (by a creation that died) is taken as it is. Returns the
    template's disks, their manifest entries and the moved boot files."""
    files: dict[str, str] = {}
    for what, src, dst in _moves(spec, src_dir, tdir, str(memory_file)):
        if src.exists():
            shutil.move(src, dst)
        elif not dst.exists():
            raise FileNotFoundError(f"{src} is missing")
        os.chmod(dst, READONLY_MODE)
        if what in ("kernel", "initrd"):
            files[what] = str(dst)
    disks: list[DiskSpec] = []
    entries: list[TemplateDisk] = []
    for i, disk in enumerate(spec.disks):
        if disk.backing is None:  # a read-only image: shared as it is
            disks.append(disk)
            continue
        dst = tdir / f"disk{i}.qcow2"
        disks.append(replace(disk, path=str(dst), readonly=False))
        entries.append(disk_record(dst, i, disk.backing))
    return tuple(disks), entries, files


def _return_files(spec: VMSpec, src_dir: Path, tdir: Path, memory_file: str | None) -> None:
    """Move back to the VM what :func:`_adopt_files` took from it."""
    for _what, src, dst in _moves(spec, src_dir, tdir, memory_file):
        if dst.exists() and not src.exists():
            os.chmod(dst, FILE_MODE)
            shutil.move(dst, src)


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
    (*on_clone*: the clones' default hook). The build VM belongs to the
    creation: a failed or interrupted one removes it."""
    build = build_name(name)
    async with reserved(store, name, build, timeouts, owned=True, on_clone=on_clone) as work:
        await vm.run(store, vm.RunOptions(name=build, memory_mib=memory_mib, demo=True,
                                          accel=accel), timeouts)
        await checkpoint("template.booted")
        if prepare:
            r = await vm.exec_(store, build, prepare, timeouts=timeouts)
            if r.exit_code != 0:
                raise TemplateError(f"--prepare failed with status {r.exit_code}: "
                                    f"{(r.stderr or r.stdout).strip()[-200:]}")
        return await freeze_into(store, work, timeouts)


def _drop_fork_reservation(store: Store, work: TemplateWork) -> bool:
    """Drop the base reservation of a fork whose vmfork died before the
    parent recorded the fork (:mod:`vmfork.fork.recovery` settles one the
    parent records: not here)."""
    parent = work.source_vm
    if parent and store.has_vm(parent):
        fork = store.get_vm(parent).info.fork
        if fork is not None and fork.base == work.name:
            return False
    if work.directory:
        shutil.rmtree(work.directory, ignore_errors=True)
    store.drop_reservation(work.name)
    return True


async def settle_held(store: Store, name: str, timeouts: Timeouts = DEFAULT) -> bool:
    """Finish or undo what a vmfork that died left of template *name*: a
    creation (:func:`resolve`), a pull (undone:
    :func:`vmfork.lazy.lifecycle.undo_pull`) or a removal
    (:func:`vmfork.templates.catalog.finish_removal`). The caller holds the
    template's lock; work whose owner still runs is left alone. True if
    something was settled."""
    found = store.template_work(name)
    if found is None or found[1] is None:
        return False
    state, work = found[0], found[1]
    if work.pid != os.getpid() and process_alive(work.pid, work.pid_start):
        return False
    if state == TEMPLATE_CREATING and work.op == "fork":
        return _drop_fork_reservation(store, work)
    if state == TEMPLATE_CREATING and work.op == "pull":
        await lifecycle.undo_pull(store, work, timeouts.stop)
        return True
    if state == TEMPLATE_CREATING:
        await resolve(store, work, timeouts)
    else:
        await catalog.finish_removal(store, work, timeouts)
    return True
