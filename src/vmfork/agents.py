"""The guest agents of a VM, and which one runs a command.

Owns the choice behind ``--agent auto``. Every VM has a qemu-guest-agent
port (QGA, virtio-serial ``org.qemu.guest_agent.0``) and a virtio console
where vmfork's demo and Debian images run vmfork's serial agent; a guest
runs either, both or neither. What is known is kept in the VM's record
(``info.agent``): a boot that was ready by an agent's sign records it
(:mod:`vmfork.guest.readiness`), a clone inherits its template's, and
otherwise the first command that needs an agent asks qemu-guest-agent, then
vmfork's serial agent, and keeps the one that answers (:func:`choose_agent`).
A guest where neither answers gets a one-line GuestError; that is not kept,
so an agent that starts later is found by a later command.

Commands run through either agent alike (:func:`guest_exec`,
:data:`vmfork.guest.qga.SHELL_WRAPPER`).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import replace

from vmfork.errors import GuestError, InvalidInput, StateError, VmforkError
from vmfork.guest.qga import GuestAgent
from vmfork.guest.serial import SerialAgent
from vmfork.launch import paths_for
from vmfork.records import VMRecord
from vmfork.results import ExecResult
from vmfork.store import Store
from vmfork.timeouts import DEFAULT, Timeouts, check_seconds

log = logging.getLogger("vmfork.agents")

#: ``--agent`` choices: ``auto`` = the one known or found to answer.
AGENTS = ("auto", "serial", "qga")
#: What ``info.agent`` may hold: an agent, or ``none`` (checked: neither).
KNOWN = ("qga", "serial", "none")


def agent_for(store: Store, rec: VMRecord, timeouts: Timeouts = DEFAULT) -> SerialAgent:
    """vmfork's serial agent of the VM."""
    return SerialAgent(paths_for(store, rec).agent, store.run_dir(rec.name) / "agent.lock",
                       name=rec.name, connect_timeout=timeouts.agent)


def qga_for(store: Store, rec: VMRecord, timeouts: Timeouts = DEFAULT) -> GuestAgent:
    """A session with the VM's qemu-guest-agent (use ``async with``)."""
    if not rec.spec.qga:
        raise StateError(f"{rec.name} has no qemu-guest-agent port (a VM of an older vmfork)")
    return GuestAgent(paths_for(store, rec).qga, store.run_dir(rec.name) / "qga.lock",
                      name=rec.name, timeout=timeouts.agent)


def no_agent(rec: VMRecord) -> GuestError:
    return GuestError(f"{rec.name}: the guest has no agent (neither qemu-guest-agent nor "
                      "vmfork's serial agent answers)")


async def find_agent(store: Store, rec: VMRecord, timeouts: Timeouts = DEFAULT) -> str | None:
    """The agent that answers (``qga`` or ``serial``), or None: first
    qemu-guest-agent, then vmfork's serial agent, each for
    ``timeouts.agent_attempt`` s. Not both at once: a command sent to the
    serial agent occupies the guest's virtio console until it ends (on a
    guest without that agent a login prompt may sit there; on one with it,
    the agent runs one command at a time, and a stuck probe would hold back
    the next command, e.g. a thaw)."""
    if await qga_answers(store, rec, timeouts):
        return "qga"
    quick = replace(timeouts, agent=timeouts.agent_attempt)
    try:
        r = await agent_for(store, rec, quick).exec("true", timeouts.agent_attempt)
    except VmforkError:
        return None
    return "serial" if r.exit_code == 0 else None


async def qga_answers(store: Store, rec: VMRecord, timeouts: Timeouts = DEFAULT) -> bool:
    """True if the VM's qemu-guest-agent answers a ping within
    ``timeouts.agent_attempt`` seconds."""
    if not rec.spec.qga or rec.info.agent == "none":
        return False
    try:
        async with qga_for(store, rec, replace(timeouts, agent=timeouts.agent_attempt)) as g:
            await g.ping()
    except VmforkError:
        return False
    return True


async def choose_agent(store: Store, rec: VMRecord, agent: str = "auto",
                       timeouts: Timeouts = DEFAULT) -> str:
    """The agent (``qga`` or ``serial``) that runs a command for *agent*
    (one of :data:`AGENTS`); for ``auto`` the one known to answer, else the
    first found, which is then kept in the VM's record."""
    if agent not in AGENTS:
        raise InvalidInput(f"invalid agent {agent!r}: use one of {', '.join(AGENTS)}")
    if agent == "qga" and not rec.spec.qga:
        raise StateError(f"{rec.name} has no qemu-guest-agent port (a VM of an older vmfork)")
    if agent != "auto":
        return agent
    if rec.info.agent in ("qga", "serial"):
        return rec.info.agent
    if rec.info.agent == "none":
        raise no_agent(rec)
    found = await find_agent(store, rec, timeouts)
    if found is None:
        raise no_agent(rec)
    rec.info.agent = found
    keep_agent(store, rec.name, found)
    return found


def keep_agent(store: Store, name: str, agent: str) -> None:
    """Record *agent* as the one VM *name* answers with, unless a command
    holds the VM (it will not be asked again soon anyway)."""
    with contextlib.suppress(StateError, VmforkError), store.lock(name, wait=False):
        rec = store.get_vm(name)
        if rec.info.agent != agent:
            rec.info.agent = agent
            store.update_vm(rec)


async def guest_exec(store: Store, rec: VMRecord, command: str, timeout: float | None = None,
                     timeouts: Timeouts = DEFAULT, agent: str = "auto") -> ExecResult:
    """Run *command* with ``sh`` in the guest of *rec* (in ``/root``) through
    its guest agent; return its exit code, stdout and stderr. Both agents run
    it alike (:data:`vmfork.guest.qga.SHELL_WRAPPER`)."""
    t = timeouts.exec if timeout is None else check_seconds(timeout, "exec timeout")
    if await choose_agent(store, rec, agent, timeouts) == "qga":
        async with qga_for(store, rec, timeouts) as g:
            return await g.exec(command, t, cwd="/root")
    return await agent_for(store, rec, timeouts).exec(command, t)


__all__ = ["AGENTS", "agent_for", "choose_agent", "find_agent", "guest_exec", "keep_agent",
           "no_agent", "qga_answers", "qga_for"]
