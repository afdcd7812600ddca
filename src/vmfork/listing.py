"""The public view of the VMs in the catalog (``vmfork ls``, ``host.ls()``).

Listing only reads: a VM whose QEMU process is gone shows as ``dead``, one
whose launch was abandoned (the vmfork that started it was killed before it
was ready) as ``abandoned``, but its record is left as it is (the next
operation on it records that, or undoes the launch: :mod:`vmfork.launch`). Kept
light on imports (no asyncio, no QMP, no psutil; the record types are loaded
with the first record), so that ``vmfork ls`` starts fast."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

from vmfork import proc

if TYPE_CHECKING:
    from vmfork.records import VMRecord
    from vmfork.results import VMStatus
    from vmfork.store import Store

#: States in which a VM has (or is about to have) a QEMU process.
LIVE_STATES = ("starting", "running", "paused", "updating")
#: What listing shows for a VM whose launch was abandoned (never in the catalog).
ABANDONED = "abandoned"


def launch_abandoned(rec: VMRecord) -> bool:
    """True if the launch that creates *rec* is in flight and the vmfork
    process running it is gone."""
    launcher = rec.info.launcher
    return launcher is not None and not proc.process_alive(launcher.pid, launcher.start)


def observed_state(rec: VMRecord) -> str:
    """The record's state; ``abandoned`` when its launch was abandoned
    (:func:`launch_abandoned`); ``dead`` when it says live and its QEMU is
    gone. An ``updating`` VM stays ``updating``: its guest may live in the
    new QEMU (see :mod:`vmfork.update.recovery`)."""
    if launch_abandoned(rec):
        return ABANDONED
    if (rec.state in LIVE_STATES and rec.state != "updating"
            and not proc.process_alive(rec.pid, rec.pid_start)):
        return "dead"
    return rec.state


def describe(rec: VMRecord) -> VMStatus:
    """The public view of one catalog record."""
    from vmfork.results import VMStatus

    spec = rec.spec
    state = observed_state(rec)
    return VMStatus(name=rec.name, state=state, pid=rec.pid,
                    memory_mib=spec.memory_mib, memory_file=spec.memory.path,
                    template=rec.template, accel=spec.accel,
                    age_seconds=time.time() - rec.created, boot_seconds=rec.info.boot_seconds,
                    ports=spec.net.ports if spec.net else (), ready=spec.ready,
                    agent=rec.info.agent,
                    os=(rec.info.guest_os or {}).get("pretty-name"),
                    cause=death_cause(rec) if state == "dead" else None,
                    idle_pause=rec.info.idle_pause,
                    idle=state == "paused" and rec.info.idle_since is not None)


def death_cause(rec: VMRecord) -> str | None:
    """Why VM *rec*, whose QEMU is gone, died, when vmfork can tell: it
    mapped the memory of a lazily pulled template whose memory server could
    not fetch it (``broken``: a read failed, so QEMU got SIGBUS)."""
    path = rec.spec.memory.path
    if not path:
        return None
    mem = Path(path)
    if mem.parent.name != "mnt":
        return None
    from vmfork.lazy.lifecycle import BROKEN, read_status

    status = read_status(mem.parent.parent)
    if status is None or status.state != BROKEN or not status.cause:
        return None
    return f"its memory could not be fetched: {status.cause}"


def statuses(store: Store) -> list[VMStatus]:
    """Every VM of *store*, oldest first."""
    return [describe(r) for r in store.list_vms()]
