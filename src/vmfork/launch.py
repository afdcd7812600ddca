"""The launch transaction: how a catalog entry gets its QEMU process.

Every path that starts QEMU for a VM — run, clone (fresh or from a pool
member), a pool member itself, import, restore — goes through :class:`Launch`:

1. the entry is reserved (a new VM's name is taken in the catalog, with the
   launching vmfork process — pid and start time — as its ``launcher``);
2. QEMU is spawned, and its pid and start time are recorded as soon as the
   process exists — before the QMP handshake — so that whatever happens next,
   ``vmfork stop`` (or the next command) can find it;
3. the caller does its work in the ``async with`` block (load state, resume,
   identity, ...);
4. if the block fails, for any reason including cancellation, the process is
   killed and the entry undone: what the launch made is removed (files,
   sockets, memory file, the catalog row), or, for a restore, the VM goes
   back to ``saved``; if it succeeds, the entry is committed (a new VM's
   ``launcher`` is cleared).

A new VM whose launcher is gone before the commit (kill -9 of ``vmfork run``,
``clone`` or ``snapshot import``) is an *abandoned launch*: it never became
what its command promised, so nothing of value is lost by undoing it.
:func:`undo_abandoned` does what step 4 would have done (kills its QEMU,
found by its pid or its QMP socket path, removes its files and its row).
Commands that create VMs undo every abandoned launch first (so its name is
free again), and settling (:mod:`vmfork.update.recovery`) undoes one before
acting on it; listing only shows it as ``abandoned``. Pool members have
their own rule (:mod:`vmfork.templates.pool`), an interrupted restore too
(:func:`vmfork.snapshots.save.recover`).

Entries (:class:`NewVM`, :class:`SavedVM`, :class:`NewPoolMember`,
:class:`Transient`) say what "reserve", "record", "commit" and "undo" mean
for their kind of catalog row.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
from pathlib import Path
from types import TracebackType
from typing import Protocol

from vmfork import tasks
from vmfork.errors import InvalidInput, NotFound, SetupError, StateError, VmforkError
from vmfork.listing import launch_abandoned
from vmfork.private import UMASK, make_dirs, private_dir
from vmfork.proc import process_alive, process_start_time
from vmfork.qemu.machine import Machine, find_qemu
from vmfork.records import Launcher, PoolMember, VMRecord
from vmfork.spec import RunPaths, VMSpec
from vmfork.store import Store
from vmfork.timeouts import DEFAULT, Timeouts

log = logging.getLogger("vmfork.launch")


# -- where a VM's process keeps its files ----------------------------------------
def paths_for(store: Store, rec: VMRecord) -> RunPaths:
    """Sockets and logs of the VM's current QEMU (its generation)."""
    return store.run_paths(rec.name, rec.info.gen)


def qemu_log(store: Store, name: str) -> Path:
    return store.run_dir(name) / "qemu.log"


def machine_for(store: Store, rec: VMRecord, timeouts: Timeouts = DEFAULT) -> Machine:
    """The running QEMU of *rec*, not connected (:meth:`Machine.connect`)."""
    if rec.pid is None:
        raise InvalidInput(f"{rec.name} has no QEMU process")
    return Machine(rec.spec, paths_for(store, rec), qemu_log(store, rec.name), rec.pid,
                   timeouts=timeouts)


async def attach(store: Store, rec: VMRecord, timeouts: Timeouts = DEFAULT) -> Machine:
    """The running QEMU of *rec*, its QMP monitor connected."""
    m = machine_for(store, rec, timeouts)
    await m.connect()
    return m


# -- what a VM owns ----------------------------------------------------------------
def create_overlays(spec: VMSpec, fresh: bool = False) -> None:
    """Create the overlay of each disk that has a backing image, if missing;
    with *fresh*, replace an existing one (a leftover of an earlier VM)."""
    for disk in spec.disks:
        if disk.backing is None or (Path(disk.path).exists() and not fresh):
            continue
        make_dirs(Path(disk.path).parent)
        p = subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2",
                            "-F", disk.backing_format or "raw", "-b", disk.backing, disk.path],
                           capture_output=True, text=True, stdin=subprocess.DEVNULL,
                           umask=UMASK)
        if p.returncode != 0:
            raise SetupError(f"cannot create the overlay {disk.path}: "
                             f"{(p.stderr or p.stdout).strip()}")


def remove_vm_files(store: Store, rec: VMRecord) -> None:
    """Delete what a VM owns: its memory file (not a template's), run dir and
    VM dir (overlays, saved state)."""
    mem = rec.spec.memory
    if mem.backend == "file" and mem.path and rec.info.owns_memory and not mem.readonly:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(mem.path)
    shutil.rmtree(store.run_dir(rec.name), ignore_errors=True)
    shutil.rmtree(store.vm_dir(rec.name), ignore_errors=True)


