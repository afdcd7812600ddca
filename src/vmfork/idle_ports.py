"""The forwarded ports of VMs paused for idling: a connection wakes the VM.

QEMU's user-mode network holds a VM's host ports while the VM runs, and a
connection to a paused guest just waits: QEMU cannot tell vmfork that one
arrived. So the watcher (:func:`vmfork.idle.sweep`) removes a VM's forwards
from QEMU when it pauses it for idling (``hostfwd_remove``:
:func:`vmfork.update.forwards.detach`), and :class:`PortWaker`, in the
watcher's process, listens on those ports meanwhile. The first connection
wakes the VM: the waker lets go of the VM's ports, the VM is resumed and
QEMU given its forwards back (:func:`vmfork.idle.wake`), and the connection
is passed on to QEMU's port for as long as it lasts, as a use of the VM.
Later connections go to QEMU directly, and an open connection through a
forward keeps the VM from being paused (:func:`vmfork.update.forwards.connections`).

A VM woken otherwise (an exec) gets its forwards back from that wake if its
ports are free by then, else from the waker's next round, which lets go of
the ports of every VM no longer paused for idling and gives a running VM
the forwards it lacks. A watcher killed while a VM is paused leaves its ports
to nobody: the next use of the VM gives them back to QEMU, and the next
watcher listens on them again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from functools import partial

from vmfork import idle
from vmfork.errors import NotFound, StateError, VmforkError
from vmfork.launch import attach
from vmfork.records import VMRecord
from vmfork.store import Store
from vmfork.timeouts import DEFAULT, Timeouts
from vmfork.update import forwards

log = logging.getLogger("vmfork.idle")

#: Most seconds between two rounds of ``vmfork idle --keep``.
KEEP_INTERVAL = 2.0
#: Bytes one read of a passed-on connection takes.
PIPE_CHUNK = 1 << 16


def _idle_with_ports(rec: VMRecord) -> bool:
    return (rec.state == "paused" and rec.info.idle_since is not None
            and rec.spec.net is not None and bool(rec.spec.net.ports))


class PortWaker:
    """Listens on the forwarded ports of the VMs paused for idling (see the
    module docstring); :meth:`round` after each sweep, :meth:`close` at the end."""

    def __init__(self, store: Store, timeouts: Timeouts = DEFAULT) -> None:
        self.store = store
        self.timeouts = timeouts
        self._servers: dict[str, list[asyncio.Server]] = {}
        self._pipes: set[asyncio.Task[None]] = set()

    @property
    def listening(self) -> dict[str, list[int]]:
        """The host ports listened on, by VM."""
        return {name: [s.sockets[0].getsockname()[1] for s in servers if s.sockets]
                for name, servers in self._servers.items()}

    async def round(self) -> None:
        """Listen for the VMs paused for idling, let go of the others."""
        wanted = {r.name: r for r in self.store.list_vms() if _idle_with_ports(r)}
        for name in [n for n in self._servers if n not in wanted]:
            self._let_go(name)
            await self._give_back(name)
        for name, rec in wanted.items():
            if name not in self._servers:
                await self._listen(rec)

    async def _listen(self, rec: VMRecord) -> None:
        assert rec.spec.net is not None
        servers = []
        for host, _guest in rec.spec.net.ports:
            try:
                servers.append(await asyncio.start_server(
                    partial(self._connected, rec.name, host), "127.0.0.1", host))
            except OSError as exc:  # QEMU still holds it (paused by an older vmfork), or another
                log.debug("%s: port %d not listened on: %s", rec.name, host, exc)
        if servers:
            self._servers[rec.name] = servers
            log.info("%s: a connection to port %s wakes it", rec.name,
                     ", ".join(str(h) for h in self.listening[rec.name]))

    def _let_go(self, name: str) -> None:
        for server in self._servers.pop(name, []):
            server.close()

    async def _give_back(self, name: str) -> None:
        """Give a running VM the forwards it lacks (woken while the waker
        held its ports)."""
        with contextlib.suppress(VmforkError, NotFound, StateError):
            async with self.store.lock_async(name, wait=self.timeouts.qmp):
                rec = self.store.get_vm(name)
                if rec.state != "running":
                    return
                m = await attach(self.store, rec, self.timeouts)
                try:
                    for warning in await forwards.ensure(m, rec.spec.net):
                        log.warning("%s: %s", name, warning)
                finally:
                    await m.disconnect()

    async def _connected(self, name: str, host: int, reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._pipes.add(task)
            task.add_done_callback(self._pipes.discard)
        self._let_go(name)  # QEMU takes the ports back as the VM wakes
        try:
            async with idle.in_use(self.store, name, self.timeouts):
                log.info("%s: woken by a connection to port %d", name, host)
                up_reader, up_writer = await asyncio.wait_for(
                    asyncio.open_connection("127.0.0.1", host), self.timeouts.qmp)
                try:
                    await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
                finally:
                    up_writer.close()
        except (VmforkError, OSError, TimeoutError) as exc:
            log.warning("%s: a connection to port %d could not be passed on: %s",
                        name, host, exc)
        finally:
            writer.close()

    async def close(self) -> None:
        """Stop listening and end the connections passed on. The ports of a
        VM still paused stay free: its next use gives them back to QEMU."""
        for name in list(self._servers):
            self._let_go(name)
        for task in list(self._pipes):
            task.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy *reader* to *writer* until its end, which is passed on (half-close)."""
    with contextlib.suppress(OSError):
        while data := await reader.read(PIPE_CHUNK):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()


async def keep(store: Store, timeouts: Timeouts = DEFAULT,
               stop: asyncio.Event | None = None) -> None:
    """Run the watcher until *stop* is set (or forever): a sweep
    (:func:`vmfork.idle.sweep`) and a round of the :class:`PortWaker` every
    :data:`KEEP_INTERVAL` seconds, or every quarter of the shortest policy."""
    stop = stop or asyncio.Event()
    waker = PortWaker(store, timeouts)
    try:
        while not stop.is_set():
            await idle.sweep(store, timeouts)
            await waker.round()
            policies = [r.info.idle_pause for r in store.list_vms() if r.info.idle_pause]
            interval = min([KEEP_INTERVAL, *(p / 4 for p in policies)])
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await stop.wait()
    finally:
        await waker.close()


__all__ = ["KEEP_INTERVAL", "PortWaker", "keep"]
