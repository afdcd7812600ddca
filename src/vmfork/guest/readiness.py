"""Knowing when a booted guest is ready, for guests vmfork built and any other.

Owns the wait of ``vmfork run`` for the readiness that the VM's spec names
(:class:`vmfork.spec.Readiness`), once QEMU runs the guest:

* ``auto`` (the default): whichever comes first of vmfork's boot marker on the
  serial console (its demo and Debian images print it once their serial
  agent runs) and an answer of qemu-guest-agent to ``guest-ping``;
* ``qga``: an answer of qemu-guest-agent;
* ``console:REGEX``: the serial console's output matches REGEX;
* ``tcp:PORT``: the guest accepts a connection on PORT through the VM's
  user-mode forward of that port. QEMU's user-mode network accepts on the
  host side at once and closes the connection if the guest refuses it, so a
  connection counts once the guest sends data on it or QEMU reports it
  ``ESTABLISHED`` with the guest (``info usernet``);
* ``none``: QEMU runs, nothing more.

What the wait learnt is returned (:class:`Ready`): which agent is known to
answer (qemu-guest-agent when it answered, vmfork's serial agent when its
marker was seen) and, from qemu-guest-agent, ``guest-get-osinfo``. A clone or
a restore never waits here: its guest runs on from a saved state.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from dataclasses import dataclass
from typing import Any

from vmfork.errors import GuestError, InvalidInput, VmforkError, VmforkTimeout
from vmfork.guest.qga import GuestAgent
from vmfork.qemu.machine import READY_MARKER, Machine, deadline
from vmfork.records import VMRecord
from vmfork.spec import Readiness, parse_ready
from vmfork.store import Store
from vmfork.tasks import cancel_all
from vmfork.timeouts import Timeouts

#: Seconds between two tries of an agent or a port that did not answer yet.
RETRY = 0.2
#: ``info usernet`` rows of a forwarded connection: state, host port, guest port.
_USERNET_ROW = re.compile(r"TCP\[(\w+)\]\s+-?\d+\s+\S+\s+(\d+)\s+\S+\s+(\d+)")


@dataclass(frozen=True)
class Ready:
    """What a wait for readiness saw."""

    #: The sign that came: ``marker``, ``qga``, ``console``, ``tcp`` or ``none``.
    sign: str
    seconds: float
    #: The guest agent known to answer (``qga``, ``serial``), or None.
    agent: str | None = None
    #: qemu-guest-agent's ``guest-get-osinfo`` (when it answered).
    os_info: dict[str, str] | None = None


def forward_for(rec: VMRecord, port: int) -> int:
    """The host port that forwards to guest *port*; InvalidInput if none does."""
    for host, guest in (rec.spec.net.ports if rec.spec.net else ()):
        if guest == port:
            return host
    raise InvalidInput(f"{rec.name}: --ready tcp:{port} needs a forward of guest port "
                       f"{port} (--port HOST:{port})")


async def wait_ready(store: Store, rec: VMRecord, m: Machine, timeouts: Timeouts) -> Ready:
    """Wait (at most ``timeouts.boot``) until the guest of *rec*, running in
    *m*, shows the readiness its spec names."""
    how = parse_ready(rec.spec.ready)
    t0 = time.monotonic()
    if how.kind == "none":
        return Ready("none", 0.0)
    if how.kind == "console":
        pattern = re.compile(how.pattern.encode())
        await m.wait_console(pattern=pattern, timeout=timeouts.boot)
        return Ready("console", time.monotonic() - t0)
    if how.kind == "tcp":
        host = forward_for(rec, how.port)
        await deadline(_tcp_accepted(m, host, how.port), timeouts.boot,
                       f"{rec.name} to accept connections on guest port {how.port}")
        return Ready("tcp", time.monotonic() - t0)
    agent = _agent(store, rec, timeouts)
    if how.kind == "qga":
        if agent is None:
            raise InvalidInput(f"{rec.name}: --ready qga needs the qemu-guest-agent port")
        os_info = await deadline(_qga_answers(m, agent), timeouts.boot,
                                 f"the guest agent (QGA) of {rec.name}")
        return Ready("qga", time.monotonic() - t0, "qga", os_info)
    return await _auto(rec, m, agent, how, timeouts, t0)


async def _auto(rec: VMRecord, m: Machine, agent: GuestAgent | None, how: Readiness,
                timeouts: Timeouts, t0: float) -> Ready:
    """vmfork's marker or qemu-guest-agent, whichever answers first."""
    marker = asyncio.ensure_future(m.wait_console(READY_MARKER, timeout=timeouts.boot + 1))
    tasks: list[asyncio.Future[Any]] = [marker]
    qga = None
    if agent is not None:
        qga = asyncio.ensure_future(_qga_answers(m, agent))
        tasks.append(qga)
    try:
        done, _ = await asyncio.wait(tasks, timeout=timeouts.boot,
                                     return_when=asyncio.FIRST_COMPLETED)
        if not done:
            signs = "vmfork's boot marker on the console" + (
                " or an answer of qemu-guest-agent" if qga else "")
            raise VmforkTimeout(f"{rec.name} to be ready", timeouts.boot,
                                f"no {signs}; for another guest choose --ready "
                                "console:REGEX, tcp:PORT or none")
        first = done.pop()
        result = first.result()  # raises LaunchError if QEMU ended
        if first is qga:
            return Ready("qga", time.monotonic() - t0, "qga", result)
        return Ready("marker", time.monotonic() - t0, "serial")
    finally:
        await cancel_all(tasks)


