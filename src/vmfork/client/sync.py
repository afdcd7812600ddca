"""The synchronous flavour of vmfork's REST client: :class:`Client`,
:class:`RemoteVM`, :class:`RemoteClone`, :class:`RemoteTemplate` — the
names, arguments and results of :class:`vmfork.Host` and its handles, so
that ``vmfork.Client(path)`` replaces ``vmfork.open()`` in a script.

Each call runs the asyncio client (:mod:`vmfork.client.aio`) on an event
loop of the client's own, on a thread of its own
(:class:`vmfork.loopthread.LoopThread`), as :class:`vmfork.Host` does over
:class:`vmfork.AsyncHost`. That keeps one implementation of every request,
its error mapping and its timeouts (httpx's synchronous client would need a
second copy of each), and it works where the caller already runs a loop (a
notebook). Ctrl-C while a call waits cancels the request: the connection is
closed; the daemon may still finish the operation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Coroutine, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar, overload

from vmfork.client.aio import (
    ANSWER_SECONDS,
    AsyncClient,
    AsyncRemoteClone,
    AsyncRemoteTemplate,
    AsyncRemoteVM,
)
from vmfork.errors import NotFound
from vmfork.loopthread import LoopThread
from vmfork.records import TemplateManifest
from vmfork.results import (
    CloneResult,
    ExecExit,
    ExecResult,
    ForkReport,
    OutputChunk,
    PoolStatus,
    RestoreResult,
    Result,
    SaveResult,
    TemplateStatus,
    UpdateReport,
    VMStatus,
)

T = TypeVar("T")

#: Seconds a cancelled request may take to close its connection.
_CLEANUP_SECONDS = 5.0


class Client:
    """vmforkd at *socket_or_url* (see :class:`vmfork.AsyncClient` for the
    arguments). Use ``with vmfork.Client(path) as host:``; the methods are
    those of :class:`vmfork.Host`."""

    def __init__(self, socket_or_url: Path | str | None = None, token: str | None = None, *,
                 token_file: Path | str | None = None, timeout: float = ANSWER_SECONDS,
                 verify: str | bool = True) -> None:
        self._loop = LoopThread(_CLEANUP_SECONDS, what="vmfork client")

        async def make() -> AsyncClient:
            return AsyncClient(socket_or_url, token, token_file=token_file, timeout=timeout,
                               verify=verify)
        try:
            self._async = self._loop.run(make())
        except BaseException:
            self._loop.close()
            raise

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self._loop.run(coro)

    @property
    def address(self) -> str:
        """The daemon's socket path or URL."""
        return self._async.address

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.address}>"

    def __enter__(self) -> Client:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Close the connections and the client's event loop (VMs keep running)."""
        if self._loop.is_open:
            self._run(self._async.close())
        self._loop.close()

    def _vm(self, handle: AsyncRemoteVM) -> RemoteVM:
        if isinstance(handle, AsyncRemoteClone):
            return RemoteClone(self, handle)
        return RemoteVM(self, handle)

    def health(self) -> dict[str, Any]:
        """``GET /v1/health``: answers as soon as the daemon serves."""
        return self._run(self._async.health())

    # -- VMs --------------------------------------------------------------------
    def run(self, name: str, *, image: str | None = None, memory: str | int = "256M",
            cpus: int = 1, kernel: str | None = None, initrd: str | None = None,
            append: str | None = None, disks: Sequence[str] = (),
            net: str | bool | None = None, ports: Sequence[tuple[int, int]] = (),
            persistent: bool = False, accel: str = "auto", ready: str = "auto",
            idle_pause: float | None = None) -> RemoteVM:
        """Start VM *name*; see :meth:`vmfork.AsyncHost.run`."""
        return self._vm(self._run(self._async.run(
            name, image=image, memory=memory, cpus=cpus, kernel=kernel, initrd=initrd,
            append=append, disks=disks, net=net, ports=ports, persistent=persistent,
            accel=accel, ready=ready, idle_pause=idle_pause)))

    def set_idle_pause(self, name: str, seconds: float | None) -> str:
        """See :meth:`vmfork.AsyncHost.set_idle_pause`."""
        return self._run(self._async.set_idle_pause(name, seconds))

    def vm(self, name: str) -> RemoteVM:
        """The VM *name* (NotFound if there is none)."""
        return self._vm(self._run(self._async.vm(name)))

    def vms(self) -> list[RemoteVM]:
        """Every VM of the daemon's home, oldest first."""
        return [self._vm(v) for v in self._run(self._async.vms())]

    def ls(self) -> list[VMStatus]:
        """Every VM's status (``vmfork ls``)."""
        return self._run(self._async.ls())

    # -- templates --------------------------------------------------------------
    def template(self, name: str) -> RemoteTemplate:
        """The template *name* (NotFound if there is none)."""
        return RemoteTemplate(self, self._run(self._async.template(name)))

    def templates(self) -> list[RemoteTemplate]:
        """Every template of the daemon's home, oldest first."""
        return [RemoteTemplate(self, t) for t in self._run(self._async.templates())]

    def create_template(self, name: str, *, image: str = "demo", memory: str | int = "512M",
                        prepare: str | None = None, accel: str = "auto",
                        on_clone: str | None = None) -> RemoteTemplate:
        """Boot *image*, run *prepare*, freeze it into template *name*."""
        return RemoteTemplate(self, self._run(self._async.create_template(
            name, image=image, memory=memory, prepare=prepare, accel=accel,
            on_clone=on_clone)))


