"""The asyncio flavour of vmfork's public API: :class:`AsyncHost` and its
handles :class:`AsyncVM` and :class:`AsyncTemplate`.

A handle is a name plus the host it lives on; it holds no state of the VM or
template, so it never goes stale: every method reads the catalog afresh. Each
method is one library operation, with the host's deadlines; every result is a
frozen dataclass from :mod:`vmfork.results` (or a handle). Operations on one
VM first settle an update of it that a killed vmfork left half done
(:mod:`vmfork.update.recovery`), and a template creation from it
(:mod:`vmfork.templates.recovery`); operations on templates first settle a
creation or removal of theirs: the next command finishes or undoes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import overload

from vmfork import guest_files, idle, listing, vm
from vmfork.errors import InvalidInput, NotFound
from vmfork.exec_stream import ExecStream
from vmfork.fork import base as fork_base
from vmfork.fork import recovery as fork_recovery
from vmfork.fork import run as fork_run
from vmfork.images.demo import GuestImage, demo_image
from vmfork.launch import paths_for
from vmfork.lazy import publish
from vmfork.names import check_name
from vmfork.records import TemplateManifest
from vmfork.results import (
    CloneResult,
    ExecResult,
    ExportResult,
    FileResult,
    ForkReport,
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
from vmfork.snapshots import export, imports, save
from vmfork.spec import parse_memory
from vmfork.store import Store
from vmfork.tasks import run_to_end
from vmfork.templates import catalog, clone, create, pool
from vmfork.templates import recovery as template_recovery
from vmfork.templates.manifest import template_dir
from vmfork.timeouts import DEFAULT, Timeouts, check_seconds
from vmfork.update import live as live_update
from vmfork.update import recovery

#: Named guest images (``image=`` of :meth:`AsyncHost.run`).
IMAGES = vm.IMAGES


def fork_children(count: int | None = None,
                  names: Sequence[str] | None = None) -> tuple[int, list[str] | None]:
    """How many children a fork request asks for, and their names (None:
    ``NAME-k``, chosen by the fork): *count* (default ``len(names)``, else
    1) must be 1-64 and agree with *names*, which must be valid names, each
    once. InvalidInput otherwise. The CLI, the API and the daemon ask this
    before anything is done."""
    n = count if count is not None else len(names) if names is not None else 1
    try:
        clone.check_count(n)
    except InvalidInput:
        raise InvalidInput(f"invalid fork count {n}: must be 1-{clone.MAX_CLONES} children "
                           "per fork") from None
    if names is None:
        return n, None
    if len(names) != n:
        raise InvalidInput(f"{len(names)} name{'' if len(names) == 1 else 's'} for {n} "
                           f"{'child' if n == 1 else 'children'}: give one name per child")
    for name in names:
        check_name(name)
    repeated = sorted({x for x in names if names.count(x) > 1})
    if repeated:
        raise InvalidInput(f"child names given more than once: {', '.join(repeated)}")
    return n, list(names)


class AsyncHost:
    """The VMs and templates under one vmfork home (``$VMFORK_HOME`` by default).

    Use ``async with vmfork.open_async() as host:``; :meth:`close` releases the
    catalog. VMs and templates outlive the host object: they belong to the
    home, not to this process."""

    def __init__(self, home: Path | str | None = None, memory_dir: Path | str | None = None,
                 timeouts: Timeouts = DEFAULT) -> None:
        self.store = Store(home, memory_dir)
        self.timeouts = timeouts

    @property
    def home(self) -> Path:
        return self.store.home

    async def __aenter__(self) -> AsyncHost:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    async def close(self) -> None:
        self.store.close()

    # -- VMs --------------------------------------------------------------------
    async def run(self, name: str, *, image: str | None = None, memory: str | int = "256M",
                  cpus: int = 1, kernel: str | None = None, initrd: str | None = None,
                  append: str | None = None, disks: Sequence[str] = (),
                  net: str | bool | None = None,
                  ports: Sequence[tuple[int, int]] = (), persistent: bool = False,
                  memory_dir: str | None = None, memory_backend: str = "file",
                  accel: str = "auto", qemu: str = "qemu-system-x86_64", overlay: bool = True,
                  qga: bool = True, wait_ready: bool = True, ready: str = "auto",
                  idle_pause: float | None = None) -> AsyncVM:
        """Start VM *name* and return once its guest is ready.

        *image* names a guest vmfork builds (``"demo"``, ``"debian"``); or
        boot your own with *kernel* (and *initrd*, *append*) and/or *disks*.
        *memory* is a size (``"512M"``, ``"1G"``, or a number of MiB). *net*
        is ``"user"`` or ``"none"`` (True/False say the same); *ready* how to
        know the guest is ready: ``"auto"`` (vmfork's boot marker or an
        answer of qemu-guest-agent), ``"qga"``, ``"console:REGEX"``,
        ``"tcp:PORT"`` or ``"none"``. *idle_pause*: seconds without use after
        which vmfork pauses the VM, woken by its next use (:mod:`vmfork.idle`;
        the watcher runs in the daemon or ``vmfork idle --keep``). The
        handle's :attr:`~AsyncVM.result` is the VM's status when it was ready."""
        if isinstance(net, bool):
            net = "user" if net else "none"
        opts = vm.RunOptions(
            name=name, memory_mib=parse_memory(memory), cpus=cpus, kernel=kernel,
            initrd=initrd, append=append, disks=tuple(disks), net=net, ports=tuple(ports),
            memory_dir=memory_dir, memory_backend=memory_backend, accel=accel, qemu=qemu,
            wait_ready=wait_ready, ready=ready, persistent=persistent, image=image,
            overlay=overlay, qga=qga, idle_pause=idle_pause)
        status = await vm.run(self.store, opts, self.timeouts)
        return AsyncVM(self, name, status)

    async def set_idle_pause(self, name: str, seconds: float | None) -> str:
        """Give VM or template *name* an idle policy: paused after *seconds*
        without use (None or 0: never); a template's holds for the clones
        made from then on. Returns ``"vm"`` or ``"template"``."""
        return await idle.set_policy(self.store, name, seconds)

    async def vm(self, name: str) -> AsyncVM:
        """The VM *name* (NotFound if there is none)."""
        self.store.get_vm(check_name(name))
        return AsyncVM(self, name)

    async def vms(self) -> list[AsyncVM]:
        """Every VM of this home, oldest first."""
        return [AsyncVM(self, r.name) for r in self.store.list_vms()]

    async def ls(self) -> list[VMStatus]:
        """What ``vmfork ls`` shows: every VM's status (a VM whose QEMU died
        shows as ``dead``)."""
        return listing.statuses(self.store)

    # -- templates --------------------------------------------------------------
    async def template(self, name: str) -> AsyncTemplate:
        """The template *name* (NotFound if there is none; StateError while
        it is being made or removed)."""
        await template_recovery.settle(self.store, name, self.timeouts)
        catalog.get(self.store, name)
        return AsyncTemplate(self, name)

    async def templates(self) -> list[AsyncTemplate]:
        """Every template of this home, oldest first, with those being made
        or removed (their :meth:`AsyncTemplate.status` says so)."""
        await template_recovery.settle_all(self.store, self.timeouts)
        return [AsyncTemplate(self, n) for n in self.store.template_names()]

    async def create_template(self, name: str, *, image: str = "demo",
                              memory: str | int = "512M", prepare: str | None = None,
                              accel: str = "auto",
                              on_clone: str | None = None) -> AsyncTemplate:
        """Boot *image*, run *prepare* in the guest, and freeze it into template
        *name* (``vmfork template create NAME --demo``)."""
        if image != "demo":
            raise InvalidInput(f"create_template boots the demo image; for {image!r}, "
                               "run a VM and call make_template on it")
        manifest = await create.create_demo(self.store, name, parse_memory(memory), prepare,
                                            accel, self.timeouts, on_clone=on_clone)
        return AsyncTemplate(self, name, manifest)

    async def pull_template(self, url: str, name: str | None = None, *, lazy: bool = True,
                            token_file: Path | str | None = None) -> PullResult:
        """Pull the template published at *url* (a daemon's
        ``http://HOST:PORT/v1/templates/NAME`` or a published directory's
        base URL) as template *name* (default: its name there); *lazy*: its
        memory arrives on first read, else all of it first (``vmfork
        template pull``). Returns once the template can be cloned."""
        from vmfork.lazy import pull

        return await pull.pull(self.store, url, name, lazy=lazy, token_file=token_file,
                               timeouts=self.timeouts)

    # -- snapshot files ---------------------------------------------------------
    async def import_snapshot(self, file: Path | str, name: str, *, persistent: bool = False,
                              memory_dir: Path | str | None = None) -> AsyncVM:
        """Start VM *name* from a snapshot file (``vmfork snapshot import``)."""
        result = await imports.import_(self.store, file, name, persistent=persistent,
                                       memory_dir=memory_dir, timeouts=self.timeouts)
        return AsyncVM(self, name, result)

    async def import_template(self, file: Path | str, name: str, *, persistent: bool = False,
                              memory_dir: Path | str | None = None) -> AsyncTemplate:
        """Make template *name* from a snapshot file (``snapshot import --as-template``)."""
        manifest = await imports.import_template(self.store, file, name,
                                                 persistent=persistent, memory_dir=memory_dir,
                                                 timeouts=self.timeouts)
        return AsyncTemplate(self, name, manifest)

    # -- images -----------------------------------------------------------------
    async def image(self, name: str = "demo", *, rebuild: bool = False) -> GuestImage:
        """Build (once; cached) a named guest image and return its files."""
        if name == "demo":
            return await asyncio.to_thread(demo_image, self.store.images_dir, rebuild)
        if name == "debian":
            from vmfork.images.debian import debian_image
            return await asyncio.to_thread(debian_image, self.store.images_dir, None, rebuild)
        raise InvalidInput(f"unknown image {name!r}: use one of {', '.join(IMAGES)}")

    async def settle(self) -> list[str]:
        """Finish or undo every template creation or removal and every update
        that a killed vmfork left half done; return the templates and VMs it
        settled."""
        done = await template_recovery.settle_all(self.store, self.timeouts)
        done += await fork_recovery.settle_all(self.store, self.timeouts)
        return done + await recovery.settle_all(self.store, self.timeouts)


class AsyncVM:
    """A handle on one VM: its name and its host. :attr:`result` is the
    result of the call that returned the handle (the run's :class:`VMStatus`,
    an :class:`ImportResult`, ...; None from :meth:`AsyncHost.vm`)."""

    def __init__(self, host: AsyncHost, name: str, result: Result | None = None) -> None:
        self.host = host
        self.name = name
        self.result = result

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"

    async def __aenter__(self) -> AsyncVM:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        """Leaving ``async with`` stops the VM (it may be gone already)."""
        with contextlib.suppress(NotFound):
            await self.stop()

    @property
    def _store(self) -> Store:
        return self.host.store

    async def _settle(self) -> None:
        await self._settle_template()
        await fork_recovery.settle(self._store, check_name(self.name), self.host.timeouts)
        await recovery.settle(self._store, self.name, self.host.timeouts)

    async def _settle_template(self) -> None:
        """Finish or undo a template creation from this VM whose vmfork died
        (it may have left the VM paused, or its file systems frozen)."""
        await template_recovery.settle_vm(self._store, check_name(self.name),
                                          self.host.timeouts)

    async def console_socket(self) -> str:
        """The UNIX socket of the VM's serial console (a live VM's); what the
        console printed so far goes to its console.log first."""
        await self._settle()
        await idle.wake(self._store, self.name, self.host.timeouts)
        rec = vm.get_live(self._store, self.name)
        await vm.drain_console(self._store, self.name, self.host.timeouts)
        return paths_for(self._store, rec).console

    async def status(self) -> VMStatus:
        """The VM as the catalog and the host see it now."""
        return listing.describe(self._store.get_vm(check_name(self.name)))

    async def exec(self, command: str, *, timeout: float | None = None,
                   agent: str = "auto") -> ExecResult:
        """Run the shell *command* in the guest (in ``/root``); stdout, stderr
        and exit code come back apart. *agent*: ``auto`` (qemu-guest-agent
        where the VM has its port, else vmfork's serial agent), ``serial``,
        ``qga``."""
        await self._settle()
        async with idle.in_use(self._store, self.name, self.host.timeouts):
            return await vm.exec_(self._store, self.name, command, timeout=timeout,
                                  timeouts=self.host.timeouts, agent=agent)

    def exec_stream(self, command: str, *, timeout: float | None = None,
                    agent: str = "auto") -> ExecStream:
        """The shell *command*, to run in the guest with its output read while
        it runs: ``async with vm.exec_stream(cmd) as s: async for ev in s``
        gives :class:`~vmfork.exec_stream.OutputChunk` events and, last, an
        :class:`~vmfork.results.ExecExit` (:mod:`vmfork.exec_stream`)."""
        return _SettledStream(self, command, timeout=timeout, agent=agent)

    async def read_file(self, path: str, *, agent: str = "auto") -> bytes:
        """The bytes of the file *path* in the guest (at most 16 MiB,
        :data:`vmfork.guest_files.MAX_FILE`)."""
        await self._settle()
        return await guest_files.read_file(self._store, self.name, path,
                                           timeouts=self.host.timeouts, agent=agent)

    async def write_file(self, path: str, data: bytes, *, mode: int = 0o644,
                         agent: str = "auto") -> FileResult:
        """Write *data* (at most 16 MiB) to the file *path* in the guest, with
        permissions *mode*; the file is replaced whole, in one rename."""
        await self._settle()
        return await guest_files.write_file(self._store, self.name, path, data, mode=mode,
                                            timeouts=self.host.timeouts, agent=agent)

    async def pause(self) -> None:
        await self._settle()
        await vm.pause(self._store, self.name, self.host.timeouts)

    async def resume(self) -> None:
        await self._settle()
        await vm.resume(self._store, self.name, self.host.timeouts)

    async def stop(self, *, force: bool = False) -> None:
        """End the VM's QEMU and remove the VM with its memory file and sockets
        (and whatever a half-done update of it left)."""
        await self._settle_template()
        await vm.stop(self._store, self.name, force=force, timeouts=self.host.timeouts)
        await fork_base.collect(self._store, self.host.timeouts)

    async def update(self, *, qemu: str | None = None, mode: str = "auto",
                     timeout: float | None = None) -> UpdateReport:
        """Move the running guest into a new QEMU process (``qemu`` binary,
        default the VM's own) without copying RAM where the mode allows;
        rolls back on any failure."""
        timeouts = self.host.timeouts
        if timeout is not None:
            timeouts = dataclasses.replace(timeouts,
                                           migrate=check_seconds(timeout, "update timeout"))
        await self._settle_template()
        return await live_update.update(self._store, self.name, qemu=qemu, mode=mode,
                                        timeouts=timeouts)

    async def save(self) -> SaveResult:
        """Write the device state of a persistent VM; its QEMU ends, RAM stays
        in the memory file on disk."""
        await self._settle()
        return await save.save(self._store, self.name, self.host.timeouts)

    async def restore(self) -> RestoreResult:
        """Start a saved VM again from its memory file and device state."""
        return await save.restore(self._store, self.name, self.host.timeouts)

    async def export(self, file: Path | str) -> ExportResult:
        """Write the VM (kernel, initrd, RAM, device state) into one snapshot file."""
        await self._settle()
        return await export.export(self._store, self.name, file, self.host.timeouts)

    async def fork(self, count: int | None = None, *, names: Sequence[str] | None = None,
                   on_clone: str | None = None) -> ForkReport:
        """Branch this running VM into children that start from its RAM,
        devices and disks at one instant, while it keeps running (paused once,
        for :attr:`~vmfork.results.ForkReport.parent_pause_ms`; its identity
        unchanged). Each child gets its own identity like a clone, then runs
        *on_clone* (a shell command); a child whose hook fails is removed with
        the others of this call.

        *count* children (1-64; default ``len(names)``, else 1) named
        ``NAME-1``.. (the lowest free), or *names* one by one; returns when
        every child runs and answers. The children are VMs of the host
        (:meth:`AsyncHost.vm`); :attr:`~vmfork.results.ForkReport.children`
        has their timings."""
        n, child_names = fork_children(count, names)
        await self._settle()
        return await fork_run.fork(self._store, check_name(self.name), names=child_names,
                                  count=n, on_clone=on_clone, timeouts=self.host.timeouts)

    async def make_template(self, name: str, *, on_clone: str | None = None) -> AsyncTemplate:
        """Freeze this VM into template *name*: device state saved, RAM left in
        place as the template's memory. The VM ends."""
        await self._settle()
        manifest = await create.create_from_vm(self._store, name, self.name,
                                               self.host.timeouts, on_clone=on_clone)
        return AsyncTemplate(self.host, name, manifest)


class _SettledStream(ExecStream):
    """An :class:`ExecStream` that settles its VM first, as every method of
    :class:`AsyncVM` does."""

    def __init__(self, handle: AsyncVM, command: str, *, timeout: float | None,
                 agent: str) -> None:
        super().__init__(handle.host.store, handle.name, command, timeout=timeout,
                         timeouts=handle.host.timeouts, agent=agent)
        self._handle = handle

    async def start(self) -> None:
        await self._handle._settle()
        await super().start()


class AsyncClone(AsyncVM):
    """A VM just cloned from a template; :attr:`result` has its timings."""

    result: CloneResult

    def __init__(self, host: AsyncHost, result: CloneResult) -> None:
        super().__init__(host, result.name, result)


class AsyncTemplate:
    """A handle on one template: its name and its host. :attr:`result` is the
    manifest when the call that returned the handle made the template."""

    def __init__(self, host: AsyncHost, name: str,
                 result: TemplateManifest | None = None) -> None:
        self.host = host
        self.name = name
        self.result = result

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"

    @property
    def _store(self) -> Store:
        return self.host.store

    async def _settle(self) -> bool:
        return await template_recovery.settle(self._store, self.name, self.host.timeouts)

    async def inspect(self) -> TemplateManifest:
        """The template's manifest: what it was made from and what a clone checks."""
        await self._settle()
        return catalog.get(self._store, self.name)

    async def status(self) -> TemplateStatus:
        """The template as ``vmfork template ls`` shows it (its ``status``:
        ``ready``, or ``creating``/``removing`` while a command works on it)."""
        return catalog.status_of(self._store, self.name)

    async def clones(self) -> list[AsyncVM]:
        """The VMs cloned from this template that exist now."""
        catalog.get(self._store, self.name)
        return [AsyncVM(self.host, n) for n in catalog.users(self._store, self.name)]

    @overload
    async def clone(self, count: None = None, *, name: str | None = None,
                    names: Sequence[str] | None = None, use_pool: bool = True,
                    on_clone: str | None = None, all_or_nothing: bool = False,
                    max_starting: int | None = None) -> AsyncClone: ...

    @overload
    async def clone(self, count: int, *, name: str | None = None,
                    names: Sequence[str] | None = None, use_pool: bool = True,
                    on_clone: str | None = None, all_or_nothing: bool = False,
                    max_starting: int | None = None) -> list[AsyncClone]: ...

    async def clone(self, count: int | None = None, *, name: str | None = None,
                    names: Sequence[str] | None = None, use_pool: bool = True,
                    on_clone: str | None = None, all_or_nothing: bool = False,
                    max_starting: int | None = None) -> AsyncClone | list[AsyncClone]:
        """Start clones of this template and return when they run with their
        own identity (and their on-clone hook has run).

        Without *count*: one clone (use it as ``async with await
        tpl.clone() as c:`` to stop it at the end of the block); with
        *count*: a list. *name* names the clone (``NAME-1``.. with *count*);
        *names* gives each clone's name (as many as *count*; not with
        *name*); *on_clone* replaces the template's hook for this call
        (``""``: none). A clone that fails is undone and the others run on
        (:class:`vmfork.PartialClone` names both), unless *all_or_nothing*.
        At most *max_starting* (default 4) are being started at once."""
        n = clone.check_count(1 if count is None else count)
        if names is not None and name:
            raise InvalidInput("give either name or names, not both")
        if names is not None and len(names) != n:
            raise InvalidInput(f"{len(names)} names for {n} clones: give one per clone")
        await self._settle()
        if names is None and name:
            names = [name] if count is None else [f"{name}-{i}" for i in range(1, n + 1)]
        results = await clone.clone(self._store, self.name,
                                    names=None if names is None else list(names), count=n,
                                    use_pool=use_pool, timeouts=self.host.timeouts,
                                    on_clone=on_clone, all_or_nothing=all_or_nothing,
                                    max_starting=max_starting or clone.MAX_STARTING)
        clones = [AsyncClone(self.host, r) for r in results]
        return clones[0] if count is None else clones

    async def pool(self, size: int | None = None, *, warm: bool | None = None) -> PoolStatus:
        """Set the pool's target (*size*, *warm*; None keeps each) and fill it
        once; return its status. Without arguments: only the status."""
        await self._settle()
        if size is not None or warm is not None:
            target = self._store.pool_target(self.name) if size is None else size
            await pool.set_pool(self._store, self.name, target, self.host.timeouts, warm=warm)
        else:
            catalog.get(self._store, self.name)
        return pool.pool_status(self._store, self.name)

    async def keep_pool(self, size: int | None = None, *, warm: bool | None = None,
                        stop: asyncio.Event | None = None) -> PoolStatus:
        """Keep the pool at its target (*size*, *warm*; None keeps each) until
        *stop* is set or the call is cancelled: members taken by clones or
        whose QEMU died are replaced. Members stay when it ends."""
        await self._settle()
        return await pool.keep(self._store, self.name, size, warm, stop=stop,
                               timeouts=self.host.timeouts)

    async def publish(self, directory: Path | str) -> PublishResult:
        """Write the template's published layout (manifest, device state,
        memory, kernel/initrd, flattened disks) into *directory* (missing or
        empty), for any static HTTP server with Range support to serve to
        ``vmfork template pull``. A cancelled call removes what it wrote."""
        await self._settle()
        manifest = catalog.get(self._store, self.name)
        stop = threading.Event()
        task = asyncio.ensure_future(asyncio.to_thread(
            publish.write_layout, manifest, template_dir(self._store, manifest.name),
            directory, self.host.timeouts, stop))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            stop.set()  # the copy stops and removes its files
            with contextlib.suppress(Exception):
                await run_to_end(task)
            raise

    async def remove(self, *, force: bool = False) -> None:
        """Remove the template and its files (refused while clones or pool
        members use it; *force* stops them first). A removal that a killed
        vmfork left half done is finished first (and is all there is to do)."""
        if await self._settle() and not self._store.has_template(self.name):
            return
        await catalog.remove(self._store, self.name, force=force, timeouts=self.host.timeouts)
        await fork_base.collect(self._store, self.host.timeouts)


def open_async(home: Path | str | None = None, memory_dir: Path | str | None = None,
               timeouts: Timeouts = DEFAULT) -> AsyncHost:
    """The vmfork home *home* (default ``$VMFORK_HOME``, else
    ``~/.local/share/vmfork``), for ``async with vmfork.open_async() as host:``."""
    return AsyncHost(home, memory_dir, timeouts)
