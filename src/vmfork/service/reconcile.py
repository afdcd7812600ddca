"""The daemon's background work: the reconcile loop, and what runs while it serves.

Owns :func:`background` (entered by the application's lifespan: starts the
loop, and on the way out stops the pool keepers and cancels the running
operations, each undoing its half-done work) and :func:`reconcile_once`,
which the loop runs every :data:`RECONCILE_INTERVAL` seconds:

* a launch (run, clone, import) whose vmfork process is gone — a killed CLI
  or a previous daemon killed with SIGKILL — is undone
  (:func:`vmfork.launch.undo_all_abandoned`; a ``stopped`` event with
  ``reason: "abandoned"``);
* a VM whose QEMU died is recorded ``dead`` (:func:`vmfork.vm.reconcile`,
  under the VM's lock) and a ``died`` event is sent, once per death this
  daemon sees; a VM whose lock another command holds is left for the next
  round (a ``vmfork stop`` ends the QEMU before it removes the VM: that is
  no death);
* a running VM left unused for longer than its idle policy is paused
  (:func:`vmfork.idle.sweep`; a ``paused`` event with ``reason: "idle"``);
  its next use resumes it, and a connection to one of its forwarded ports
  too (:class:`vmfork.idle_ports.PortWaker`, kept by the loop);
* every template whose pool has a target gets a keeper
  (:class:`~vmfork.service.pools.PoolKeepers`), whoever set the target;
* a fork whose vmfork process is gone is finished or undone
  (:func:`vmfork.fork.recovery.settle_all`), and fork bases no VM uses any
  more are removed (:func:`vmfork.fork.base.collect`: a ``template_removed``
  event each).

The loop logs and survives any failure of one round.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from vmfork import idle, launch, vm
from vmfork.errors import NotFound, StateError, VmforkError
from vmfork.fork import base as fork_base
from vmfork.fork import recovery as fork_recovery
from vmfork.idle_ports import PortWaker
from vmfork.listing import observed_state
from vmfork.service import events, metrics, operations, pools
from vmfork.service.state import ServiceState
from vmfork.tasks import cancel_all

log = logging.getLogger("vmfork.service.reconcile")

#: Seconds between two rounds of the reconcile loop.
RECONCILE_INTERVAL = 2.0


async def reconcile_once(state: ServiceState, seen_dead: set[str]) -> None:
    """One round (see the module docstring). *seen_dead* holds the VMs this
    daemon has reported dead; it is updated."""
    store = state.host.store
    timeouts = state.host.timeouts
    for name in await launch.undo_all_abandoned(store, timeouts):
        events.publish(state, "stopped", vm=name, reason="abandoned")
    names = set()
    for rec in store.list_vms():
        names.add(rec.name)
        if observed_state(rec) != "dead":
            seen_dead.discard(rec.name)
            continue
        if rec.state != "dead" and not await _record_dead(state, rec.name):
            continue  # a command holds it (a stop, say), or it is gone: next round
        if rec.name not in seen_dead:
            seen_dead.add(rec.name)
            log.warning("%s: its QEMU (pid %s) is gone", rec.name, rec.pid)
            events.publish(state, "died", vm=rec.name, pid=rec.pid, template=rec.template)
    seen_dead &= names
    for name in await idle.sweep(store, timeouts):
        events.publish(state, "paused", vm=name, reason="idle")
    await fork_recovery.settle_all(store, timeouts)
    for name in await fork_base.collect(store, timeouts):
        events.publish(state, "template_removed", template=name, reason="unused fork base")
    keepers = pools.keepers_of(state)
    for name in store.template_names():
        with contextlib.suppress(NotFound):
            if store.pool_target(name) > 0:
                keepers.ensure(name)


async def _record_dead(state: ServiceState, name: str) -> bool:
    """Record VM *name* dead if it still is, under its lock; False if another
    command holds the lock, or the VM is gone or alive after all."""
    store = state.host.store
    try:
        async with store.lock_async(name, wait=False):
            rec = store.get_vm(name)
            if observed_state(rec) != "dead":
                return False
            vm.reconcile(store, rec)
            return True
    except (StateError, NotFound):
        return False


async def _loop(state: ServiceState) -> None:
    seen_dead: set[str] = set()
    waker = PortWaker(state.host.store, state.host.timeouts)
    try:
        await _rounds(state, seen_dead, waker)
    finally:
        await waker.close()


async def _rounds(state: ServiceState, seen_dead: set[str], waker: PortWaker) -> None:
    first = True
    while not state.stopping.is_set():
        try:
            if first:  # VMs dead before the daemon started are no news
                seen_dead.update(r.name for r in state.host.store.list_vms()
                                 if observed_state(r) == "dead")
                first = False
            await reconcile_once(state, seen_dead)
            await waker.round()
        except VmforkError as exc:
            log.warning("reconcile: %s", exc)
        except Exception:
            log.exception("reconcile failed")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(RECONCILE_INTERVAL):
                await state.stopping.wait()


@contextlib.asynccontextmanager
async def background(state: ServiceState) -> AsyncIterator[None]:
    """Run the reconcile loop while the daemon serves; on the way out, stop
    the pool keepers and the running operations (each cleans up)."""
    metrics.metrics_of(state)  # counts the operations from the first one on
    task = asyncio.create_task(_loop(state), name="reconcile")
    try:
        yield
    finally:
        state.stopping.set()
        await cancel_all([task])
        await pools.keepers_of(state).stop_all()
        await operations.operations_of(state).cancel_all()


__all__ = ["RECONCILE_INTERVAL", "background", "reconcile_once"]
