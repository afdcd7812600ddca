"""Settling a live update that a killed vmfork left behind.

Owns one decision: when the ``vmfork update`` that moved a VM died (kill -9,
host reboot of the CLI, ...), which QEMU holds the guest. Before it starts the
new QEMU, an update writes what it is about to do into the VM's record
(``info.update``: generation, new spec, mode, whether the guest ran) and
sets the state ``updating``. From that, and from what both QEMU processes say
over QMP, settling either

- **commits**: the new QEMU has loaded the whole state (``paused`` or
  ``running``) and the old one has handed it over (``postmigrate``) or is
  gone — the new QEMU becomes the VM, the old one ends
  (:func:`vmfork.update.commit.commit`); or
- **rolls back**: anything else — the new QEMU (found by its QMP socket path
  in its command line, since its pid may never have been recorded) is killed,
  its sockets and memory file removed, and the old QEMU resumes the guest.

Either way, the QEMU that keeps the guest gets the host port forwards it
lacks (:func:`vmfork.update.forwards.ensure`). An update that died after its
commit may have left the old QEMU running in
``postmigrate`` (``info.retire``); settling ends it.

Settling is an explicit step, never a side effect of looking: listing VMs
shows an interrupted update as ``updating`` and changes nothing. Commands
that act on a VM call :func:`settle` first (:func:`vmfork.update.live.update`
does it itself); :func:`settle_all` settles every VM no command is working on.

Settling also undoes a launch that a killed vmfork abandoned (a VM listed as
``abandoned``: :func:`vmfork.launch.undo_abandoned`); the VM is gone then,
and :func:`settle` raises NotFound for it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal

from vmfork import vm
from vmfork.errors import StateError, VmforkError
from vmfork.launch import qemu_log, undo_abandoned, undo_all_abandoned
from vmfork.listing import launch_abandoned
from vmfork.names import check_name
from vmfork.proc import process_alive
from vmfork.qemu import migration
from vmfork.qemu.machine import Machine, find_qemu, remove_sockets
from vmfork.records import UpdateIntent, VMRecord
from vmfork.spec import VMSpec
from vmfork.store import Store
from vmfork.timeouts import DEFAULT, Timeouts
from vmfork.update import forwards
from vmfork.update.commit import commit
from vmfork.update.move import remove_move_sockets

log = logging.getLogger("vmfork.update")


def pending(rec: VMRecord) -> bool:
    """True if *rec* has an interrupted update (or its old QEMU) to settle."""
    return rec.state == "updating" or rec.info.retire is not None


async def settle(store: Store, name: str, timeouts: Timeouts = DEFAULT) -> VMRecord:
    """Finish or undo an interrupted update of VM *name*; return its record.

    Cheap when there is nothing to settle (one catalog read, no lock).
    Otherwise takes the VM's lock, waiting for a command that works on the
    VM (a running update settles nothing: it ends before the lock is free).
    The caller must not hold the VM's lock (see :func:`settle_held`).
    An abandoned launch of the VM is undone: NotFound then."""
    rec = store.get_vm(check_name(name))
    if launch_abandoned(rec):
        await undo_abandoned(store, name, timeouts)
        rec = store.get_vm(name)  # NotFound once undone
    if not pending(rec):
        return rec
    async with store.lock_async(name):
        return await settle_held(store, store.get_vm(name), timeouts)


async def settle_held(store: Store, rec: VMRecord, timeouts: Timeouts = DEFAULT) -> VMRecord:
    """:func:`settle` for a caller that holds the VM's lock and has read *rec*
    under it."""
    rec = retire_old(store, rec)
    intent = rec.info.update
    if rec.state != "updating" or intent is None:
        return rec
    name, gen = rec.name, intent.gen
    new_pid = find_qemu(store.run_paths(name, gen).qmp)
    old = None
    if process_alive(rec.pid, rec.pid_start):
        old = await _attach(rec.spec, store, name, rec.info.gen, rec.pid, timeouts)
    new = await _attach(intent.spec, store, name, gen, new_pid, timeouts)
    try:
        old_st, new_st = await _status(old), await _status(new)
        loaded = new_st in ("paused", "running")
        if new is not None and loaded and (old is None or old_st == "postmigrate"):
            for w in await commit(store, rec, new, old, intent):
                log.warning("%s: %s", name, w)
            log.warning("%s: an interrupted update was completed: the guest is in the "
                        "new QEMU (pid %d)", name, new.pid)
        else:
            rec = await _undo(store, rec, new, old, intent, old_st, timeouts)
            log.warning("%s: an interrupted update was rolled back%s", name,
                        f" (the old QEMU, pid {rec.pid}, holds the guest)" if old else
                        " (no QEMU holds the guest: dead)")
    finally:
        for m in (old, new):
            if m is not None:
                await m.disconnect()
    remove_move_sockets(store, name, gen)
    return rec


async def settle_all(store: Store, timeouts: Timeouts = DEFAULT) -> list[str]:
    """Undo every abandoned launch, and settle every VM with an interrupted
    update that no vmfork command is working on right now; return the names
    of those undone or settled (a VM that cannot be settled is logged and
    left as it is)."""
    done = await undo_all_abandoned(store, timeouts)
    for rec in store.list_vms():
        if not pending(rec):
            continue
        with contextlib.ExitStack() as held:
            try:
                held.enter_context(store.lock(rec.name, wait=False))
            except StateError:
                continue  # a command holds the VM's lock: it is not interrupted
            try:
                await settle_held(store, store.get_vm(rec.name), timeouts)
            except VmforkError as exc:
                log.warning("%s: an interrupted update could not be settled: %s",
                            rec.name, exc)
                continue
            done.append(rec.name)
    return done


def retire_old(store: Store, rec: VMRecord) -> VMRecord:
    """End the old QEMU of a committed update if the update died before it
    did (``info.retire``; it sits in ``postmigrate``, holding nothing the
    guest needs)."""
    old = rec.info.retire
    if old is None:
        return rec
    if old.pid and old.pid != rec.pid and process_alive(old.pid, old.pid_start):
        with contextlib.suppress(ProcessLookupError):
            os.kill(old.pid, signal.SIGKILL)
        log.warning("%s: ended the old QEMU (pid %s) of an interrupted update", rec.name,
                    old.pid)
    remove_sockets(store.run_paths(rec.name, old.gen))
    rec.info.retire = None
    store.update_vm(rec)
    return rec


async def _status(m: Machine | None) -> str | None:
    if m is None:
        return None
    try:
        return await m.status()
    except VmforkError:
        return None


async def _attach(spec: VMSpec, store: Store, name: str, gen: int, pid: int | None,
                  timeouts: Timeouts) -> Machine | None:
    """Connect to a QEMU of this VM, or None if it is gone; a QEMU that does
    not answer (a cpr-transfer QEMU answers only once it has read the cpr
    channel) is returned unconnected, to be killed."""
    if pid is None or not process_alive(pid):
        return None
    try:
        return await Machine.attach(spec, store.run_paths(name, gen), qemu_log(store, name),
                                    pid, timeouts=timeouts)
    except VmforkError:
        return Machine(spec, store.run_paths(name, gen), qemu_log(store, name), pid,
                       timeouts=timeouts)


async def _undo(store: Store, rec: VMRecord, new: Machine | None, old: Machine | None,
                intent: UpdateIntent, old_st: str | None, timeouts: Timeouts) -> VMRecord:
    """Kill the new QEMU, remove its memory file, let the old QEMU run the
    guest as before the update (or record the VM dead if it is gone)."""
    if new is not None:
        await new.kill()
    mem = intent.new_memory_file
    if mem and mem != rec.spec.memory.path:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(mem)
    rec.info.update = None
    if old is None:
        rec.state = "dead"
        store.update_vm(rec)
        return rec
    with contextlib.suppress(VmforkError):
        await migration.cancel(old, timeouts.migrate)
    with contextlib.suppress(VmforkError):
        await migration.set_capabilities(old, x_ignore_shared=False)
        await migration.set_parameters(old, mode="normal")
    if intent.was_running and old_st in ("paused", "postmigrate"):
        vm.invalidate_save(store, rec.name)
        await old.resume()
    for w in await forwards.ensure(old, rec.spec.net):
        log.warning("%s: %s", rec.name, w)
    status = await old.status()
    if status not in ("running", "paused"):
        raise StateError(f"{rec.name}: after an interrupted update the old QEMU is {status}")
    rec.state = status
    store.update_vm(rec)
    return rec


__all__ = ["pending", "retire_old", "settle", "settle_all", "settle_held"]
