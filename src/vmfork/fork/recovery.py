"""Settling a fork that a killed vmfork left behind.

A fork records itself in the parent's record (``info.fork``, a
:class:`~vmfork.records.ForkWork`) before its first step, and its base is
reserved as a template ``creating`` (work ``op="fork"``). When the vmfork
doing it dies, :func:`settle_held` decides from the facts:

* the parent's new QEMU lives and has loaded the state (``paused`` or
  ``running``): **finish** — the base is recorded, the new QEMU becomes the
  parent's (resumed if the guest ran), the old one ends;
* otherwise **undo** (:func:`vmfork.fork.rebase.undo`): the new QEMU is
  killed, the files go back, the old QEMU runs the guest again.

Commands that act on a VM settle it first (with an interrupted update:
:func:`vmfork.update.recovery.settle_held` calls this); a base reservation
found without its fork (the vmfork died before recording it in the parent)
is dropped with its directory by the template's settling
(:mod:`vmfork.templates.recovery`).
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

from vmfork.errors import StateError, VmforkError
from vmfork.fork.base import STATE_FILE
from vmfork.fork.rebase import commit, undo
from vmfork.launch import qemu_log
from vmfork.names import check_name
from vmfork.proc import process_alive
from vmfork.qemu.machine import Machine
from vmfork.records import VMRecord
from vmfork.store import Store
from vmfork.timeouts import DEFAULT, Timeouts
from vmfork.update import forwards

log = logging.getLogger("vmfork.fork")


async def _attach(store: Store, rec: VMRecord, gen: int, pid: int | None,
                  start: float | None, timeouts: Timeouts) -> Machine | None:
    if not pid or not process_alive(pid, start):
        return None
    spec = rec.info.fork.spec if rec.info.fork and gen == rec.info.fork.gen else rec.spec
    with contextlib.suppress(Exception):
        return await Machine.attach(spec, store.run_paths(rec.name, gen),
                                    qemu_log(store, rec.name), pid, timeouts)
    return None


async def settle_held(store: Store, rec: VMRecord, timeouts: Timeouts = DEFAULT) -> VMRecord:
    """Finish or undo the interrupted fork of *rec* (the caller holds its
    lock); return its record. Nothing to do if it has none, or if the vmfork
    doing it still runs."""
    work = rec.info.fork
    if work is None:
        return rec
    if work.pid != os.getpid() and process_alive(work.pid, work.pid_start):
        return rec
    old = await _attach(store, rec, rec.info.gen, rec.pid, rec.pid_start, timeouts)
    new = await _attach(store, rec, work.gen, work.new_pid, work.new_start, timeouts)
    try:
        state = Path(work.directory) / STATE_FILE
        status = await new.status() if new is not None else None
        if new is not None and status in ("paused", "running") and state.is_file():
            if work.was_running and status == "paused":
                await new.resume()
            await commit(store, rec, work, new, old, 0.0)
            for w in await forwards.ensure(new, work.spec.net):
                log.warning("%s: %s", rec.name, w)
            log.warning("%s: an interrupted fork was completed: the guest runs on its base "
                        "%s (pid %d)", rec.name, work.base, new.pid)
        else:
            await undo(store, rec, work, old, new, timeouts)
            log.warning("%s: an interrupted fork was undone", rec.name)
    finally:
        for m in (old, new):
            if m is not None:
                await m.disconnect()
    return store.get_vm(rec.name)


async def settle(store: Store, name: str, timeouts: Timeouts = DEFAULT) -> VMRecord:
    """:func:`settle_held` for a caller that does not hold VM *name*'s lock:
    cheap when there is no fork to settle (one catalog read, no lock)."""
    rec = store.get_vm(check_name(name))
    if rec.info.fork is None:
        return rec
    async with store.lock_async(name):
        return await settle_held(store, store.get_vm(name), timeouts)


async def settle_all(store: Store, timeouts: Timeouts = DEFAULT) -> list[str]:
    """Settle every interrupted fork that no vmfork command is working on;
    return the parents' names."""
    done = []
    for rec in store.list_vms():
        if rec.info.fork is None:
            continue
        with contextlib.ExitStack() as held:
            try:
                held.enter_context(store.lock(rec.name, wait=False))
            except StateError:
                continue  # a command holds the VM's lock: it is not interrupted
            try:
                await settle_held(store, store.get_vm(rec.name), timeouts)
            except VmforkError as exc:
                log.warning("%s: an interrupted fork could not be settled: %s", rec.name, exc)
                continue
            done.append(rec.name)
    return done


__all__ = ["settle", "settle_all", "settle_held"]
