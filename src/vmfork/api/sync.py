"""The synchronous flavour of vmfork's public API: :class:`Host`, :class:`VM`,
:class:`Template` — the same names and results as :mod:`vmfork.api.aio`,
for scripts and notebooks.

Each call runs the asyncio operation on an event loop of the host's own,
on a thread of its own (:class:`vmfork.loopthread.LoopThread`), so it also
works where the caller already runs a loop (a notebook). If the caller is
interrupted (Ctrl-C) while it waits, the operation is cancelled and its
cleanup runs before the interrupt goes on.
"""

from __future__ import annotations

import contextlib
from collections.abc import Coroutine, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar, overload

from vmfork.api.aio import AsyncClone, AsyncHost, AsyncTemplate, AsyncVM
from vmfork.errors import NotFound
from vmfork.images.demo import GuestImage
from vmfork.loopthread import LoopThread
from vmfork.records import TemplateManifest
from vmfork.results import (
    CloneResult,
    ExecExit,
    ExecResult,
    ExportResult,
    FileResult,
    ForkReport,
    OutputChunk,
    PoolStatus,
    PublishResult,
    PullResult,
    RestoreResult,
    Result,
    SaveResult,
    TemplateStatus,
    UpdateReport,
    VMStatus,
)
from vmfork.timeouts import DEFAULT, Timeouts

T = TypeVar("T")


class Host:
    """The VMs and templates under one vmfork home (``$VMFORK_HOME`` by default).

    Use ``with vmfork.open() as host:``. VMs and templates outlive the host
    object: they belong to the home, not to this process."""

    def __init__(self, home: Path | str | None = None, memory_dir: Path | str | None = None,
                 timeouts: Timeouts = DEFAULT) -> None:
        self._loop = LoopThread(cleanup_seconds=3 * timeouts.stop + timeouts.qmp)

        async def make() -> AsyncHost:
            return AsyncHost(home, memory_dir, timeouts)
        try:
            self._async = self._loop.run(make())
        except BaseException:
            self._loop.close()
            raise

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self._loop.run(coro)

    @property
    def home(self) -> Path:
        return self._async.home

    def __enter__(self) -> Host:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Release the catalog and the host's event loop (VMs keep running)."""
        if self._loop.is_open:
            self._run(self._async.close())
        self._loop.close()

    def _vm(self, handle: AsyncVM) -> VM:
        return Clone(self, handle) if isinstance(handle, AsyncClone) else VM(self, handle)

    # -- VMs --------------------------------------------------------------------
    def run(self, name: str, *, image: str | None = None, memory: str | int = "256M",
            cpus: int = 1, kernel: str | None = None, initrd: str | None = None,
            append: str | None = None, disks: Sequence[str] = (),
            net: str | bool | None = None, ports: Sequence[tuple[int, int]] = (),
            persistent: bool = False, memory_dir: str | None = None,
            memory_backend: str = "file", accel: str = "auto",
            qemu: str = "qemu-system-x86_64", overlay: bool = True, qga: bool = True,
            wait_ready: bool = True, ready: str = "auto",
            idle_pause: float | None = None) -> VM:
        """Start VM *name*; see :meth:`vmfork.AsyncHost.run`."""
        return self._vm(self._run(self._async.run(
            name, image=image, memory=memory, cpus=cpus, kernel=kernel, initrd=initrd,
            append=append, disks=disks, net=net, ports=ports, persistent=persistent,
            memory_dir=memory_dir, memory_backend=memory_backend, accel=accel, qemu=qemu,
            overlay=overlay, qga=qga, wait_ready=wait_ready, ready=ready,
            idle_pause=idle_pause)))

    def set_idle_pause(self, name: str, seconds: float | None) -> str:
        """See :meth:`vmfork.AsyncHost.set_idle_pause`."""
        return self._run(self._async.set_idle_pause(name, seconds))

    def vm(self, name: str) -> VM:
        """The VM *name* (NotFound if there is none)."""
        return self._vm(self._run(self._async.vm(name)))

    def vms(self) -> list[VM]:
        """Every VM of this home, oldest first."""
        return [self._vm(v) for v in self._run(self._async.vms())]

    def ls(self) -> list[VMStatus]:
        """Every VM's status (``vmfork ls``)."""
        return self._run(self._async.ls())

    # -- templates --------------------------------------------------------------
    def template(self, name: str) -> Template:
        """The template *name* (NotFound if there is none)."""
        return Template(self, self._run(self._async.template(name)))

    def templates(self) -> list[Template]:
        """Every template of this home, oldest first."""
        return [Template(self, t) for t in self._run(self._async.templates())]

    def create_template(self, name: str, *, image: str = "demo", memory: str | int = "512M",
                        prepare: str | None = None, accel: str = "auto",
                        on_clone: str | None = None) -> Template:
        """Boot *image*, run *prepare*, freeze it into template *name*."""
        return Template(self, self._run(self._async.create_template(
            name, image=image, memory=memory, prepare=prepare, accel=accel,
            on_clone=on_clone)))

    def pull_template(self, url: str, name: str | None = None, *, lazy: bool = True,
                      token_file: Path | str | None = None) -> PullResult:
        """Pull the template published at *url* as template *name*."""
        return self._run(self._async.pull_template(url, name, lazy=lazy,
                                                   token_file=token_file))

    # -- snapshot files, images, recovery ---------------------------------------
    def import_snapshot(self, file: Path | str, name: str, *, persistent: bool = False,
                        memory_dir: Path | str | None = None) -> VM:
        """Start VM *name* from a snapshot file."""
        return self._vm(self._run(self._async.import_snapshot(
            file, name, persistent=persistent, memory_dir=memory_dir)))

    def import_template(self, file: Path | str, name: str, *, persistent: bool = False,
                        memory_dir: Path | str | None = None) -> Template:
        """Make template *name* from a snapshot file."""
        return Template(self, self._run(self._async.import_template(
            file, name, persistent=persistent, memory_dir=memory_dir)))

    def image(self, name: str = "demo", *, rebuild: bool = False) -> GuestImage:
        """Build (once; cached) a named guest image and return its files."""
        return self._run(self._async.image(name, rebuild=rebuild))

    def settle(self) -> list[str]:
        """Finish or undo every update a killed vmfork left half done."""
        return self._run(self._async.settle())


