"""``fork()``: the order of one live fork.

Owns the sequence, under the parent's lock: settle what a killed vmfork left
of the parent (an update, a fork) → check the children's names → reserve the
fork base (an internal template, ``creating``) and record the fork in the
parent's record (:class:`~vmfork.records.ForkWork`) before the first step →
:class:`~vmfork.fork.rebase.Rebase` prepare, pause/switch, commit (undone on
any failure or cancellation before the commit) → then, the parent's lock
released, the children are started as clones of the base
(:func:`vmfork.templates.clone.clone`: own identity, hook) → report.

A fork whose children fail has still moved the parent onto the base (the
parent runs on, unchanged to its guest); the children of the call are
removed (the clone batch undoes itself) and the error names them.
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from pathlib import Path

import vmfork.fork.recovery as recovery
from vmfork import vm
from vmfork.errors import AlreadyExists, InvalidInput, StateError
from vmfork.fork.base import collect, new_name
from vmfork.fork.rebase import Rebase, undo
from vmfork.launch import attach, undo_all_abandoned
from vmfork.names import check_name, derived
from vmfork.private import make_dirs
from vmfork.proc import process_start_time
from vmfork.qemu import features
from vmfork.qemu.machine import Machine
from vmfork.records import ForkWork, TemplateWork, VMRecord
from vmfork.results import ForkChild, ForkReport
from vmfork.spec import DiskSpec, MemorySpec
from vmfork.store import Store
from vmfork.tasks import run_to_end
from vmfork.templates import clone as clones
from vmfork.timeouts import DEFAULT, Timeouts
from vmfork.update import recovery as update_recovery
from vmfork.update.modes import memory_kind

log = logging.getLogger("vmfork.fork")


def child_names(store: Store, parent: str, names: list[str] | None,
                count: int | None) -> list[str]:
    """The children's names: *names* (checked), or *count* free names
    ``PARENT-k`` (default 1)."""
    if names:
        if count is not None and count != len(names):
            raise InvalidInput(f"{len(names)} names given for {count} children")
        clones.check_count(len(names))
        if len(set(names)) != len(names):
            raise InvalidInput("the children's names must differ")
        for n in names:
            store.check_new_name(n)
            if store.has_vm(n):
                raise AlreadyExists(f"a VM named {n!r} exists already")
        return list(names)
    count = clones.check_count(1 if count is None else count)
    out: list[str] = []
    i = 1
    while len(out) < count:
        n = derived(parent, f"-{i}")
        if not store.has_vm(n):
            store.check_new_name(n)
            out.append(n)
        i += 1
    return out


async def fork(store: Store, name: str, names: list[str] | None = None,
               count: int | None = None, on_clone: str | None = None,
               timeouts: Timeouts = DEFAULT) -> ForkReport:
    """Fork running VM *name* into children *names* (or *count* children
    named ``NAME-k``, lowest free *k* first; default 1). Each child starts
    from the parent's RAM, devices and disks at one instant, then gets its
    own identity like a clone and runs *on_clone* (a shell command). The
    parent keeps its identity; it is paused once, for
    ``ForkReport.parent_pause_ms``."""
    t0 = time.monotonic()
    check_name(name)
    await undo_all_abandoned(store, timeouts)
    kids = child_names(store, name, names, count)
    async with store.lock_async(name):
        rec = await update_recovery.settle_held(store, store.get_vm(name), timeouts)
        rec = await recovery.settle_held(store, rec, timeouts)
        rec = vm.get_live(store, name)
        if rec.pid is None:
            raise StateError(f"{name} has no QEMU process")
        vm.invalidate_save(store, name)  # the guest runs on in another QEMU
        old = await attach(store, rec, timeouts)
        try:
            rebase = await _rebase(store, rec, old, timeouts)
        finally:
            await old.disconnect()
    log.info("%s: forked into %s (pause %.1f ms)", name, rebase.work.base, rebase.pause_ms())
    t_children = time.monotonic()
    try:
        results = await clones.clone(store, rebase.work.base, names=kids, use_pool=False,
                                     on_clone=on_clone or "", timeouts=timeouts)
    except BaseException:
        # The parent left its earlier base (a private copy of its memory).
        await run_to_end(collect(store, timeouts))
        raise
    base_ms = (t_children - t0) * 1000
    children = tuple(ForkChild(name=r.name, pid=r.pid, running_ms=base_ms + r.running * 1000,
                               responsive_ms=base_ms + r.responsive * 1000,
                               hook_status=r.hook_status, hook_output=r.hook_output,
                               ports=r.ports, identity=r.identity) for r in results)
    await collect(store, timeouts)
    return ForkReport(
        name=name, base=rebase.work.base, parent_pause_ms=rebase.pause_ms(),
        parent_old_pid=old.pid, parent_pid=rebase.new.pid if rebase.new else 0,
        captured_bytes=rebase.captured, base_copy_bytes=rebase.base_copied,
        ram_bytes_written=rebase.captured + rebase.base_copied,
        state_bytes=rebase.state_size, prepare_ms=rebase.prepare_seconds * 1000,
        total_ms=(time.monotonic() - t0) * 1000, children=children,
        warnings=tuple(rebase.warnings))


def plan(store: Store, rec: VMRecord, base: str, machine: str, qemu_version: str,
         was_running: bool) -> ForkWork:
    """What the fork of *rec* into base *base* will do (nothing done yet)."""
    mem = rec.spec.memory
    if mem.backend != "file" or not mem.path:
        raise InvalidInput(f"{rec.name}: its RAM is a memfd; a fork needs it in a memory "
                           "file (start the VM without --memory-backend memfd)")
    tdir = store.templates_dir / base
    memory_to = str(Path(mem.path).with_name(f"fork-{base.rsplit('.', 1)[-1]}."
                                             f"{secrets.token_hex(2)}.mem"))
    shared = memory_kind(mem) == "shared-file"
    moved: list[tuple[str, str]] = []
    disks: list[DiskSpec] = []
    for i, d in enumerate(rec.spec.disks):
        if d.backing is None:
            if not d.readonly:
                raise InvalidInput(f"{rec.name}: disk {d.path} is attached without an overlay "
                                   "(--no-overlay); a fork needs its disks as overlays")
            disks.append(d)
            continue
        to = str(tdir / f"disk{i}.qcow2")
        moved.append((d.path, to))
        disks.append(DiskSpec(path=d.path, format="qcow2", backing=to, backing_format="qcow2"))
    spec = rec.spec.with_(machine=machine, disks=tuple(disks),
                          memory=MemorySpec(backend="file", path=memory_to, share=False,
                                            readonly=True))
    return ForkWork(base=base, directory=str(tdir), pid=os.getpid(),
                    pid_start=process_start_time(os.getpid()), gen=rec.info.gen + 1,
                    spec=spec, was_running=was_running,
                    memory_from=mem.path if shared else None, memory_to=memory_to,
                    disks=tuple(moved), template=rec.template,
                    qemu_version=qemu_version, machine=machine)


async def _rebase(store: Store, rec: VMRecord, old: Machine, timeouts: Timeouts
                  ) -> Rebase:
    status = await old.status()
    if status not in ("running", "paused"):
        raise StateError(f"{rec.name} is {status}; a fork needs a running or paused guest")
    ident = await features.qemu_identity(old)
    base = new_name()
    work = plan(store, rec, base, ident["machine"], ident["qemu_version"],
                status == "running")
    store.reserve_template(TemplateWork(
        name=base, op="fork", pid=work.pid, pid_start=work.pid_start, started=time.time(),
        source_vm=rec.name, directory=work.directory))
    r = Rebase(store=store, rec=rec, old=old, work=work, timeouts=timeouts)
    try:
        r.record()
        make_dirs(store.templates_dir)
        Path(work.directory).mkdir(mode=0o700)
        t0 = time.monotonic()
        await r.prepare()
        r.prepare_seconds = time.monotonic() - t0
        await r.switch()
    except BaseException as exc:
        if r.resumed:  # the guest runs in the new QEMU: keep it there
            await _commit(r)
            raise
        if r.copier is not None:
            r.copier.close()
        log.warning("%s: fork failed (%s); undoing it", rec.name, exc or type(exc).__name__)
        await run_to_end(undo(store, rec, r.work, old, r.new, timeouts))
        raise
    await _commit(r)
    return r


async def _commit(r: Rebase) -> None:
    """Commit *r* to its end (even if cancelled), then let its new QEMU go."""
    try:
        await run_to_end(r.commit())
    finally:
        if r.new is not None:
            await r.new.disconnect()


__all__ = ["child_names", "fork", "plan"]
