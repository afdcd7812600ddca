"""Idle auto-pause: a VM nobody uses is paused, and the next use wakes it.

Owns the policy (``VMInfo.idle_pause``: seconds without use, None = never;
a template's, the default of its clones, beside its manifest in the
catalog), what counts as use, the watcher's round (:func:`sweep`,
:func:`keep`) and the wake-up (:func:`in_use`).

A *use* is what vmfork does in a guest for someone: a command (exec,
streamed exec), a file in or out, a console session. It holds the VM's use
lock (a shared ``flock`` on ``run/NAME/use.lock``) while it runs and stamps
``run/NAME/used`` (its mtime is the VM's last use) as it starts and ends.
Any vmfork process may use a VM (CLI, daemon, a library user); a killed one
drops its lock with it.

The watcher (the daemon's reconcile loop, or ``vmfork idle --keep``:
:func:`vmfork.idle_ports.keep`) pauses a running VM with a policy whose last
use is older than the policy says. It skips a VM in use (it takes the use
lock exclusively, without waiting), held by a command (the VM's lock,
without waiting: an update, a save, a stop) or with a TCP connection open
in its user-mode network (a connection through a port forward is a use
vmfork does not see otherwise), pauses QEMU (QMP ``stop``: the vCPUs no
longer run, so the VM costs no CPU), takes its port forwards away from QEMU
(:mod:`vmfork.idle_ports` wakes the VM on a connection) and records
``paused`` with ``info.idle_since``.

A use of a VM paused that way resumes it first (QMP ``cont``), gives QEMU its
port forwards back and sets its guest clock, which stood still while it was
paused, before doing its own work. ``vmfork resume`` of it works as for any
paused VM; a pause the user asked for (``vmfork pause``) is not undone by a
use.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

from vmfork import locking, vm
from vmfork.checkpoints import checkpoint
from vmfork.errors import NotFound, StateError, VmforkError
from vmfork.launch import attach
from vmfork.names import check_name
from vmfork.private import opener
from vmfork.qemu.machine import Machine
from vmfork.records import VMRecord
from vmfork.snapshots.save import sync_guest_clock
from vmfork.store import Store
from vmfork.tasks import run_to_end
from vmfork.timeouts import DEFAULT, Timeouts
from vmfork.update import forwards
from vmfork.vm import check_idle_pause

log = logging.getLogger("vmfork.idle")


async def set_policy(store: Store, name: str, seconds: float | None) -> str:
    """Give VM or template *name* the idle policy *seconds* (None: never);
    returns ``vm`` or ``template``. A template's applies to clones made
    from then on."""
    seconds = check_idle_pause(seconds)
    check_name(name)
    try:
        async with store.lock_async(name):
            rec = store.get_vm(name)
            rec.info.idle_pause = seconds
            store.update_vm(rec)
        return "vm"
    except NotFound:
        pass
    store.set_template_idle_pause(name, seconds)
    return "template"


def _stamp_path(store: Store, name: str) -> Path:
    return store.run_dir(name) / "used"


def _stamp(store: Store, name: str) -> None:
    """Mark VM *name* used now."""
    path = _stamp_path(store, name)
    try:
        os.utime(path)
    except FileNotFoundError:
        with contextlib.suppress(FileNotFoundError):  # the VM's directory is gone
            os.close(opener(str(path), os.O_WRONLY | os.O_CREAT))


def last_use(store: Store, rec: VMRecord) -> float:
    """Wall-clock time VM *rec* was last used; a VM never used counts as
    used when the watcher first looks at it (its stamp is made then)."""
    try:
        return os.stat(_stamp_path(store, rec.name)).st_mtime
    except FileNotFoundError:
        _stamp(store, rec.name)
        return time.time()


def _use_lock(store: Store, name: str) -> Path:
    return store.run_dir(name) / "use.lock"


@contextlib.asynccontextmanager
async def in_use(store: Store, name: str,
                 timeouts: Timeouts = DEFAULT) -> AsyncIterator[VMRecord]:
    """Use the live VM *name* for the ``async with`` block: woken first if
    idle-paused (see the module docstring); the watcher leaves it alone
    until the block ends. Yields its record."""
    vm.get_live(store, name)  # a clear error for a VM that is gone or stopped
    lockf = await locking.acquire_async(
        _use_lock(store, name), timeouts.qmp, f"{name}: being paused for idling", shared=True)
    try:
        _stamp(store, name)
        rec = vm.get_live(store, name)
        if rec.state == "paused" and rec.info.idle_since is not None:
            rec = await wake(store, name, timeouts)
        try:
            yield rec
        finally:
            _stamp(store, name)
    finally:
        lockf.close()


@contextlib.contextmanager
def using(store: Store, name: str, timeouts: Timeouts = DEFAULT) -> Iterator[None]:
    """Hold VM *name* in use for a block that does not wake it (a console
    session, once :func:`in_use` has woken the VM)."""
    lockf = locking.acquire(_use_lock(store, name), timeouts.qmp,
                            f"{name}: being paused for idling", shared=True)
    try:
        _stamp(store, name)
        yield
    finally:
        _stamp(store, name)
        lockf.close()


async def wake(store: Store, name: str, timeouts: Timeouts = DEFAULT) -> VMRecord:
    """Resume VM *name* if it is idle-paused, and set its guest clock."""
    async with store.lock_async(name, wait=timeouts.qmp):
        rec = vm.get_live(store, name)
        if rec.state != "paused" or rec.info.idle_since is None:
            return rec
        slept = time.time() - rec.info.idle_since
        m = await attach(store, rec, timeouts)
        try:
            await vm.resume_held(store, rec, m)
        finally:
            await m.disconnect()
    await sync_guest_clock(store, rec, timeouts)
    log.info("%s: woken after %.1f s paused for idling", name, slept)
    return rec


async def sweep(store: Store, timeouts: Timeouts = DEFAULT) -> list[str]:
    """One round of the watcher: pause every running VM that has been idle
    for longer than its policy says; returns their names."""
    paused = []
    for rec in store.list_vms():
        if rec.info.idle_pause is None or rec.state != "running":
            continue
        if time.time() - last_use(store, rec) < rec.info.idle_pause:
            continue
        try:
            if await _pause_idle(store, rec.name, timeouts):
                paused.append(rec.name)
        except VmforkError as exc:
            log.warning("%s: not paused for idling: %s", rec.name, exc)
    return paused


async def _undo_pause(store: Store, rec: VMRecord, m: Machine) -> None:
    """Resume a VM whose pause for idling failed half-way, as it was."""
    with contextlib.suppress(VmforkError):
        await m.resume()
        await forwards.ensure(m, rec.spec.net)
    rec.state, rec.info.idle_since = "running", None
    store.update_vm(rec)


async def _pause_idle(store: Store, name: str, timeouts: Timeouts) -> bool:
    """Pause VM *name* for idling, unless it is in use or held by a command
    (then False: the next round looks again)."""
    try:
        lockf = locking.acquire(_use_lock(store, name), 0, "in use")
    except (StateError, FileNotFoundError):
        return False
    try:
        async with store.lock_async(name, wait=False):
            rec = store.get_vm(name)
            idle = rec.info.idle_pause
            if rec.state != "running" or idle is None or time.time() - last_use(store, rec) < idle:
                return False
            m = await attach(store, rec, timeouts)
            try:
                if await m.status() != "running":
                    return False
                if rec.spec.net is not None and await forwards.connections(m):
                    _stamp(store, name)  # a connection through a forward is a use
                    return False
                # Recorded first: a watcher killed from here on leaves a VM
                # that its next use wakes (``cont`` of a running QEMU is harmless).
                rec.state, rec.info.idle_since = "paused", time.time()
                store.update_vm(rec)
                try:
                    await checkpoint("idle.recorded")
                    await m.pause()
                    await checkpoint("idle.paused")
                    await forwards.detach(m, rec.spec.net)
                except BaseException:
                    await run_to_end(_undo_pause(store, rec, m))
                    raise
            finally:
                await m.disconnect()
    except (StateError, NotFound):
        return False
    finally:
        lockf.close()
    log.info("%s: paused after %.0f s without use", name, idle)
    return True


__all__ = ["in_use", "last_use", "set_policy", "sweep", "using", "wake"]