def _agent(store: Store, rec: VMRecord, timeouts: Timeouts) -> GuestAgent | None:
    """A qemu-guest-agent client for the VM (None if it has no QGA port)."""
    if not rec.spec.qga:
        return None
    paths = store.run_paths(rec.name, rec.info.gen)
    return GuestAgent(paths.qga, store.run_dir(rec.name) / "qga.lock", name=rec.name,
                      timeout=timeouts.agent_attempt)


async def _qga_answers(m: Machine, agent: GuestAgent) -> dict[str, str] | None:
    """Ping qemu-guest-agent until it answers; return its OS info (None if
    it has no ``guest-get-osinfo``)."""
    while True:
        try:
            async with agent:
                await agent.ping()
                with contextlib.suppress(GuestError, VmforkTimeout):
                    info = await agent.execute("guest-get-osinfo")
                    if isinstance(info, dict):
                        return {str(k): str(v) for k, v in info.items()
                                if isinstance(v, str | int)}
                return None
        except (GuestError, VmforkTimeout, OSError):
            m.check_running()
            await asyncio.sleep(RETRY)


async def _tcp_accepted(m: Machine, host: int, guest: int) -> None:
    """Connect to the forward on *host* until the guest takes a connection."""
    while True:
        m.check_running()
        with contextlib.suppress(OSError):
            reader, writer = await asyncio.open_connection("127.0.0.1", host)
            try:
                if await _taken(m, reader, host, guest):
                    return
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
        await asyncio.sleep(RETRY)


async def _taken(m: Machine, reader: asyncio.StreamReader, host: int, guest: int) -> bool:
    """True once the guest sends data on the connection or QEMU has it
    established with the guest; False once it is closed (refused) or after
    a second in which neither happened."""
    end = time.monotonic() + 1.0
    while time.monotonic() < end:
        try:
            data = await asyncio.wait_for(reader.read(1), 0.1)
        except TimeoutError:
            data = None
        if data is not None:
            return bool(data)  # b"": closed, the guest refused
        with contextlib.suppress(VmforkError):
            out = str(await m.qmp("human-monitor-command", {"command-line": "info usernet"}))
            for state, h, g in _USERNET_ROW.findall(out):
                if state == "ESTABLISHED" and (int(h), int(g)) == (host, guest):
                    return True
    return False


__all__ = ["Ready", "forward_for", "wait_ready"]
