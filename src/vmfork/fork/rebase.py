"""The parent's side of a fork: freeze its state, move it onto the frozen state.

Owns :class:`Rebase`, the steps between "the fork is recorded" and "the
parent runs in its new QEMU on the fork base", their commit and their undo
(also used by :mod:`vmfork.fork.recovery` after a crash).

Before the pause (:meth:`Rebase.prepare`): the parent's memory file becomes
the base's (a shared file is renamed; a private mapping's file — a clone's
template or an earlier base, never written — is copied without its holes);
its disk overlays move into the base directory and a fresh overlay over each
takes its place; a new QEMU for the parent starts, waiting for its state,
mapping the base's memory copy-on-write (same MAC, VM generation ID and
disks paths; host port forwards stay with the old QEMU). That QEMU must not
have written a page of guest RAM by then (checked), so it sees the file as
it is when the guest stops.

The pause (:meth:`Rebase.switch`): the guest stops; for private memory the
pages the guest wrote since its memory was last frozen are copied into the
base's file (:mod:`vmfork.fork.pages`: as much work as the guest wrote,
never as much as its RAM); the device state is saved without RAM
(:mod:`vmfork.fork.stream`; the old QEMU's disks are flushed and released);
the new QEMU loads it, takes the port forwards, and the guest runs there.
Nothing here copies RAM in proportion to its size while the guest is paused.

Undo (:func:`undo`): the new QEMU is killed, the files go back, the old
QEMU (which still holds the guest, untouched) runs it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from qemu.qmp import EventListener

import vmfork.fork.pages as pages
from vmfork import checkpoints
from vmfork.admission import check_memory
from vmfork.errors import ResourceError, SetupError, StateError, VmforkError
from vmfork.files import sha256_file
from vmfork.fork.base import STATE_FILE, manifest_for
from vmfork.fork.stream import save_devices
from vmfork.launch import qemu_log
from vmfork.private import READONLY_MODE, UMASK
from vmfork.proc import process_alive
from vmfork.qemu import migration
from vmfork.qemu.machine import Machine, remove_sockets
from vmfork.qemu.pause import pause_ms, resume_running
from vmfork.records import ForkWork, TemplateManifest, VMRecord
from vmfork.spec import NetSpec, VMSpec
from vmfork.store import Store
from vmfork.tasks import finish_in_thread
from vmfork.timeouts import Timeouts
from vmfork.update import forwards, memory

log = logging.getLogger("vmfork.fork")


def _virtual_size(path: str) -> int:
    """Virtual size of disk image *path* (read while a QEMU may hold it)."""
    p = subprocess.run(["qemu-img", "info", "-U", "--output=json", path], capture_output=True,
                       text=True, stdin=subprocess.DEVNULL, timeout=60)
    if p.returncode != 0:
        raise SetupError(f"cannot read the size of {path}: {(p.stderr or p.stdout).strip()}")
    return int(json.loads(p.stdout)["virtual-size"])


def new_overlays(spec: VMSpec, moved: tuple[tuple[str, str], ...]) -> None:
    """Create the parent's fresh overlay at each moved disk's old path, over
    the moved image (which its old QEMU may still be writing: the backing is
    not opened, its size is read with a shared lock)."""
    fmt = {d.path: d.backing_format or "qcow2" for d in spec.disks}
    for vm_path, base_path in moved:
        size = _virtual_size(base_path)
        p = subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-u",
                            "-F", fmt.get(vm_path, "qcow2"), "-b", base_path, vm_path,
                            str(size)],
                           capture_output=True, text=True, stdin=subprocess.DEVNULL,
                           umask=UMASK, timeout=60)
        if p.returncode != 0:
            raise SetupError(f"cannot create the overlay {vm_path}: "
                             f"{(p.stderr or p.stdout).strip()}")


@dataclass
class Rebase:
    """One fork's parent side in progress."""

    store: Store
    rec: VMRecord
    old: Machine
    work: ForkWork
    timeouts: Timeouts
    new: Machine | None = None
    #: Bytes of guest RAM copied while paused, and of the base file copy before.
    captured: int = 0
    base_copied: int = 0
    state_size: int = 0
    save_seconds: float = 0.0
    prepare_seconds: float = 0.0
    #: The guest runs in the new QEMU (from then on the fork is committed, not undone).
    resumed: bool = False
    #: Copies the guest's written pages into the base (private memory only).
    copier: pages.PageCopy | None = None
    warnings: list[str] = field(default_factory=list)
    stop_listener: EventListener = field(default_factory=lambda: EventListener("STOP"))
    resume_listener: EventListener = field(default_factory=lambda: EventListener("RESUME"))

    @property
    def name(self) -> str:
        return self.rec.name

    def record(self, **changes: Any) -> None:
        """Record a step of the fork in the parent's record (before it is taken)."""
        self.work = replace(self.work, **changes)
        self.rec.info.fork = self.work
        self.store.update_vm(self.rec)

    def pause_ms(self) -> float:
        """Guest stop in the old QEMU to resume in the new one, by QEMU's event
        timestamps (host clock); 0 if the guest was not running."""
        return pause_ms(self.stop_listener, self.resume_listener) or 0.0

    # -- steps ----------------------------------------------------------------
    async def prepare(self) -> None:
        """Everything before the pause (see the module docstring)."""
        w = self.work
        try:
            if w.memory_from is not None:
                os.rename(w.memory_from, w.memory_to)
            else:
                await self._copy_base()
            await checkpoints.checkpoint("fork.memory")
            for vm_path, base_path in w.disks:
                os.rename(vm_path, base_path)
        except OSError as exc:
            raise ResourceError(f"{self.name}: preparing the fork's memory and disks "
                                f"failed: {exc.strerror or exc}") from exc
        await finish_in_thread(new_overlays, w.spec, w.disks)
        await checkpoints.checkpoint("fork.disks")
        launch_spec = w.spec
        if w.spec.net and w.spec.net.ports:  # they move at the switch
            launch_spec = w.spec.with_(net=NetSpec(mac=w.spec.net.mac))
        paths = self.store.run_paths(self.name, w.gen)
        self.new = new = await Machine.launch(
            launch_spec, paths, qemu_log(self.store, self.name), incoming=("defer",),
            timeouts=self.timeouts, on_spawn=lambda pid, start: self.record(
                new_pid=pid, new_start=start))
        # The state has no RAM and no capability: QEMU's defaults must hold.
        await migration.set_capabilities(new, x_ignore_shared=False)
        written = await asyncio.to_thread(self._written_by, new.pid)
        if written:
            raise StateError(f"{self.name}: the new QEMU wrote {written} pages of guest "
                             "memory before it got its state")
        await checkpoints.checkpoint("fork.launched")

    async def _copy_base(self) -> None:
        """Copy the file the parent's private memory maps (its template's, or
        an earlier fork's base) for the new base; the guest's own pages are
        added while it is paused. Refused before it starts if the memory
        directory or the host lacks room for the copy and those pages."""
        src = Path(str(self.rec.spec.memory.path))
        need = src.stat().st_blocks * 512 + memory.rss_anon(self.old.pid)
        check_memory(self.name, need, Path(self.work.memory_to).parent,
                     purpose="the fork's copy of its frozen memory")
        self.base_copied = await finish_in_thread(pages.sparse_copy, src,
                                                  Path(self.work.memory_to))
        self.copier = pages.PageCopy(Path(self.work.memory_to))
        await finish_in_thread(self._prefault)

    def _prefault(self) -> None:
        """Map the pages the guest wrote so far in the base's file (most of
        those it will have written at the pause), so that the copy while it
        is paused does not fault them in."""
        assert self.copier is not None
        pid = self.old.pid
        m = pages.ram_mapping(pid, str(self.rec.spec.memory.path))
        self.copier.prefault(m, pages.written_runs(pid, m))

    def _written_by(self, pid: int) -> int:
        m = pages.ram_mapping(pid, self.work.memory_to)
        return sum(n for _, n in pages.written_runs(pid, m))

    async def switch(self) -> None:
        """The pause: freeze, save, load, resume (see the module docstring)."""
        w, old, new = self.work, self.old, self.new
        assert new is not None
        self.record(paused=True)
        if w.was_running:
            # QEMU sends the STOP event before its answer to ``stop``.
            with old.events.listen(self.stop_listener):
                await old.pause()
        await checkpoints.checkpoint("fork.paused")
        t0 = time.monotonic()
        state = Path(w.directory) / STATE_FILE
        try:
            if w.memory_from is None:
                self.captured = await asyncio.to_thread(self._capture)
            self.state_size = await save_devices(old, state, w.machine, self.timeouts.migrate)
        except OSError as exc:
            raise ResourceError(f"{self.name}: writing the fork's frozen state failed: "
                                f"{exc.strerror or exc}") from exc
        self.save_seconds = time.monotonic() - t0
        await checkpoints.checkpoint("fork.saved")
        await migration.start_incoming(new, f"file:{state}")
        await migration.wait_incoming(new, self.timeouts.migrate)
        self.warnings += await forwards.hand_over(old, new, w.spec.net)
        if w.was_running:
            await resume_running(new, self.resume_listener, "its new QEMU")
        self.resumed = True
        await checkpoints.checkpoint("fork.resumed")

    def _capture(self) -> int:
        """Copy the pages the paused guest wrote into the base's memory file."""
        assert self.copier is not None
        pid = self.old.pid
        m = pages.ram_mapping(pid, str(self.rec.spec.memory.path))
        try:
            return self.copier.copy(pid, m, pages.written_runs(pid, m))
        finally:
            self.copier.close()
            self.copier = None

    async def commit(self) -> TemplateManifest:
        """The parent runs in its new QEMU: record the base and the parent,
        end the old QEMU."""
        new = self.new
        assert new is not None
        return await commit(self.store, self.rec, self.work, new, self.old,
                            self.save_seconds)


