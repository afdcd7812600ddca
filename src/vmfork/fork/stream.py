"""A VM's device state without its RAM, as a stream QEMU loads like any other.

Owns :func:`save_devices`. ``x-ignore-shared`` leaves RAM out of a migration
stream only when it is a shared memory file; a VM whose RAM is a private
copy-on-write mapping (a clone, a forked VM) would have all of it written.
QEMU's ``xen-save-devices-state`` writes the device state alone whatever the
RAM is, but its stream lacks the configuration section that
``migrate-incoming`` requires (``Configuration section missing``). This
module adds it — the machine type, QEMU's ``configuration`` vmstate — and
the device description QEMU expects after the end marker, so that a new
QEMU loads the file with ``migrate-incoming file:...`` (with no migration
capability set), exactly like a template's state.

With ``live: true`` and the guest paused, QEMU also inactivates the VM's
block devices (flushed, locks released) for the QEMU that loads the state,
as a migration does at its end; ``cont`` on the same QEMU takes them back.
"""

from __future__ import annotations

import contextlib
import os
import struct
from pathlib import Path

from vmfork.errors import MigrationError
from vmfork.qemu import migration
from vmfork.qemu.machine import Machine, deadline

_MAGIC = b"QEVM"
_VERSION = 3
_CONFIGURATION = 0x07
_VMDESCRIPTION = 0x06
_EOF = 0x00
_VMDESC = b'{"page_size": 4096, "devices": []}'


def configured(body: bytes, machine: str) -> bytes:
    """The stream of ``xen-save-devices-state`` (*body*) with the
    configuration section of machine type *machine* and an empty device
    description added (MigrationError if *body* is not such a stream)."""
    if len(body) < 9 or body[:4] != _MAGIC or struct.unpack(">I", body[4:8])[0] != _VERSION:
        raise MigrationError("the device state QEMU wrote is not a version 3 stream")
    if body[-1] != _EOF:
        raise MigrationError("the device state QEMU wrote does not end with its end marker")
    name = machine.encode()
    config = bytes([_CONFIGURATION]) + struct.pack(">I", len(name)) + name
    desc = bytes([_VMDESCRIPTION]) + struct.pack(">I", len(_VMDESC)) + _VMDESC
    return body[:8] + config + body[8:] + desc


async def save_devices(m: Machine, path: Path, machine: str, timeout: float) -> int:
    """Write the device state of paused VM *m* (machine type *machine*) to
    *path*, atomically, 0600; return its size. Not synced to disk: it runs
    while the guest is paused, and only a running host uses it (a fork
    base's VMs do not outlive a reboot)."""
    raw = path.with_name(f".{path.name}.raw")
    tmp = path.with_name(f".{path.name}.tmp")
    for p in (raw, tmp):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
    migration.create_private(raw)
    try:
        await deadline(m.qmp("xen-save-devices-state", {"filename": str(raw), "live": True}),
                       timeout, "the device state save")
        data = configured(raw.read_bytes(), machine)
        migration.create_private(tmp)
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        for p in (raw, tmp):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
    return len(data)


__all__ = ["configured", "save_devices"]