class RemoteVM:
    """A handle on one VM of the daemon (see :class:`vmfork.client.AsyncRemoteVM`)."""

    def __init__(self, host: Client, handle: AsyncRemoteVM) -> None:
        self.host = host
        self._a = handle

    @property
    def name(self) -> str:
        return self._a.name

    @property
    def result(self) -> Result | None:
        """The result of the call that returned this handle."""
        return self._a.result

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"

    def __enter__(self) -> RemoteVM:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        """Leaving ``with`` stops the VM (it may be gone already)."""
        with contextlib.suppress(NotFound):
            self.stop()

    def status(self) -> VMStatus:
        return self.host._run(self._a.status())

    def exec(self, command: str, *, timeout: float | None = None,
             agent: str = "auto") -> ExecResult:
        """Run the shell *command* in the guest; stdout, stderr, exit code."""
        return self.host._run(self._a.exec(command, timeout=timeout, agent=agent))

    def exec_stream(self, command: str, *, timeout: float | None = None,
                    agent: str = "auto") -> Iterator[OutputChunk | ExecExit]:
        """Run the shell *command* in the guest; its output as it comes, then
        an :class:`~vmfork.results.ExecExit` (as :meth:`vmfork.VM.exec_stream`).
        Leaving the loop early ends the command."""
        return self.host._loop.iterate(
            self._a.exec_stream(command, timeout=timeout, agent=agent))

    def pause(self) -> None:
        self.host._run(self._a.pause())

    def resume(self) -> None:
        self.host._run(self._a.resume())

    def stop(self, *, force: bool = False) -> None:
        """End the VM's QEMU and remove the VM with its files."""
        self.host._run(self._a.stop(force=force))

    def update(self, *, qemu: str | None = None, mode: str = "auto",
               timeout: float | None = None) -> UpdateReport:
        """Live update into a new QEMU process (rolls back on failure)."""
        return self.host._run(self._a.update(qemu=qemu, mode=mode, timeout=timeout))

    def fork(self, count: int | None = None, *, names: Sequence[str] | None = None,
             on_clone: str | None = None) -> ForkReport:
        """Branch this running VM into children; it keeps running (see
        :meth:`vmfork.VM.fork`)."""
        return self.host._run(self._a.fork(count, names=names, on_clone=on_clone))

    def save(self) -> SaveResult:
        return self.host._run(self._a.save())

    def restore(self) -> RestoreResult:
        return self.host._run(self._a.restore())

    def read_file(self, path: str) -> bytes:
        """The bytes of the guest file *path*."""
        return self.host._run(self._a.read_file(path))

    def write_file(self, path: str, data: bytes) -> None:
        """Write *data* to the guest file *path*."""
        self.host._run(self._a.write_file(path, data))

    def make_template(self, name: str, *, on_clone: str | None = None) -> RemoteTemplate:
        """Freeze this VM into template *name*; the VM ends."""
        return RemoteTemplate(self.host, self.host._run(
            self._a.make_template(name, on_clone=on_clone)))


class RemoteClone(RemoteVM):
    """A VM just cloned from a template; :attr:`result` has its timings."""

    def __init__(self, host: Client, handle: AsyncRemoteClone) -> None:
        super().__init__(host, handle)
        self._clone = handle

    @property
    def result(self) -> CloneResult:
        return self._clone.result


class RemoteTemplate:
    """A handle on one template of the daemon: its name and its client."""

    def __init__(self, host: Client, handle: AsyncRemoteTemplate) -> None:
        self.host = host
        self._a = handle

    @property
    def name(self) -> str:
        return self._a.name

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"

    @property
    def result(self) -> TemplateManifest | None:
        """The manifest when the call that returned this handle made the template."""
        return self._a.result

    def inspect(self) -> TemplateManifest:
        return self.host._run(self._a.inspect())

    def status(self) -> TemplateStatus:
        return self.host._run(self._a.status())

    def clones(self) -> list[RemoteVM]:
        """The VMs cloned from this template that exist now."""
        return [RemoteVM(self.host, v) for v in self.host._run(self._a.clones())]

    @overload
    def clone(self, count: None = None, *, name: str | None = None,
              names: Sequence[str] | None = None, use_pool: bool = True,
              on_clone: str | None = None, all_or_nothing: bool = False,
              max_starting: int | None = None) -> RemoteClone: ...

    @overload
    def clone(self, count: int, *, name: str | None = None,
              names: Sequence[str] | None = None, use_pool: bool = True,
              on_clone: str | None = None, all_or_nothing: bool = False,
              max_starting: int | None = None) -> list[RemoteClone]: ...

    def clone(self, count: int | None = None, *, name: str | None = None,
              names: Sequence[str] | None = None, use_pool: bool = True,
              on_clone: str | None = None, all_or_nothing: bool = False,
              max_starting: int | None = None) -> RemoteClone | list[RemoteClone]:
        """One clone (a context manager that stops it), or a list of *count*
        (*names*: one name per clone)."""
        if count is None:
            one = self.host._run(self._a.clone(name=name, names=names, use_pool=use_pool,
                                               on_clone=on_clone,
                                               all_or_nothing=all_or_nothing,
                                               max_starting=max_starting))
            return RemoteClone(self.host, one)
        many = self.host._run(self._a.clone(count, name=name, names=names,
                                            use_pool=use_pool, on_clone=on_clone,
                                            all_or_nothing=all_or_nothing,
                                               max_starting=max_starting))
        return [RemoteClone(self.host, c) for c in many]

    def pool(self, size: int | None = None, *, warm: bool | None = None) -> PoolStatus:
        """Set the pool's target, which the daemon keeps; without arguments,
        its status."""
        return self.host._run(self._a.pool(size, warm=warm))

    def remove(self, *, force: bool = False) -> None:
        self.host._run(self._a.remove(force=force))


__all__ = ["Client", "RemoteClone", "RemoteTemplate", "RemoteVM"]