async def commit(store: Store, rec: VMRecord, work: ForkWork, new: Machine,
                 old: Machine | None, save_seconds: float) -> TemplateManifest:
    """Record the base of *work* and make *new* the parent's QEMU; end *old*
    (None: find it by the parent's record). Each step may be repeated."""
    tdir = Path(work.directory)
    state = tdir / STATE_FILE
    manifest = manifest_for(work, rec.spec, rec.name, rec.info.guest, rec.info.agent,
                            state.stat().st_size, await asyncio.to_thread(sha256_file, state),
                            save_seconds)
    for p in [tdir / STATE_FILE, Path(work.memory_to), *(Path(b) for _, b in work.disks)]:
        os.chmod(p, READONLY_MODE)
    (tdir / "manifest.json").write_text(manifest.to_json())
    if store.has_template(work.base):
        found = store.template_work(work.base)
        if found is not None and found[0] != "ready":
            store.finish_template(manifest, None)
    else:
        store.add_template(manifest)
    old_pid, old_start, old_gen = rec.pid, rec.pid_start, rec.info.gen
    status = await new.status()
    rec.spec = work.spec
    rec.pid, rec.pid_start = new.pid, new.start_time
    rec.state = "running" if status == "running" else "paused"
    rec.info.gen = work.gen
    rec.info.owns_memory = False
    rec.info.fork = None
    rec.template = work.base
    store.update_vm(rec)
    if old is not None:
        try:
            await old.shutdown()
        except VmforkError as exc:
            log.warning("%s: the old QEMU (pid %d) did not end: %s", rec.name, old.pid, exc)
    elif old_pid and process_alive(old_pid, old_start):
        with contextlib.suppress(ProcessLookupError):
            os.kill(old_pid, signal.SIGKILL)
    remove_sockets(store.run_paths(rec.name, old_gen))
    return manifest


