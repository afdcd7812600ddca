"""A guest's identity after it was copied or paused: clock, hostname,
machine-id, MAC.

Owns the in-guest actions that make a clone its own machine and put a
restored guest's clock right. They go through :func:`vmfork.vm.guest_exec`
(qemu-guest-agent where the VM has its port, else the serial agent), as one
command; a guest copied from a template whose file systems were frozen is
thawed first (qemu-guest-agent), before anything writes. The VM generation
ID is not here: it is a device property set on the command line
(:mod:`vmfork.spec`), and QEMU notifies the guest after the device state is
loaded.
"""

from __future__ import annotations

import logging
import os
import shlex
import time

from vmfork import agents, vm
from vmfork.errors import GuestError, StateError, VmforkTimeout
from vmfork.guest import diagnosis
from vmfork.records import VMRecord
from vmfork.store import Store
from vmfork.timeouts import DEFAULT, Timeouts

log = logging.getLogger("vmfork.guest.identity")


def clock_command(now: float | None = None) -> str:
    """Shell that sets the guest clock to the host's (UTC, whole seconds)."""
    t = round(now if now is not None else time.time())
    return f"date -u -s @{t} >/dev/null"


def mac_command(mac: str, old_mac: str | None = None) -> str:
    """Shell that gives the NIC the MAC *mac*, taking it down and up again (so
    a DHCP client asks again). The NIC is the interface that has *old_mac*
    (the template's; names differ between guests: eth0, enp0s2, ...), failing
    that the only interface backed by a device. Fails if there is none.

    The NIC announces its new MAC when it comes up (``arp_notify``: a
    gratuitous ARP, which QEMU's user-mode network takes as the guest
    address's MAC). QEMU's own announcement after a state load is off
    (``announce-rounds=0``, :mod:`vmfork.spec`), and it would name the MAC
    of the device, not the one the guest now uses.
    Shell builtins only, but for two ``ip`` calls: every new process costs
    under TCG."""
    new = mac.lower()
    find = ""
    if old_mac:
        find = ("for d in /sys/class/net/*; do a=; read a 2>/dev/null < \"$d/address\"; "
                f"[ \"$a\" != {shlex.quote(old_mac.lower())} ] || n=${{d##*/}}; done; ")
    return ("n=; " + find +
            "if [ -z \"$n\" ]; then c=0; for d in /sys/class/net/*; do "
            "[ ! -e \"$d/device\" ] || { n=${d##*/}; c=$((c+1)); }; done; "
            "[ $c -eq 1 ] || n=; fi; "
            f"if [ -z \"$n\" ]; then echo 'no network interface to give the MAC {new}' >&2; "
            "false; else { echo 1 > \"/proc/sys/net/ipv4/conf/$n/arp_notify\"; } 2>/dev/null; "
            "ip link set dev \"$n\" down && "
            f"ip link set dev \"$n\" address {shlex.quote(new)} up; fi")


def identity_command(hostname: str | None = None, mac: str | None = None,
                     new_machine_id: bool = False, old_mac: str | None = None) -> str:
    """Shell that gives a copied guest its own hostname, machine-id and MAC.

    Hostname: the kernel's, ``/etc/hostname`` and an ``/etc/hosts`` line
    ``127.0.1.1`` if there is one. Machine-id: ``/etc/machine-id`` and
    ``/var/lib/dbus/machine-id`` where that is a file of its own (not a link).
    """
    parts = []
    if hostname:
        h = shlex.quote(hostname)
        parts.append(f"echo {h} > /proc/sys/kernel/hostname && echo {h} > /etc/hostname")
        parts.append("{ [ ! -f /etc/hosts ] || "
                     f"sed -i 's/^127\\.0\\.1\\.1[[:space:]].*/127.0.1.1\t'{h}'/' /etc/hosts; }}")
    if new_machine_id:
        parts.append("IFS=- read a b c d e < /proc/sys/kernel/random/uuid && "
                     "echo \"$a$b$c$d$e\" > /etc/machine-id")
        parts.append("{ [ ! -f /var/lib/dbus/machine-id ] || [ -L /var/lib/dbus/machine-id ] || "
                     "cp /etc/machine-id /var/lib/dbus/machine-id; }")
    if mac:
        parts.append(f"{{ {mac_command(mac, old_mac)}; }}")
    return " && ".join(parts)


async def thaw(store: Store, rec: VMRecord, timeouts: Timeouts = DEFAULT) -> None:
    """Thaw the file systems of a guest copied while frozen (qemu-guest-agent)."""
    try:
        async with vm.qga_for(store, rec, timeouts) as g:
            await g.fsfreeze_thaw(timeout=timeouts.exec)
    except (GuestError, StateError) as exc:
        raise GuestError(f"{rec.name}: thawing the guest's file systems failed: "
                         f"{_one_line(str(exc))}") from exc