def memory_dir_ready(spec: VMSpec) -> None:
    """Create the directory of the VM's memory file, or check that it is
    private (:func:`vmfork.private.private_dir`: UnsafePath if not)."""
    if spec.memory.backend == "file" and spec.memory.path:
        private_dir(Path(spec.memory.path).parent, "memory dir")


# -- entries -------------------------------------------------------------------------
class Entry(Protocol):
    """The catalog side of a launch."""

    name: str

    def reserve(self) -> None:
        """Take the entry's place in the catalog before anything is made."""

    def record(self, pid: int, start: float | None) -> None:
        """Note the QEMU process, as soon as it exists."""

    def commit(self) -> None:
        """The launch succeeded: what it made is the caller's now."""

    def undo(self) -> None:
        """Remove what the launch made (its process is gone already)."""


def this_process() -> Launcher:
    """This vmfork process, as the launcher of a new VM."""
    pid = os.getpid()
    return Launcher(pid, process_start_time(pid))


class NewVM:
    """A VM record that the launch creates: run, clone, import. Its
    ``info.launcher`` names this process until the launch commits."""

    def __init__(self, store: Store, rec: VMRecord) -> None:
        self.store, self.rec, self.name = store, rec, rec.name
        self._reserved = False

    def reserve(self) -> None:
        self.rec.info.launcher = this_process()
        self.store.add_vm(self.rec)  # AlreadyExists if the name is taken
        self._reserved = True

    def record(self, pid: int, start: float | None) -> None:
        self.rec.pid, self.rec.pid_start = pid, start
        self.store.update_vm(self.rec)

    def commit(self) -> None:
        self.rec.info.launcher = None
        rec = self.store.get_vm(self.name)  # as the block left it
        rec.info.launcher = None
        self.store.update_vm(rec)

    def undo(self) -> None:
        if self._reserved:
            remove_vm_files(self.store, self.rec)
            self.store.remove_vm(self.name)


class SavedVM:
    """A saved VM that a restore gives a process again; a failed restore
    leaves it saved, its state file and memory untouched."""

    def __init__(self, store: Store, rec: VMRecord) -> None:
        self.store, self.rec, self.name = store, rec, rec.name

    def reserve(self) -> None:
        if not self.store.set_state_if(self.name, "saved", "restoring"):
            raise StateError(f"{self.name} is being restored by another vmfork command")
        self.rec.state = "restoring"

    def record(self, pid: int, start: float | None) -> None:
        self.rec.pid, self.rec.pid_start = pid, start
        self.store.update_vm(self.rec)

    def commit(self) -> None:
        pass

    def undo(self) -> None:
        self.rec.state, self.rec.pid, self.rec.pid_start = "saved", None, None
        self.store.update_vm(self.rec)
        with contextlib.suppress(FileNotFoundError):
            for sock in self.store.run_dir(self.name).glob("*.sock"):
                sock.unlink()


class NewPoolMember:
    """A QEMU process kept for a template's pool. Its row is written as soon
    as the process exists, not ready (no clone takes it) until the caller
    marks it ready (:meth:`Store.set_pool_member_ready`)."""

    def __init__(self, store: Store, member: PoolMember) -> None:
        self.store, self.member, self.name = store, member, member.id

    def reserve(self) -> None:
        pass  # the id is fresh

    def record(self, pid: int, start: float | None) -> None:
        self.member.pid, self.member.pid_start = pid, start
        self.member.ready = False
        self.store.add_pool_member(self.member)

    def commit(self) -> None:
        pass

    def undo(self) -> None:
        self.store.take_pool_member(self.name)
        shutil.rmtree(self.store.run_dir(self.name), ignore_errors=True)
        shutil.rmtree(self.store.vm_dir(self.name), ignore_errors=True)


class Transient:
    """A QEMU process that no catalog row owns (exporting a saved VM from its
    state file, a benchmark's baseline): the caller ends it."""

    def __init__(self, name: str) -> None:
        self.name = name

    def reserve(self) -> None:
        pass

    def record(self, pid: int, start: float | None) -> None:
        pass

    def commit(self) -> None:
        pass

    def undo(self) -> None:
        pass


