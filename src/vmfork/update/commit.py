"""The commit of a live update: the new QEMU becomes the VM.

Owns the one sequence that follows "the guest is in the new QEMU", whether a
live update (:mod:`vmfork.update.live`) just moved it or the recovery of an
interrupted one (:mod:`vmfork.update.recovery`) found it there:

1. clear the migration capability on the new QEMU, hand the host port
   forwards that the old QEMU still holds over to it, and resume the guest
   if it ran before the update (no-ops after a live update, which did both);
2. record the new spec, pid, generation and update count, drop the update
   intent and, while the old QEMU still lives, note it as retired
   (``info.retire``), so that a vmfork killed from here on leaves a record
   the next command can finish (:func:`vmfork.update.recovery.retire_old`);
3. end the old QEMU, then forget it;
4. remove the move's sockets and the old memory file of a copy update, and
   give the new QEMU any port forward it still lacks.
"""

from __future__ import annotations

import contextlib
import logging
import os

from vmfork.errors import VmforkError
from vmfork.qemu import migration
from vmfork.qemu.machine import Machine
from vmfork.records import RetiredQemu, UpdateIntent, VMRecord
from vmfork.spec import VMSpec
from vmfork.store import Store
from vmfork.update import forwards
from vmfork.update.modes import memory_kind
from vmfork.update.move import remove_move_sockets

log = logging.getLogger("vmfork.update")


async def commit(store: Store, rec: VMRecord, new: Machine, old: Machine | None,
                 intent: UpdateIntent) -> list[str]:
    """Make *new* (holding the guest, state loaded) VM *rec*'s QEMU and end
    *old* (None: it is gone). The caller holds the VM's lock. Updates and
    stores *rec*; returns warnings about what could not be cleaned up."""
    warnings: list[str] = []
    with contextlib.suppress(VmforkError):
        await migration.set_capabilities(new, x_ignore_shared=False)
    if old is not None and old.alive():
        warnings += await forwards.hand_over(old, new, intent.spec.net)
    status = await new.status()
    if intent.was_running and status == "paused":
        await new.resume()
        status = await new.status()
    old_spec, old_gen = rec.spec, rec.info.gen
    rec.spec = intent.spec
    rec.pid, rec.pid_start = new.pid, new.start_time
    rec.state = "running" if status == "running" else "paused"
    rec.info.gen = intent.gen
    rec.info.updates += 1
    rec.info.update = None
    if intent.mode == "copy":
        rec.info.owns_memory = True
    rec.info.retire = (RetiredQemu(pid=old.pid, pid_start=old.start_time, gen=old_gen)
                       if old is not None and old.alive() else None)
    store.update_vm(rec)
    if old is not None:
        try:
            await old.shutdown()
        except VmforkError as exc:
            warnings.append(f"the old QEMU (pid {old.pid}) did not end: {exc}")
        else:
            if rec.info.retire is not None:
                rec.info.retire = None
                store.update_vm(rec)
    remove_move_sockets(store, rec.name, intent.gen)
    if intent.mode == "copy":
        remove_old_memory(intent.spec, old_spec, warnings)
    warnings += await forwards.ensure(new, intent.spec.net)
    return warnings


def remove_old_memory(new: VMSpec, old: VMSpec, warnings: list[str]) -> None:
    """Remove the VM's own memory file that a copy update left behind (a
    template's file, mapped privately, is not the VM's and stays)."""
    mem = old.memory
    if memory_kind(mem) == "shared-file" and mem.path and mem.path != new.memory.path:
        try:
            os.unlink(mem.path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            warnings.append(f"old memory file {mem.path} not removed: {exc.strerror}")


__all__ = ["commit", "remove_old_memory"]
