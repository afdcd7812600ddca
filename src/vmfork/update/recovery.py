"""Finishing or undoing a live update that a killed vmfork left behind.

Owns one decision: when the ``vmfork update`` that moved a VM died (kill -9,
host reboot of the CLI, ...), which QEMU holds the guest. Before it starts the
new QEMU, an update writes what it is about to do into the VM's record
(``info.update``: generation, new spec, mode, whether the guest ran) and
sets the state ``updating``. From that, and from what both QEMU processes say
over QMP, recovery either

- **commits**: the new QEMU has loaded the whole state (``paused`` or
  ``running``) and the old one has handed it over (``postmigrate``) or is
  gone — the new QEMU becomes the VM, the old one ends; or
- **rolls back**: anything else — the new QEMU (found by its QMP socket path
  in its command line, since its pid may never have been recorded) is killed,
  its sockets and memory file removed, and the old QEMU resumes the guest.

Run under the VM's lock, by ``vmfork update`` on an ``updating`` VM, by
``vmfork stop``, and by ``vmfork ls`` for VMs whose lock is free.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal

import psutil

from vmfork import vm
from vmfork.errors import StateError, VmforkError
from vmfork.qemu import migration
from vmfork.qemu.machine import Machine, process_alive, process_start_time, remove_sockets
from vmfork.records import UpdateIntent, VMRecord
from vmfork.spec import VMSpec
from vmfork.store import Store
from vmfork.timeouts import DEFAULT, Timeouts

log = logging.getLogger("vmfork.update")


def find_qemu(qmp_path: str) -> int | None:
    """The pid of the QEMU whose command line names *qmp_path* (its monitor)."""
    for p in psutil.process_iter(["cmdline", "status"]):
        try:
            if p.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if any(qmp_path in a for a in (p.info["cmdline"] or []) if "unix:" in a):
                return int(p.pid)
        except psutil.Error:
            continue
    return None


async def _status(m: Machine | None) -> str | None:
    if m is None:
        return None
    try:
        return await m.status()
    except VmforkError:
        return None


async def _attach(spec: VMSpec, store: Store, name: str, gen: int, pid: int | None,
                  timeouts: Timeouts) -> Machine | None:
    """Connect to a QEMU of this VM, or None if it is gone or does not answer
    (a cpr-transfer QEMU answers only once it has read the cpr channel)."""
    if pid is None or not process_alive(pid):
        return None
    try:
        return await Machine.attach(spec, store.run_paths(name, gen), vm.qemu_log(store, name),
                                    pid, timeouts=timeouts)
    except VmforkError:
        return Machine(spec, store.run_paths(name, gen), vm.qemu_log(store, name), pid,
                       timeouts=timeouts)


def _remove_move_sockets(store: Store, name: str, gen: int) -> None:
    for sock in (f"mig.{gen}.sock", f"cpr.{gen}.sock"):
        with contextlib.suppress(FileNotFoundError):
            (store.run_dir(name) / sock).unlink()


async def retire_old(store: Store, rec: VMRecord) -> VMRecord:
    """End the old QEMU of a committed update if the update died before it did
    (``info.retire``; it sits in ``postmigrate``, holding nothing the
    guest needs)."""
    old = rec.info.retire
    if old is None:
        return rec
    pid, start = old.pid, old.pid_start
    if pid and pid != rec.pid and process_alive(pid, start):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        log.warning("%s: ended the old QEMU (pid %s) of an interrupted update", rec.name, pid)
    remove_sockets(store.run_paths(rec.name, old.gen))
    rec.info.retire = None
    store.update_vm(rec)
    return rec


async def recover(store: Store, rec: VMRecord, timeouts: Timeouts = DEFAULT) -> VMRecord:
    """Settle an interrupted update of *rec* (the caller holds the VM's lock)."""
    rec = await retire_old(store, rec)
    todo = rec.info.update
    if rec.state != "updating" or todo is None:
        return rec
    name, gen = rec.name, todo.gen
    new_spec = todo.spec
    was_running = todo.was_running
    old_gen = rec.info.gen
    new_pid = find_qemu(store.run_paths(name, gen).qmp)
    old = await _attach(rec.spec, store, name, old_gen, rec.pid, timeouts) \
        if process_alive(rec.pid, rec.pid_start) else None
    new = await _attach(new_spec, store, name, gen, new_pid, timeouts)
    try:
        old_st, new_st = await _status(old), await _status(new)
        loaded = new_st in ("paused", "running")
        if new is not None and loaded and (old is None or old_st == "postmigrate"):
            rec = await _commit(store, rec, new, old, new_spec, todo, timeouts)
            log.warning("%s: an interrupted update was completed: the guest is in the "
                        "new QEMU (pid %d)", name, new.pid)
        else:
            rec = await _undo(store, rec, new, old, todo, was_running, old_st)
            log.warning("%s: an interrupted update was rolled back%s", name,
                        f" (the old QEMU, pid {rec.pid}, holds the guest)" if old else
                        " (no QEMU holds the guest: dead)")
    finally:
        for m in (old, new):
            if m is not None:
                await m.disconnect()
    _remove_move_sockets(store, name, gen)
    return rec


async def _commit(store: Store, rec: VMRecord, new: Machine, old: Machine | None,
                  new_spec: VMSpec, todo: UpdateIntent, timeouts: Timeouts) -> VMRecord:
    from vmfork.update import remove_old_memory, restore_port_forwards  # update imports us
    old_spec = rec.spec
    if old is not None:
        with contextlib.suppress(VmforkError):
            await old.shutdown()
    with contextlib.suppress(VmforkError):
        await migration.set_capabilities(new, x_ignore_shared=False)
    if todo.was_running and await new.status() == "paused":
        await new.resume()
    rec.spec = new_spec
    rec.pid, rec.pid_start = new.pid, process_start_time(new.pid)
    rec.state = "running" if await new.status() == "running" else "paused"
    rec.info.gen = todo.gen
    rec.info.updates += 1
    if todo.mode == "copy":
        rec.info.owns_memory = True
    rec.info.update = None
    store.update_vm(rec)
    warnings: list[str] = []
    if todo.mode == "copy":
        remove_old_memory(new_spec, old_spec, warnings)
    warnings += await restore_port_forwards(new, new_spec.net)
    for w in warnings:
        log.warning("%s: %s", rec.name, w)
    return rec


async def _undo(store: Store, rec: VMRecord, new: Machine | None, old: Machine | None,
                todo: UpdateIntent, was_running: bool, old_st: str | None) -> VMRecord:
    if new is not None:
        await new.kill()
    mem = todo.new_memory_file
    if mem and mem != rec.spec.memory.path:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(mem)
    rec.info.update = None
    if old is None:
        rec.state = "dead"
        store.update_vm(rec)
        return rec
    with contextlib.suppress(VmforkError):
        info = await old.qmp("query-migrate")
        if info.get("status") not in (None, "none", *migration.FINAL):
            await old.qmp("migrate_cancel")
    with contextlib.suppress(VmforkError):
        await migration.set_capabilities(old, x_ignore_shared=False)
        await migration.set_parameters(old, mode="normal")
    if was_running and old_st in ("paused", "postmigrate"):
        await old.resume()
    status = await old.status()
    if status not in ("running", "paused"):
        raise StateError(f"{rec.name}: after an interrupted update the old QEMU is {status}")
    rec.state = status
    store.update_vm(rec)
    return rec


async def recover_interrupted(store: Store, timeouts: Timeouts = DEFAULT) -> list[str]:
    """Recover every ``updating`` VM that no vmfork command is working on;
    return their names."""
    done = []
    for rec in store.list_vms():
        if rec.state != "updating" and rec.info.retire is None:
            continue
        try:
            with store.lock(rec.name, wait=False):
                rec = store.get_vm(rec.name)
                await recover(store, rec, timeouts)
                done.append(rec.name)
        except StateError:
            continue  # an update is running right now
    return done


__all__ = ["find_qemu", "recover", "recover_interrupted"]