async def undo(store: Store, rec: VMRecord, work: ForkWork, old: Machine | None,
               new: Machine | None, timeouts: Timeouts) -> None:
    """Undo fork *work* of VM *rec*: kill the new QEMU, put the files back,
    let the old QEMU run the guest as before, drop the base. Each step may
    be repeated (after a crash)."""
    if new is not None:
        await new.kill()
    elif work.new_pid and process_alive(work.new_pid, work.new_start):
        with contextlib.suppress(ProcessLookupError):
            os.kill(work.new_pid, signal.SIGKILL)
    remove_sockets(store.run_paths(rec.name, work.gen))
    await finish_in_thread(_files_back, work)
    if old is not None:
        await _give_back(rec, work, old, timeouts)
    shutil.rmtree(work.directory, ignore_errors=True)
    store.drop_reservation(work.base)
    rec.info.fork = None
    store.update_vm(rec)


def _files_back(work: ForkWork) -> None:
    for vm_path, base_path in work.disks:
        if os.path.exists(base_path):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(vm_path)
            os.rename(base_path, vm_path)
    if work.memory_from is not None:
        if os.path.exists(work.memory_to) and not os.path.exists(work.memory_from):
            os.rename(work.memory_to, work.memory_from)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(work.memory_to)


async def _give_back(rec: VMRecord, work: ForkWork, old: Machine, timeouts: Timeouts) -> None:
    """Let the old QEMU run the guest as before the fork."""
    if not old.alive():
        return
    for w in await forwards.ensure(old, rec.spec.net):
        log.warning("%s: %s", rec.name, w)
    status = await old.status()
    if work.was_running and status in ("paused", "postmigrate", "save-vm"):
        await old.resume()  # takes the disks back too
    elif not work.was_running:
        with contextlib.suppress(VmforkError):  # a save released them
            await old.qmp("blockdev-set-active", {"active": True})
    status = await old.status()
    wanted = "running" if work.was_running else "paused"
    if status != wanted:
        raise StateError(f"{rec.name}: after the failed fork its QEMU is {status}, "
                         f"not {wanted}")


__all__ = ["Rebase", "commit", "new_overlays", "undo"]