class VM:
    """A handle on one VM: its name and its host (see :class:`vmfork.AsyncVM`)."""

    def __init__(self, host: Host, handle: AsyncVM) -> None:
        self.host = host
        self._a = handle

    @property
    def name(self) -> str:
        return self._a.name

    @property
    def result(self) -> Result | None:
        """The result of the call that returned this handle (see
        :class:`vmfork.AsyncVM`)."""
        return self._a.result

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"

    def __enter__(self) -> VM:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        """Leaving ``with`` stops the VM (it may be gone already)."""
        with contextlib.suppress(NotFound):
            self.stop()

    def console_socket(self) -> str:
        """The UNIX socket of the VM's serial console."""
        return self.host._run(self._a.console_socket())

    def status(self) -> VMStatus:
        return self.host._run(self._a.status())

    def exec(self, command: str, *, timeout: float | None = None,
             agent: str = "auto") -> ExecResult:
        """Run the shell *command* in the guest; stdout, stderr, exit code."""
        return self.host._run(self._a.exec(command, timeout=timeout, agent=agent))

    def exec_stream(self, command: str, *, timeout: float | None = None,
                    agent: str = "auto") -> Iterator[OutputChunk | ExecExit]:
        """Run the shell *command* in the guest; its output as it comes
        (:class:`~vmfork.exec_stream.OutputChunk`), then an
        :class:`~vmfork.results.ExecExit`. Leaving the loop early ends the
        command."""
        return self.host._loop.iterate(
            self._a.exec_stream(command, timeout=timeout, agent=agent))

    def read_file(self, path: str, *, agent: str = "auto") -> bytes:
        """The bytes of the file *path* in the guest (at most 16 MiB)."""
        return self.host._run(self._a.read_file(path, agent=agent))

    def write_file(self, path: str, data: bytes, *, mode: int = 0o644,
                   agent: str = "auto") -> FileResult:
        """Write *data* (at most 16 MiB) to *path* in the guest, with *mode*."""
        return self.host._run(self._a.write_file(path, data, mode=mode, agent=agent))

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

    def save(self) -> SaveResult:
        return self.host._run(self._a.save())

    def restore(self) -> RestoreResult:
        return self.host._run(self._a.restore())

    def export(self, file: Path | str) -> ExportResult:
        return self.host._run(self._a.export(file))

    def fork(self, count: int | None = None, *, names: Sequence[str] | None = None,
             on_clone: str | None = None) -> ForkReport:
        """Branch this running VM into *count* children (or one per name of
        *names*) that start from its state at one instant; it keeps running
        (see :meth:`vmfork.AsyncVM.fork`). The children are VMs of the host:
        ``host.vm(child.name) for child in report.children``."""
        return self.host._run(self._a.fork(count, names=names, on_clone=on_clone))

    def make_template(self, name: str, *, on_clone: str | None = None) -> Template:
        """Freeze this VM into template *name*; the VM ends."""
        return Template(self.host, self.host._run(self._a.make_template(name,
                                                                        on_clone=on_clone)))