# -- the transaction ------------------------------------------------------------------
class Launch:
    """``async with Launch(store, entry, spec) as launch:`` reserves *entry*;
    :meth:`spawn` gives it a QEMU process; leaving the block with an exception
    kills that process and undoes the entry.

    *adopt* (pid, start time) hands the launch a QEMU that runs already (a
    pool member taken for a clone): the launch owns it from the start — it is
    killed if the entry cannot be reserved — and :meth:`attach` connects it."""

    def __init__(self, store: Store, entry: Entry, spec: VMSpec, *,
                 timeouts: Timeouts = DEFAULT, gen: int = 0,
                 adopt: tuple[int, float | None] | None = None) -> None:
        self.store = store
        self.entry = entry
        self.spec = spec
        self.timeouts = timeouts
        self.gen = gen
        self.machine: Machine | None = None
        self._pid: tuple[int, float | None] | None = adopt

    async def __aenter__(self) -> Launch:
        try:
            self.entry.reserve()
        except BaseException:
            self._kill_pid()
            raise
        if self._pid is not None:
            self.entry.record(*self._pid)
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        if exc_type is None:
            try:
                self.entry.commit()
                return
            except BaseException:
                await tasks.run_to_end(self._undo())
                raise
        # Cleanup runs to its end even when the block was cancelled, and
        # when the caller is cancelled again meanwhile (a batch of clones
        # cancels each of its launches once more when one of them fails).
        await tasks.run_to_end(self._undo())

    async def _undo(self) -> None:
        if self.machine is not None:
            await self.machine.kill()
        else:
            self._kill_pid()
        self.entry.undo()

    def _kill_pid(self) -> None:
        if self._pid is not None and process_alive(*self._pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._pid[0], signal.SIGKILL)

    def _record(self, pid: int, start: float | None) -> None:
        self._pid = (pid, start)
        self.entry.record(pid, start)

    @property
    def paths(self) -> RunPaths:
        return self.store.run_paths(self.entry.name, self.gen)

    async def spawn(self, incoming: tuple[str, ...] = (), fresh_overlays: bool = False,
                    pass_fds: tuple[int, ...] = ()) -> Machine:
        """Start QEMU for the entry, paused, its QMP monitor connected."""
        memory_dir_ready(self.spec)
        if fresh_overlays:
            await tasks.finish_in_thread(create_overlays, self.spec, True)
        make_dirs(Path(self.paths.qmp).parent)
        self.machine = await Machine.launch(
            self.spec, self.paths, qemu_log(self.store, self.entry.name), incoming=incoming,
            timeouts=self.timeouts, pass_fds=pass_fds, on_spawn=self._record)
        return self.machine

    async def attach(self) -> Machine:
        """Connect to the adopted QEMU's QMP monitor."""
        if self._pid is None:
            raise StateError(f"{self.entry.name}: nothing to attach to")
        self.machine = Machine(self.spec, self.paths, qemu_log(self.store, self.entry.name),
                               self._pid[0], timeouts=self.timeouts)
        await self.machine.connect()
        return self.machine



# -- abandoned launches -----------------------------------------------------------------
async def undo_abandoned(store: Store, name: str, timeouts: Timeouts = DEFAULT) -> bool:
    """Undo the launch of VM *name* if it was abandoned (its launcher is gone:
    :func:`vmfork.listing.launch_abandoned`): kill its QEMU, remove its files
    and its row. Return True if it did. Takes the VM's lock (the caller must
    not hold it); a VM whose launcher lives, or that is gone, is left alone."""
    if not _abandoned(store, name):
        return False  # the usual case: no lock taken
    async with store.lock_async(name):
        rec = _abandoned(store, name)
        if rec is None:
            return False  # another command undid it meanwhile
        paths = paths_for(store, rec)
        pid = rec.pid if process_alive(rec.pid, rec.pid_start) else find_qemu(paths.qmp)
        if pid is not None:
            await Machine(rec.spec, paths, qemu_log(store, name), pid,
                          timeouts=timeouts).kill()
        remove_vm_files(store, rec)
        store.remove_vm(name)
    launcher = rec.info.launcher
    log.warning("%s: removed a VM whose launch was abandoned (the vmfork that started it, "
                "pid %s, is gone)", name, launcher.pid if launcher else "?")
    return True


async def undo_all_abandoned(store: Store, timeouts: Timeouts = DEFAULT) -> list[str]:
    """:func:`undo_abandoned` for every VM of the catalog; return the names of
    those undone. One that cannot be undone now is logged and left."""
    done = []
    for rec in store.list_vms():
        if not launch_abandoned(rec):
            continue
        try:
            if await undo_abandoned(store, rec.name, timeouts):
                done.append(rec.name)
        except VmforkError as exc:
            log.warning("%s: its abandoned launch could not be undone: %s", rec.name, exc)
    return done


def _abandoned(store: Store, name: str) -> VMRecord | None:
    """VM *name*'s record if its launch was abandoned, else None."""
    try:
        rec = store.get_vm(name)
    except NotFound:
        return None
    return rec if launch_abandoned(rec) else None
