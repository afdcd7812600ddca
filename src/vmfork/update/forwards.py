"""A VM's host port forwards, moved while QEMU runs.

Owns the hand-over of the user-mode network's host port forwards
(``hostfwd``) from the old QEMU to the new one across a live update, and
their removal while a VM is paused for idling (:func:`detach`;
:mod:`vmfork.idle_ports` listens on them meanwhile). A listening port cannot be
held by two processes, and QEMU's user-mode network cannot take over a
listening socket from another process, so the new QEMU starts without the
forwards and they move at the switch-over: while the guest is paused, after
the new QEMU has loaded the whole state and before it resumes the guest,
each forward is removed from the old QEMU and at once added to the new one
(:func:`hand_over`). The port is free only between those two monitor
commands; a port that another process takes in that instant is reported.

Where the forwards are is never recorded: it is read from QEMU (``info
usernet``), so that whichever QEMU ends up holding the guest — after a
rollback, a commit, or the recovery of an update whose vmfork was killed —
gets the forwards it lacks (:func:`ensure`).
"""

from __future__ import annotations

import re

from vmfork import checkpoints
from vmfork.errors import VmforkError
from vmfork.qemu.machine import Machine
from vmfork.spec import NetSpec

#: A row of ``info usernet`` for a host forward: source address and port.
_ROW = re.compile(r"TCP\[HOST_FORWARD\]\s+-?\d+\s+(\S+)\s+(\d+)\s+\S+\s+(\d+)")
#: A row for a TCP connection that is open (not a listening forward, not one
#: closed or closing in TIME_WAIT).
_CONNECTION = re.compile(r"^\s*TCP\[(?!HOST_FORWARD|TIME_WAIT|CLOSED)[A-Z_0-9]+\]",
                         re.MULTILINE)


async def _hmp(m: Machine, line: str) -> str:
    return str(await m.qmp("human-monitor-command", {"command-line": line})).strip()


async def present(m: Machine) -> set[tuple[int, int]]:
    """The (host, guest) TCP port forwards QEMU *m* holds now."""
    out = await _hmp(m, "info usernet")
    return {(int(host), int(guest)) for _addr, host, guest in _ROW.findall(out)}


async def _add(m: Machine, host: int, guest: int) -> str | None:
    """Add one forward; None, or why it was not added."""
    try:
        out = await _hmp(m, f"hostfwd_add net0 tcp:127.0.0.1:{host}-:{guest}")
    except VmforkError as exc:
        return str(exc)
    return out or None


def _ports(net: NetSpec | None) -> tuple[tuple[int, int], ...]:
    return net.ports if net else ()


async def hand_over(old: Machine, new: Machine, net: NetSpec | None) -> list[str]:
    """Move *net*'s forwards that *old* holds to *new*, one port at a time;
    return warnings for ports that could not be moved (a port taken by
    another process in the instant it was free is named)."""
    wanted = _ports(net)
    if not wanted:
        return []
    held = await present(old)
    warnings = []
    for host, guest in wanted:
        if (host, guest) not in held:
            continue
        removed = await _hmp(old, f"hostfwd_remove net0 tcp:127.0.0.1:{host}")
        if "removed" not in removed:
            warnings.append(f"port forward {host}:{guest} not moved: {removed}")
            continue
        await checkpoints.checkpoint("update.port-released")
        why = await _add(new, host, guest)
        if why is not None:
            warnings.append(f"port forward {host}:{guest} lost: host port {host} was taken "
                            f"while it moved ({why})")
    return warnings


async def connections(m: Machine) -> int:
    """TCP connections of the guest's user-mode network now (through a
    forward or out of the guest)."""
    return len(_CONNECTION.findall(await _hmp(m, "info usernet")))


async def detach(m: Machine, net: NetSpec | None) -> list[int]:
    """Remove *net*'s forwards from QEMU *m* (it stops listening on their
    host ports); return the host ports it let go of."""
    freed = []
    for host, _guest in _ports(net):
        if "removed" in await _hmp(m, f"hostfwd_remove net0 tcp:127.0.0.1:{host}"):
            freed.append(host)
    return freed


async def ensure(m: Machine, net: NetSpec | None) -> list[str]:
    """Give QEMU *m* the forwards of *net* that it lacks; return warnings
    for those it could not get."""
    wanted = _ports(net)
    if not wanted:
        return []
    have = await present(m)
    warnings = []
    for host, guest in wanted:
        if (host, guest) in have:
            continue
        why = await _add(m, host, guest)
        if why is not None:
            warnings.append(f"port forward {host}:{guest} not restored: {why}")
    return warnings


__all__ = ["connections", "detach", "ensure", "hand_over", "present"]
