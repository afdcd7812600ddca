"""The templates that exist, who uses them, and removing one.

Owns looking templates up (:func:`get`), what ``vmfork template ls`` shows of
each (:func:`status_of`, :func:`statuses`: ready, ``creating`` or
``removing``), who depends on a template (its clones: :func:`users`;
templates made from its clones: :func:`children_of`), the template's lock
(:func:`locked`: held by whoever makes, removes or recovers it), and
:func:`remove`, which deletes a template with its files only when nothing
uses it.

Removal is crash-safe: the template is first marked ``removing`` (from then
on clones and pools refuse it), then its clones and pool members are
stopped, then its files deleted, and its row goes last; a removal whose
vmfork died is finished by the next command (:func:`finish_removal`, called
by :mod:`vmfork.templates.recovery`). A template is never clonable with
half of its files gone. A pulled template's FUSE server is ended and its
mount removed before its directory (:mod:`vmfork.lazy.lifecycle`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

from vmfork import vm
from vmfork.checkpoints import checkpoint
from vmfork.errors import NotFound, StateError
from vmfork.lazy import lifecycle
from vmfork.names import check_name, pool_lock, template_lock
from vmfork.proc import process_start_time
from vmfork.records import TEMPLATE_CREATING, TEMPLATE_READY, TemplateManifest, TemplateWork
from vmfork.results import TemplateStatus
from vmfork.store import Store
from vmfork.tasks import finish_in_thread
from vmfork.templates import pool
from vmfork.templates.manifest import template_dir
from vmfork.timeouts import DEFAULT, Timeouts

log = logging.getLogger("vmfork.template")


@contextlib.asynccontextmanager
async def locked(store: Store, name: str) -> AsyncIterator[None]:
    """Hold the lock of template *name* (whoever makes, removes or recovers
    it holds it for the whole operation); refused at once if another command
    holds it, with the conflict it is working on."""
    async with contextlib.AsyncExitStack() as stack:
        try:
            await stack.enter_async_context(store.lock_async(template_lock(name), wait=False))
        except StateError:
            found = store.template_work(name)
            if found is not None and found[1] is not None:
                raise store.template_conflict(name) from None
            raise StateError(f"template {name} is busy: another vmfork command is "
                             "working on it") from None
        yield


def get(store: Store, name: str) -> TemplateManifest:
    """The manifest of template *name* (NotFound if there is none)."""
    return store.get_template(check_name(name, "template"))


def children_of(store: Store, template: str) -> list[str]:
    """Templates made from clones of *template* (its ``parent``)."""
    return [m.name for m in store.list_templates() if m.parent == template]


def users(store: Store, template: str) -> list[str]:
    """VMs created from *template* (clones) that still exist."""
    return [r.name for r in store.list_vms() if r.template == template]


def status(store: Store, manifest: TemplateManifest, state: str = TEMPLATE_READY
           ) -> TemplateStatus:
    """One row of ``vmfork template ls`` (with the source and memory status
    of a pulled template)."""
    tdir = template_dir(store, manifest.name)
    source = lifecycle.pulled_from(tdir)
    lazy = lifecycle.read_status(tdir) if source is not None else None
    return TemplateStatus(name=manifest.name, memory_mib=manifest.memory_size >> 20,
                          state_kib=round(manifest.state_size / 1024),
                          clones=len(users(store, manifest.name)),
                          pool=store.pool_target(manifest.name), qemu=manifest.qemu_version,
                          age_seconds=round(time.time() - manifest.created), status=state,
                          source=source, state=lazy.state if lazy else None,
                          local_percent=round(lazy.local_percent, 1) if lazy else None,
                          fetched_bytes=lazy.fetched_bytes if lazy else None,
                          cause=lazy.cause if lazy else None)


def status_of(store: Store, name: str) -> TemplateStatus:
    """The ``template ls`` row of template *name*, whatever its state."""
    found = store.template_work(check_name(name, "template"))
    if found is None:
        raise NotFound(f"no template named {name!r}")
    state, work = found
    if state != TEMPLATE_CREATING or work is None:
        return status(store, store.get_template(name, usable=False), state)
    source = work.source_vm
    mib = store.get_vm(source).spec.memory_mib if source and store.has_vm(source) else 0
    return TemplateStatus(name=name, memory_mib=mib, state_kib=0, clones=0, pool=0,
                          qemu=work.qemu_version or "",
                          age_seconds=round(time.time() - work.started), status=state)


def statuses(store: Store) -> list[TemplateStatus]:
    """Every template, oldest first (those being made or removed too)."""
    rows = []
    for name in store.template_names():
        with contextlib.suppress(NotFound):  # removed meanwhile
            rows.append(status_of(store, name))
    return rows


async def remove(store: Store, name: str, force: bool = False,
                 timeouts: Timeouts = DEFAULT) -> None:
    """Delete a template with its files (memory, state, disk overlays);
    refuse while clones or pool members use it (*force* stops them) and,
    even with *force*, while another template was made from one of its
    clones. Marked ``removing`` before anything is stopped or deleted.
    With *force*, the fork bases made from its clones go first, with their
    VMs (:mod:`vmfork.fork.base`: vmfork's own templates)."""
    check_name(name, "template")
    if force:
        for child in children_of(store, name):
            if child.startswith("_fork."):
                with contextlib.suppress(NotFound):
                    await remove(store, child, force=True, timeouts=timeouts)
    async with locked(store, name):
        found = store.template_work(name)
        if found is None:
            raise NotFound(f"no template named {name!r}")
        state, work = found
        if state == TEMPLATE_CREATING:
            raise store.template_conflict(name)
        if state == TEMPLATE_READY or work is None:
            manifest = store.get_template(name)
            children = children_of(store, name)
            if children:
                raise StateError(f"template {name} has child templates "
                                 f"({', '.join(children)}) made from its clones; "
                                 "remove them first")
            clones = users(store, name)
            members = store.pool_members(name)
            if (clones or members) and not force:
                what = []
                if clones:
                    what.append(f"clones {', '.join(clones)}")
                if members:
                    what.append(f"{len(members)} pool processes")
                raise StateError(f"template {name} is in use by {' and '.join(what)}; "
                                 "stop them or use --force")
            work = TemplateWork(name=name, op="remove", pid=os.getpid(),
                                pid_start=process_start_time(os.getpid()),
                                started=time.time(), directory=str(template_dir(store, name)),
                                memory_file=manifest.memory_file)
            if not store.mark_template_removing(work):
                raise StateError(f"template {name} changed meanwhile; try again")
            await checkpoint("template-rm.marked")
        await finish_removal(store, work, timeouts)


async def finish_removal(store: Store, work: TemplateWork, timeouts: Timeouts = DEFAULT
                         ) -> None:
    """Remove the template that *work* marked ``removing``: stop its clones
    and pool members, delete its files, then its row. Each step may be
    repeated (after a crash). The caller holds the template's lock."""
    name = work.name
    for c in users(store, name):
        await vm.stop(store, c, force=True, timeouts=timeouts)
    # Under the pool lock: no member is spawned meanwhile, and a keeper
    # (vmfork.templates.pool.keep) finds the template gone and ends.
    async with store.lock_async(pool_lock(name)):
        store.set_pool_target(name, 0)
        for member in store.pool_members(name):
            if store.take_pool_member(member.id):
                await pool.kill_member(store, member)
    await checkpoint("template-rm.stopped")
    tdir = Path(work.directory) if work.directory else template_dir(store, name)
    # A pulled template's FUSE server ends and its memory is unmounted first
    # (its memory file may be the served one, inside the directory).
    await finish_in_thread(lifecycle.discard, tdir, timeouts.stop)
    if work.memory_file:
        try:
            os.unlink(work.memory_file)
        except FileNotFoundError:
            pass
        except OSError:  # the served file of a mount that stays: remove_dir says so
            if not Path(work.memory_file).is_relative_to(tdir):
                raise
    await finish_in_thread(lifecycle.remove_dir, tdir, timeouts.stop)
    await checkpoint("template-rm.files-removed")
    store.remove_template(name)
    log.info("template %s: removed", name)