async def sync_clock(store: Store, rec: VMRecord, timeouts: Timeouts = DEFAULT) -> None:
    """Set the guest clock to the host's (after a clone, restore or long pause).

    With ``date``, also under qemu-guest-agent: its ``guest-set-time`` runs
    ``hwclock -w`` in the guest, which took 2.4-3.8 s in a fresh Debian clone
    under TCG (the emulated RTC follows the host clock anyway)."""
    r = await vm.guest_exec(store, rec, clock_command(), timeouts.exec, timeouts)
    if r.exit_code != 0:
        raise GuestError(f"{rec.name}: setting the guest clock failed: "
                         f"{_one_line(r.stderr or r.stdout)}")


#: The parts of a clone's identity, as :func:`make_unique` reports them.
PARTS = ("rng", "hostname", "machine_id", "mac", "clock")


async def make_unique(store: Store, rec: VMRecord, timeouts: Timeouts = DEFAULT,
                      old_mac: str | None = None,
                      thaw_first: bool = False) -> tuple[float, dict[str, str]]:
    """Clock, hostname = VM name, new machine-id, the VM's own MAC (on the NIC
    that has *old_mac*, the template's): one guest command, through whichever
    guest agent answers (:mod:`vmfork.agents`). A guest copied while frozen
    (*thaw_first*) is thawed before, through qemu-guest-agent.

    Returns the seconds it took and what was done, part by part
    (:data:`PARTS`: ``set``, or ``skipped: <why>``). The RNG is reseeded by
    the guest's kernel when it sees the new VM generation ID, agent or not.
    A guest with no agent keeps the template's hostname, machine-id, MAC and
    clock: that is reported, not raised."""
    t0 = time.monotonic()
    done = {"rng": "vmgenid"}
    mac = rec.spec.net.mac if rec.spec.net else None
    try:
        await agents.choose_agent(store, rec, timeouts=timeouts)
    except GuestError:
        if thaw_first:
            raise GuestError(f"{rec.name}: the template's file systems were frozen and no "
                             "guest agent answers to thaw them") from None
        why = "skipped: no guest agent"
        done.update(hostname=why, machine_id=why, clock=why, mac=why if mac else "no NIC")
        return time.monotonic() - t0, done
    if thaw_first:
        await thaw(store, rec, timeouts)
    cmd = " && ".join([clock_command(), identity_command(
        hostname=rec.name, mac=mac, new_machine_id=True, old_mac=old_mac)])
    # A guest slow to answer on a loaded host (many clones starting on few
    # cores) gets a second try; the command can run twice (the MAC is found
    # again on the only NIC).
    for attempt in (1, 2):
        try:
            r = await vm.guest_exec(store, rec, cmd, timeouts.exec, timeouts)
            break
        except VmforkTimeout as exc:
            if attempt == 1:
                log.warning("%s: giving the clone its identity timed out after %g s (%s); "
                            "trying once more", rec.name, exc.seconds, host_load())
                continue
            where = await diagnosis.diagnose(store, rec, timeouts)
            raise GuestError(f"{rec.name}: giving the clone its identity did not finish: timed "
                             f"out twice after {exc.seconds:g} s waiting for {exc.phase}, "
                             f"{host_load()}{where}") from exc
    if r.exit_code != 0:
        raise GuestError(f"{rec.name}: giving the clone its identity failed "
                         f"(status {r.exit_code}): {_one_line(r.stderr or r.stdout)}")
    done.update(hostname="set", machine_id="set", clock="set", mac="set" if mac else "no NIC")
    return time.monotonic() - t0, done


def host_load() -> str:
    """The host's load, for a message about a guest that was slow to answer."""
    cores = os.cpu_count() or 1
    load = os.getloadavg()[0]
    busy = "under load" if load > cores else "not overloaded"
    return f"the host {busy}: load average {load:.1f} on {cores} cores"


def skipped(done: dict[str, str]) -> str:
    """One line naming the parts of an identity that were skipped, or ""."""
    parts = [k.replace("_", "-") for k in PARTS if done.get(k, "").startswith("skipped")]
    if not parts:
        return ""
    why = next(v for v in done.values() if v.startswith("skipped")).partition(": ")[2]
    return f"{', '.join(parts)} not set ({why})"


def _one_line(text: str, limit: int = 200) -> str:
    """The tail of *text* on one line (for error messages)."""
    return " | ".join(ln.strip() for ln in text.strip().splitlines() if ln.strip())[-limit:]