class Clone(VM):
    """A VM just cloned from a template; :attr:`result` has its timings."""

    def __init__(self, host: Host, handle: AsyncClone) -> None:
        super().__init__(host, handle)
        self._clone = handle

    @property
    def result(self) -> CloneResult:
        return self._clone.result


class Template:
    """A handle on one template: its name and its host."""

    def __init__(self, host: Host, handle: AsyncTemplate) -> None:
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

    def publish(self, directory: Path | str) -> PublishResult:
        """Write the template's published layout into *directory* (see
        :meth:`vmfork.api.aio.AsyncTemplate.publish`)."""
        return self.host._run(self._a.publish(directory))

    def clones(self) -> list[VM]:
        """The VMs cloned from this template that exist now."""
        return [VM(self.host, v) for v in self.host._run(self._a.clones())]

    @overload
    def clone(self, count: None = None, *, name: str | None = None,
              names: Sequence[str] | None = None, use_pool: bool = True,
              on_clone: str | None = None, all_or_nothing: bool = False,
              max_starting: int | None = None) -> Clone: ...

    @overload
    def clone(self, count: int, *, name: str | None = None,
              names: Sequence[str] | None = None, use_pool: bool = True,
              on_clone: str | None = None, all_or_nothing: bool = False,
              max_starting: int | None = None) -> list[Clone]: ...

    def clone(self, count: int | None = None, *, name: str | None = None,
              names: Sequence[str] | None = None, use_pool: bool = True,
              on_clone: str | None = None, all_or_nothing: bool = False,
              max_starting: int | None = None) -> Clone | list[Clone]:
        """One clone (a context manager that stops it), or a list of *count*
        (*names*: one name per clone)."""
        if count is None:
            one = self.host._run(self._a.clone(name=name, names=names, use_pool=use_pool,
                                               on_clone=on_clone,
                                               all_or_nothing=all_or_nothing,
                                               max_starting=max_starting))
            return Clone(self.host, one)
        many = self.host._run(self._a.clone(count, name=name, names=names,
                                            use_pool=use_pool, on_clone=on_clone,
                                            all_or_nothing=all_or_nothing,
                                               max_starting=max_starting))
        return [Clone(self.host, c) for c in many]

    def pool(self, size: int | None = None, *, warm: bool | None = None) -> PoolStatus:
        """Set the pool's target and fill it once; without arguments, its status."""
        return self.host._run(self._a.pool(size, warm=warm))

    def keep_pool(self, size: int | None = None, *, warm: bool | None = None) -> PoolStatus:
        """Keep the pool at its target until interrupted (Ctrl-C); members stay."""
        return self.host._run(self._a.keep_pool(size, warm=warm))

    def remove(self, *, force: bool = False) -> None:
        self.host._run(self._a.remove(force=force))


def open(home: Path | str | None = None, memory_dir: Path | str | None = None,
         timeouts: Timeouts = DEFAULT) -> Host:
    """The vmfork home *home* (default ``$VMFORK_HOME``, else
    ``~/.local/share/vmfork``), for ``with vmfork.open() as host:``."""
    return Host(home, memory_dir, timeouts)
