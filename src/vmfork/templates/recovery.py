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

A pulled template's FUSE server (:mod:`vmfork.lazy.lifecycle`) is a process
of its own that a kill -9 or a reboot ends too: settling a ready template
that was pulled lazily looks whether its server still runs and, if not,
unmounts what it left and starts it again (memory still ``fetching``) or
moves the template onto its complete cache.
"""

from __future__ import annotations

import contextlib
import logging

from vmfork.errors import StateError, VmforkError
from vmfork.lazy import lifecycle
from vmfork.names import check_name
from vmfork.records import TEMPLATE_READY
from vmfork.store import Store
from vmfork.templates import catalog
from vmfork.templates.create import settle_held
from vmfork.templates.manifest import template_dir
from vmfork.timeouts import DEFAULT, Timeouts

log = logging.getLogger("vmfork.template")


async def settle(store: Store, name: str, timeouts: Timeouts = DEFAULT) -> bool:
    """Finish or undo what a dead vmfork left of template *name*, or repair
    a pulled template whose FUSE server is gone; True if something was
    settled. Cheap when there is nothing (one catalog read)."""
    found = store.template_work(check_name(name, "template"))
    if found is not None and found[0] == TEMPLATE_READY:
        return await _revive(store, name, timeouts)
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


async def _revive(store: Store, name: str, timeouts: Timeouts) -> bool:
    """Repair ready template *name* if it was pulled lazily and its FUSE
    server is gone (:func:`vmfork.lazy.lifecycle.revive`: restarted, or
    moved onto its complete cache); under the template's lock, skipped if
    another command holds it."""
    tdir = template_dir(store, name)
    if not lifecycle.is_pulled(tdir):
        return False
    try:
        manifest = store.get_template(name)
    except VmforkError:
        return False
    if not lifecycle.needs_revival(tdir, manifest):
        return False
    async with contextlib.AsyncExitStack() as stack:
        try:
            await stack.enter_async_context(catalog.locked(store, name))
        except StateError:
            return False
        try:
            manifest = store.get_template(name)
            if not lifecycle.needs_revival(tdir, manifest):
                return False
            done = await lifecycle.revive(store, tdir, manifest, timeouts.start)
        except VmforkError as exc:
            log.warning("template %s: its FUSE server could not be started again: %s",
                        name, exc)
            return False
        log.info("template %s: memory server repaired (%s)", name, done)
        return True
    return False


async def settle_all(store: Store, timeouts: Timeouts = DEFAULT) -> list[str]:
    """Settle every template with work left by a dead vmfork, and every
    pulled template whose FUSE server is gone; return their names."""
    done = [work.name for _state, work in store.template_works()
            if await settle(store, work.name, timeouts)]
    for manifest in store.list_templates():
        if (lifecycle.is_pulled(template_dir(store, manifest.name))
                and await _revive(store, manifest.name, timeouts)):
            done.append(manifest.name)
    return done


async def settle_vm(store: Store, vm_name: str, timeouts: Timeouts = DEFAULT) -> list[str]:
    """Settle the interrupted creations of templates from VM *vm_name* (which
    may have left it paused or its file systems frozen); return the names of
    the templates settled."""
    return [work.name for _state, work in store.template_works()
            if work.source_vm == vm_name and await settle(store, work.name, timeouts)]


__all__ = ["settle", "settle_all", "settle_vm"]
