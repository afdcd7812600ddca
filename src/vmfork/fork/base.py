"""Fork bases: the frozen state a fork leaves behind, as an internal template.

Owns what a fork base is and how long it lives. A fork freezes its
parent's RAM (a memory file), device state and disk overlays at one instant;
the children are clones of that frozen state and the parent maps it too,
copy-on-write, from its new QEMU. So the frozen state is a template
(:class:`~vmfork.records.TemplateManifest` with ``fork_of`` set, named
``_fork.<hex>`` in vmfork's own namespace, its device state loaded without
``x-ignore-shared``), and the parent and the children are its clones.

A fork base is vmfork's, not the user's: it is removed as soon as no VM,
pool member or other template depends on it (:func:`collect`, called after
a VM is stopped), and removing the template a forked VM came from removes
the fork bases made from it with their VMs (``template rm --force``).
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import time
from dataclasses import replace
from pathlib import Path

from vmfork.errors import StateError, VmforkError
from vmfork.names import InternalName, internal
from vmfork.records import ForkWork, TemplateDisk, TemplateManifest, TemplateSave
from vmfork.results import MigrationStats
from vmfork.spec import MemorySpec, VMSpec
from vmfork.store import Store
from vmfork.templates.manifest import disk_record
from vmfork.timeouts import DEFAULT, Timeouts

log = logging.getLogger("vmfork.fork")

#: The device state in a fork base's directory.
STATE_FILE = "state"


def new_name() -> InternalName:
    """A fresh fork base name, ``_fork.<8 hex>``."""
    return internal("fork", secrets.token_hex(4))


def is_fork_base(manifest: TemplateManifest) -> bool:
    return manifest.fork_of is not None


def manifest_for(work: ForkWork, parent_spec: VMSpec, source_vm: str, guest: str | None,
                 agent: str | None, state_size: int, state_sha256: str,
                 save_seconds: float) -> TemplateManifest:
    """The manifest of the base of fork *work*, once the parent's old QEMU
    has written its last byte (the disk layers are final)."""
    tdir = Path(work.directory)
    mem = Path(work.memory_to)
    base_disks = dict(work.disks)
    disks = []
    entries: list[TemplateDisk] = []
    for i, d in enumerate(parent_spec.disks):
        moved = base_disks.get(d.path)
        if moved is None:  # a read-only image, shared as it is
            disks.append(d)
            continue
        disks.append(replace(d, path=moved, readonly=False))
        entries.append(disk_record(Path(moved), i, d.backing))
    spec = parent_spec.with_(name=work.base, machine=work.machine, disks=tuple(disks),
                             memory=MemorySpec(backend="file", path=str(mem), share=False,
                                               readonly=True))
    stats = MigrationStats("completed", save_seconds, None, None, 0, state_size)
    # The base depends on the parent's earlier template only through disks:
    # its memory is a file of its own.
    return TemplateManifest(
        name=work.base, created=time.time(), source_vm=source_vm,
        parent=work.template if entries else None,
        memory_file=str(mem), memory_size=mem.stat().st_size,
        state_file=str(tdir / STATE_FILE), state_size=state_size, state_sha256=state_sha256,
        qemu_version=work.qemu_version, machine=work.machine, qemu=parent_spec.qemu,
        spec=spec, guest=guest or "demo", save=TemplateSave(stats, 0.0, save_seconds),
        disks=tuple(entries), agent=agent, fork_of=source_vm, ignore_shared=False)


def unused(store: Store) -> list[str]:
    """Fork bases no VM, pool member or template depends on."""
    templates = store.list_templates()
    used = {r.template for r in store.list_vms() if r.template}
    used |= {m.parent for m in templates if m.parent}
    used |= {m.template for m in store.pool_members()}
    return [m.name for m in templates if is_fork_base(m) and m.name not in used]


async def collect(store: Store, timeouts: Timeouts = DEFAULT) -> list[str]:
    """Remove every unused fork base (and then those it alone kept); return
    their names. A base someone else is working on is left for later."""
    from vmfork.templates import catalog

    removed: list[str] = []
    while True:
        todo = [n for n in unused(store) if n not in removed]
        if not todo:
            return removed
        for name in todo:
            with contextlib.suppress(StateError):
                try:
                    await catalog.remove(store, name, timeouts=timeouts)
                except VmforkError as exc:
                    log.warning("fork base %s: not removed: %s", name, exc)
                    continue
                removed.append(name)
                log.info("fork base %s: removed (no VM uses it)", name)
        if not any(n in removed for n in todo):
            return removed


__all__ = ["STATE_FILE", "collect", "is_fork_base", "manifest_for", "new_name", "unused"]
