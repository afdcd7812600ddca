"""Settling template work that a killed vmfork left behind.

A ``template create`` reserves its name before any work and a ``template
rm`` marks the template ``removing`` before it stops or deletes anything
(:class:`~vmfork.records.TemplateWork` in the template's catalog row). When
the vmfork doing it dies (kill -9, a crash), the row stays, and so may a
paused or frozen source VM. Settling finds such rows whose owner is gone —
the template's lock is free and the recorded pid (with its start time) no
longer runs — and finishes or undoes them:
:func:`vmfork.templates.create.resolve` for a creation (finish after a
complete save whose QEMU ended; otherwise undo: the source VM resumed and
thawed, or removed if the creation made it),
:func:`vmfork.templates.catalog.finish_removal` for a removal.

Settling is an explicit step of the commands that touch templates or a VM
(the public API calls it first: ``template ls``, ``create``, ``rm``,
``clone``, ``pool``, and the operations on a VM, which settle a creation
from that VM). Work whose owner still runs is left alone and shows as
``creating`` or ``removing``. Never raises for work it cannot settle: it
logs and leaves it for the next command.
"""

from __future__ import annotations

import contextlib
import logging

from vmfork.errors import StateError, VmforkError
from vmfork.names import check_name
from vmfork.store import Store
from vmfork.templates import catalog
from vmfork.templates.create import settle_held
from vmfork.timeouts import DEFAULT, Timeouts

log = logging.getLogger("vmfork.template")


async def settle(store: Store, name: str, timeouts: Timeouts = DEFAULT) -> bool:
    """Finish or undo what a dead vmfork left of template *name*; True if
    something was settled. Cheap when there is nothing (one catalog read)."""
    found = store.template_work(check_name(name, "template"))
    if found is None or found[1] is None:
        return False
    async with contextlib.AsyncExitStack() as stack:
        try:
            await stack.enter_async_context(catalog.locked(store, name))
        except StateError:
            return False  # another command works on it: nothing to settle
        try:
            return await settle_held(store, name, timeouts)
        except VmforkError as exc:
            log.warning("template %s: interrupted work could not be settled: %s", name, exc)
    return False


async def settle_all(store: Store, timeouts: Timeouts = DEFAULT) -> list[str]:
    """Settle every template with work left by a dead vmfork; return their names."""
    return [work.name for _state, work in store.template_works()
            if await settle(store, work.name, timeouts)]


async def settle_vm(store: Store, vm_name: str, timeouts: Timeouts = DEFAULT) -> list[str]:
    """Settle the interrupted creations of templates from VM *vm_name* (which
    may have left it paused or its file systems frozen); return the names of
    the templates settled."""
    return [work.name for _state, work in store.template_works()
            if work.source_vm == vm_name and await settle(store, work.name, timeouts)]


__all__ = ["settle", "settle_all", "settle_vm"]
