"""A guest's identity after it was copied or paused: clock, hostname,
machine-id, MAC.

Owns the in-guest actions (through the guest agent) that make a clone its own
machine and put a restored guest's clock right. The VM generation ID is not
here: it is a device property set on the command line (:mod:`vmfork.spec`),
and QEMU notifies the guest after the device state is loaded.
"""

from __future__ import annotations

import shlex
import time

from . import vm
from .errors import GuestError
from .store import Store, VMRecord
from .timeouts import DEFAULT, Timeouts


def clock_command(now: float | None = None) -> str:
    """Shell that sets the guest clock to the host's (UTC, whole seconds)."""
    t = round(now if now is not None else time.time())
    return f"date -u -s @{t} >/dev/null"


def identity_command(hostname: str | None = None, mac: str | None = None,
                     new_machine_id: bool = False) -> str:
    """Shell that gives a copied guest its own hostname, machine-id and MAC."""
    parts = []
    if hostname:
        h = shlex.quote(hostname)
        parts.append(f"hostname {h} && echo {h} > /etc/hostname")
    if new_machine_id:
        parts.append("tr -d '-' < /proc/sys/kernel/random/uuid > /etc/machine-id")
    if mac:
        parts.append("if [ -e /sys/class/net/eth0 ]; then ip link set eth0 down && "
                     f"ip link set eth0 address {shlex.quote(mac)} && ip link set eth0 up; fi")
    return " && ".join(parts)


async def sync_clock(store: Store, rec: VMRecord, timeouts: Timeouts = DEFAULT) -> None:
    """Set the guest clock to the host's (after a clone, restore or long pause)."""
    r = await vm.agent_for(store, rec, timeouts).exec(clock_command(), timeouts.exec)
    if r.status != 0:
        raise GuestError(f"{rec.name}: setting the guest clock failed: {r.text.strip()}")


async def make_unique(store: Store, rec: VMRecord, timeouts: Timeouts = DEFAULT) -> float:
    """Clock, hostname = VM name, new machine-id, the VM's own MAC; one agent
    round trip. Returns the seconds it took."""
    mac = rec.spec.net.mac if rec.spec.net else None
    cmd = " && ".join([clock_command(),
                       identity_command(hostname=rec.name, mac=mac, new_machine_id=True)])
    r = await vm.agent_for(store, rec, timeouts).exec(cmd, timeouts.exec)
    if r.status != 0:
        raise GuestError(f"{rec.name}: giving the clone its identity failed: {r.text.strip()}")
    return r.seconds
