"""The templates that exist, who uses them, and removing one.

Owns looking templates up (:func:`get`), what ``vmfork template ls`` shows of
each (:func:`status`, :func:`statuses`), who depends on a template (its
clones: :func:`users`; templates made from its clones: :func:`children_of`),
and :func:`remove`, which deletes a template with its files only when nothing
uses it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time

from vmfork import vm
from vmfork.errors import StateError
from vmfork.names import check_name, pool_lock
from vmfork.records import TemplateManifest
from vmfork.results import TemplateStatus
from vmfork.store import Store
from vmfork.templates import pool
from vmfork.templates.manifest import template_dir
from vmfork.timeouts import DEFAULT, Timeouts

log = logging.getLogger("vmfork.template")


def get(store: Store, name: str) -> TemplateManifest:
    """The manifest of template *name* (NotFound if there is none)."""
    return store.get_template(check_name(name, "template"))


def children_of(store: Store, template: str) -> list[str]:
    """Templates made from clones of *template* (its ``parent``)."""
    return [m.name for m in store.list_templates() if m.parent == template]


def users(store: Store, template: str) -> list[str]:
    """VMs created from *template* (clones) that still exist."""
    return [r.name for r in store.list_vms() if r.template == template]


def status(store: Store, manifest: TemplateManifest) -> TemplateStatus:
    """One row of ``vmfork template ls``."""
    return TemplateStatus(name=manifest.name, memory_mib=manifest.memory_size >> 20,
                          state_kib=round(manifest.state_size / 1024),
                          clones=len(users(store, manifest.name)),
                          pool=store.pool_target(manifest.name), qemu=manifest.qemu_version,
                          age_seconds=round(time.time() - manifest.created))


def statuses(store: Store) -> list[TemplateStatus]:
    """Every template, oldest first."""
    return [status(store, m) for m in store.list_templates()]


async def remove(store: Store, name: str, force: bool = False,
                 timeouts: Timeouts = DEFAULT) -> None:
    """Delete a template with its files (memory, state, disk overlays);
    refuse while clones or pool members use it (*force* stops them) and,
    even with *force*, while another template was made from one of its clones."""
    manifest = get(store, name)
    children = children_of(store, name)
    if children:
        raise StateError(f"template {name} has child templates ({', '.join(children)}) "
                         "made from its clones; remove them first")
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
    for c in clones:
        await vm.stop(store, c, force=True, timeouts=timeouts)
    # Under the pool lock: no member is spawned meanwhile, and a keeper
    # (vmfork.templates.pool.keep) finds the template gone and ends.
    async with store.lock_async(pool_lock(name)):
        store.set_pool_target(name, 0)
        for member in store.pool_members(name):
            if store.take_pool_member(member.id):
                await pool.kill_member(store, member)
        store.remove_template(name)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(manifest.memory_file)
    shutil.rmtree(template_dir(store, name), ignore_errors=True)
    log.info("template %s: removed", name)
