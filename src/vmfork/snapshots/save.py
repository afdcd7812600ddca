"""Save and restore a persistent VM without copying its RAM, and recovery
after a killed save or restore.

Owns:

* **save / restore.** A VM's RAM already lives in a shared memory file, so a
  save writes only the device state (``x-ignore-shared`` in QEMU's
  ``cpr-reboot`` mode, a few hundred KB at any RAM size), ends QEMU and
  flushes the memory file to disk; a restore starts QEMU on the same file
  (``share=on``), loads the device state and resumes. The state file and its
  manifest (:class:`~vmfork.records.SavedState`) live in the VM's own
  directory (:meth:`Store.vm_dir`), next to its disk overlays, which stay in
  place and are reopened by the restore; the catalog record stays, in state
  ``saved``. After a restore the guest clock is set (:func:`sync_guest_clock`).
* **Integrity and crash safety.** The state file is written under a temporary
  name, fsynced and renamed; its manifest (sha256, sizes, memory file) is
  written the same way *after* it; it records the memory file's device and
  inode as the saving QEMU had it open, and a restore refuses a memory file
  that another has replaced since. A manifest therefore always describes a
  complete state file, and it exists only while the memory file holds exactly
  the RAM the state belongs to: restore deletes it once the state is loaded,
  before the guest runs again. :func:`verify` checks a saved VM's files
  against its record; :func:`recover` uses the manifest to finish what a
  killed vmfork left half-way (a dead VM with a complete manifest becomes
  ``saved``; an interrupted restore is rolled back or adopted). Restore takes
  the VM's lock without waiting and moves the record ``saved -> restoring``
  atomically, so a second concurrent restore is refused at once.
* **Checkpoints** (:func:`vmfork.checkpoints.checkpoint`) between the steps
  of a save (``save.*``) and a restore (``restore.*``).
* **Loading a state file into a fresh QEMU** (:func:`load_incoming`) and the
  best-effort guest clock correction after it, which the portable snapshots
  (:mod:`vmfork.snapshots.export`, :mod:`vmfork.snapshots.imports`) share.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from vmfork import checkpoints, vm
from vmfork.errors import GuestError, MigrationError, StateError, VmforkError, VmforkTimeout
from vmfork.files import fsync_path, sha256_file, unlink_quietly
from vmfork.guest import identity
from vmfork.launch import Launch, SavedVM, attach, machine_for
from vmfork.listing import LIVE_STATES
from vmfork.names import check_name
from vmfork.private import boot_id, check_open_by, check_same, make_dirs
from vmfork.proc import process_alive
from vmfork.qemu import features, migration
from vmfork.qemu.machine import Machine, deadline
from vmfork.records import SAVE_MODE, SavedState, VMInfo, VMRecord
from vmfork.results import MigrationStats, RestoreResult, SaveResult
from vmfork.spec import MIB
from vmfork.store import Store
from vmfork.tasks import run_to_end
from vmfork.timeouts import DEFAULT, Timeouts
from vmfork.vm import MANIFEST_FILE, STATE_FILE, state_paths

log = logging.getLogger("vmfork.snapshot")


def check_saveable(rec: VMRecord) -> Path:
    """The VM's memory file if save can keep RAM in place, else raise StateError."""
    mem = rec.spec.memory
    if mem.backend != "file" or not mem.path:
        raise StateError(f"{rec.name}: its RAM is in a {mem.backend}, which ends with QEMU; "
                         "save needs a file memory backend (vmfork run --persistent)")
    if not mem.share or mem.readonly or not rec.info.owns_memory:
        raise StateError(f"{rec.name}: its RAM is a private copy-on-write mapping of "
                         f"{mem.path}; save needs a VM with its own shared memory file")
    if not vm.is_persistent_dir(Path(mem.path).parent):
        raise StateError(f"{rec.name}: its memory file {mem.path} is on "
                         f"{vm.filesystem_type(mem.path)}, lost on a host reboot; start the VM "
                         "with 'vmfork run --persistent' (or --memory-dir on disk)")
    return Path(mem.path)


def verify(store: Store, rec: VMRecord) -> SavedState:
    """Check a saved VM's files against its record; raise MigrationError naming
    what is wrong (missing or corrupt state, mismatched manifest, memory file
    missing or of the wrong size)."""
    name = rec.name
    state, manifest = state_paths(store, name)
    try:
        saved = SavedState.load_from(manifest)
    except FileNotFoundError:
        raise MigrationError(f"{name}: saved-state manifest {manifest} is missing") from None
    recorded = (rec.info.saved.sha256 if rec.info.saved else None)
    if recorded and recorded != saved.sha256:
        raise MigrationError(f"{name}: manifest {manifest} belongs to another save "
                             f"(sha256 {saved.sha256[:12]}, catalog has {recorded[:12]})")
    if not state.is_file():
        raise MigrationError(f"{name}: state file {state} is missing")
    size = state.stat().st_size
    if size != saved.size:
        raise MigrationError(f"{name}: state file {state} is corrupt: {size} bytes, "
                             f"{saved.size} were saved")
    digest = sha256_file(state)
    if digest != saved.sha256:
        raise MigrationError(f"{name}: state file {state} is corrupt: sha256 {digest[:12]} "
                             f"differs from the saved {saved.sha256[:12]}")
    mem = Path(rec.spec.memory.path or "")
    if str(mem) != saved.memory_file:
        raise MigrationError(f"{name}: the state was saved with memory file "
                             f"{saved.memory_file}, the VM now has {mem}")
    if not mem.is_file():
        raise MigrationError(f"{name}: memory file {mem} is missing")
    msize = mem.stat().st_size
    if msize != saved.memory_size or msize != rec.spec.memory_mib * MIB:
        raise MigrationError(f"{name}: memory file {mem} is {msize} bytes, expected "
                             f"{saved.memory_size} ({rec.spec.memory_mib} MiB)")
    if saved.memory_ino is not None:
        check_same(mem, name, saved.memory_ino, saved.memory_dev, saved.boot_id)
    for disk in rec.spec.disks:
        # The disks stay in place while the VM is saved; the state refers to
        # what the guest wrote to them.
        for path, what in ((disk.path, "disk"), (disk.backing, "disk's base image")):
            if path and not Path(path).is_file():
                raise MigrationError(f"{name}: its {what} {path} is missing")
    return saved


def _manifest_matches(store: Store, rec: VMRecord) -> SavedState | None:
    """The manifest of a complete save for *rec*, or None. The save must have
    been written by the VM's current QEMU process (a manifest belongs to the
    QEMU that wrote it, before it ran the guest again:
    :func:`vmfork.vm.invalidate_save`)."""
    try:
        saved = verify(store, replace(rec, info=VMInfo()))
    except (MigrationError, OSError):
        return None
    if saved.qemu_pid is not None and (saved.qemu_pid, saved.qemu_start) != (rec.pid,
                                                                             rec.pid_start):
        log.warning("%s: a save manifest of another QEMU process (pid %d) is ignored",
                    rec.name, saved.qemu_pid)
        return None
    return saved


async def _kill_stale(store: Store, rec: VMRecord, timeouts: Timeouts) -> None:
    """End a QEMU left behind by a killed vmfork command (it never ran the guest)."""
    if rec.pid and process_alive(rec.pid, rec.pid_start):
        m = machine_for(store, rec, timeouts)
        await m.shutdown(force=True)


async def recover(store: Store, rec: VMRecord, timeouts: Timeouts = DEFAULT) -> VMRecord:
    """Repair what a killed save or restore left; the caller holds the VM's lock.

    * A VM whose QEMU is gone but whose manifest is complete (vmfork died after
      the state was written) becomes ``saved``.
    * ``restoring`` with nobody restoring: if the state was not yet consumed,
      the half-started QEMU is ended and the VM is ``saved`` again; if it was
      (the state was loaded), a live QEMU is adopted as ``paused``, else ``dead``.
    """
    if rec.state == "restoring":
        _, manifest = state_paths(store, rec.name)
        alive = process_alive(rec.pid, rec.pid_start)
        if manifest.exists():
            await _kill_stale(store, rec, timeouts)
            rec.state, rec.pid, rec.pid_start = "saved", None, None
        else:
            rec.state = "paused" if alive else "dead"
        store.update_vm(rec)
        log.warning("%s: interrupted restore recovered -> %s", rec.name, rec.state)
        return rec
    if rec.state in (*LIVE_STATES, "dead") and not process_alive(rec.pid, rec.pid_start):
        saved = _manifest_matches(store, rec)
        if saved is not None:
            await asyncio.to_thread(fsync_path, saved.memory_file)
            for sock in store.run_dir(rec.name).glob("*.sock"):  # the dead QEMU's
                unlink_quietly(sock)
            rec.state, rec.pid, rec.pid_start = "saved", None, None
            rec.info.saved = saved
            store.update_vm(rec)
            log.warning("%s: a complete save was found; the VM is saved", rec.name)
    return rec


# -- save -------------------------------------------------------------------------
async def save(store: Store, name: str, timeouts: Timeouts = DEFAULT) -> SaveResult:
    """Save VM *name*: pause, write its device state, end QEMU, flush its RAM file.

    Steps, and what a kill -9 at each leaves: flush the memory file while the
    guest still runs (running VM) → pause → write the state atomically
    (paused VM) → write the manifest (``vmfork save`` again finishes this
    save; anything that runs the guest first invalidates it:
    :func:`vmfork.vm.invalidate_save`) → ``quit`` (from here a dead QEMU means
    a complete save: :func:`recover`) → fsync the memory file → record
    ``saved``.

    Cancelled (SIGTERM, Ctrl-C) before ``quit``, the save is undone: its files
    are deleted and the guest runs again if it ran before. Cancelled from
    ``quit`` on, it is finished: the VM is recorded ``saved``.
    """
    t0 = time.monotonic()
    check_name(name)
    async with store.lock_async(name):
        rec = vm.get_live(store, name)
        mem = check_saveable(rec)
        state, manifest = state_paths(store, name)
        make_dirs(state.parent)
        m = await attach(store, rec, timeouts)
        stats: MigrationStats | None = None
        saved_before: SavedState | None = None
        was_running = False
        try:
            # The memory file must be the one QEMU holds the RAM in: the
            # manifest records its identity for the restore.
            mem_id = check_open_by(m.pid, mem, name)
            status = await m.status()
            saved_before = _manifest_matches(store, rec) if status == "postmigrate" else None
            if status == "postmigrate" and saved_before is None:
                # The last migration was not a complete save of ours (QEMU
                # refuses to migrate again from here): run on, then save.
                vm.invalidate_save(store, name)
                await m.resume()
                status = "running"
            was_running = status == "running"
            if status not in ("running", "paused", "postmigrate"):
                raise StateError(f"{name}: cannot save a VM in QEMU state {status!r}")
            if saved_before is None:
                unlink_quietly(manifest, state)
                fsync_path(state.parent)
            # Write back what the guest dirtied while it still runs, so the
            # flush after the pause has little left to do.
            t_flush = time.monotonic()
            await asyncio.to_thread(fsync_path, mem)
            preflush = time.monotonic() - t_flush
            t_pause = time.monotonic()
            if saved_before is not None:
                # A killed save left QEMU paused after writing a complete state
                # and manifest: finish that save.
                saved = saved_before
                log.warning("%s: finishing an interrupted save", name)
            else:
                if was_running:
                    await m.pause()
                await checkpoints.checkpoint("save.paused")
                try:
                    ident = await features.qemu_identity(m)
                    stats, digest = await migration.save_state(
                        m, state, timeouts.migrate, parameters={"mode": SAVE_MODE},
                        x_ignore_shared=True)
                except BaseException:
                    await _undo_pause(m, was_running)
                    raise
                await checkpoints.checkpoint("save.state-written")
                saved = SavedState(name=name, state_file=str(state), sha256=digest,
                                   size=state.stat().st_size, memory_file=str(mem),
                                   memory_size=mem.stat().st_size,
                                   save_id=secrets.token_hex(8), saved_at=time.time(),
                                   qemu_version=ident["qemu_version"],
                                   machine=ident["machine"], was_running=was_running,
                                   memory_dev=mem_id.dev, memory_ino=mem_id.ino,
                                   boot_id=boot_id(), qemu_pid=rec.pid,
                                   qemu_start=rec.pid_start)
                saved.save_to(manifest)
            await checkpoints.checkpoint("save.manifest-written")
        except asyncio.CancelledError:
            if m.alive() and saved_before is None:
                await run_to_end(_undo_save(store, m, was_running))
            await m.disconnect()
            raise
        except BaseException:
            if not m.alive():  # QEMU died under us: clear its sockets
                await m.shutdown(force=True)
            await m.disconnect()
            raise
        # From here the save is finished even if the caller is cancelled.
        try:
            await run_to_end(m.shutdown())  # disconnects
            await checkpoints.checkpoint("save.qemu-quit")
        finally:
            if not m.alive():
                final_flush = await run_to_end(_record_saved(store, rec, mem, saved))
    t_end = time.monotonic()
    log.info("%s: %s -> saved (%d bytes of state)", name,
             "running" if was_running else "paused", saved.size)
    return SaveResult(name=name, state="saved", state_file=str(state), state_size=saved.size,
                      sha256=saved.sha256, memory_file=str(mem),
                      memory_size=saved.memory_size, seconds=t_end - t0,
                      downtime_seconds=t_end - t_pause, preflush_seconds=preflush,
                      flush_seconds=final_flush, migration=stats)


async def _record_saved(store: Store, rec: VMRecord, mem: Path, saved: SavedState) -> float:
    """The last step of a save whose QEMU quit: flush the memory file, record
    ``saved``; return the seconds the flush took."""
    t_sync = time.monotonic()
    await asyncio.to_thread(fsync_path, mem)
    fsync_path(mem.parent)
    rec.state, rec.pid, rec.pid_start = "saved", None, None
    rec.info.saved = saved
    store.update_vm(rec)
    return time.monotonic() - t_sync


async def _undo_save(store: Store, m: Machine, was_running: bool) -> None:
    """A save cancelled before QEMU quit: delete what it wrote, and run the
    guest again if it ran before."""
    state, manifest = state_paths(store, m.name)
    unlink_quietly(manifest)
    fsync_path(manifest.parent)
    unlink_quietly(state)
    await _undo_pause(m, was_running)


async def _undo_pause(m: Machine, was_running: bool) -> None:
    """After a failed save: back to normal migration mode and, if the guest was
    running, running again."""
    if not m.alive():
        return
    with contextlib.suppress(VmforkError):
        await migration.set_parameters(m, mode="normal")
        await migration.set_capabilities(m, x_ignore_shared=False)
    if was_running:
        with contextlib.suppress(VmforkError):
            await m.resume()


# -- restore ----------------------------------------------------------------------
async def _wait_loaded(m: Machine, timeout: float) -> str:
    """Wait until an incoming migration is loaded; raise with QEMU's reason if
    it failed (QEMU was told not to exit on error)."""
    async def poll() -> str:
        while True:
            info = await m.qmp("query-migrate")
            st = info.get("status")
            if st in ("failed", "cancelled"):
                raise MigrationError(f"{m.name}: loading the state failed: "
                                     f"{info.get('error-desc', 'no reason given')}")
            if st == "completed":
                rs = await m.status()
                if rs != "inmigrate":
                    return rs
            await asyncio.sleep(0.002)
    return await deadline(poll(), timeout, f"incoming state of {m.name}")


async def load_incoming(m: Machine, uri: str, timeout: float, parameters: dict[str, Any],
                        **caps: bool) -> None:
    """Load the migration stream at *uri* into *m* (started with ``-incoming
    defer``) with migration *caps* and *parameters*; raise MigrationError with
    QEMU's reason if the load fails. QEMU stays up on failure
    (``exit-on-error`` off), so the caller ends it."""
    await migration.set_capabilities(m, **caps)
    if parameters:
        await migration.set_parameters(m, **parameters)
    await m.qmp("migrate-incoming", {"uri": uri, "exit-on-error": False})
    st = await _wait_loaded(m, timeout)
    if st not in ("paused", "prelaunch", "running"):
        raise MigrationError(f"{m.name}: loading the state ended in QEMU state {st!r}")


async def sync_guest_clock(store: Store, rec: VMRecord, timeouts: Timeouts = DEFAULT) -> bool:
    """Set the guest clock to the host's with a ``date`` command through the
    guest agent (qemu-guest-agent's ``guest-set-time`` also writes the
    hardware clock, 1-4 s under TCG; QEMU's RTC follows the host anyway).
    Best effort, within ``timeouts.clock_agent`` and ``timeouts.clock_exec``:
    False (and a warning) if it failed."""
    clock = replace(timeouts, agent=timeouts.clock_agent, exec=timeouts.clock_exec)
    try:
        await identity.sync_clock(store, rec, clock)
        return True
    except (GuestError, VmforkTimeout, StateError) as exc:
        log.warning("%s: guest clock not corrected: %s", rec.name, exc)
        return False


async def restore(store: Store, name: str, timeouts: Timeouts = DEFAULT,
                  sync_clock: bool = True) -> RestoreResult:
    """Restore saved VM *name*: QEMU on the same memory file, load the state,
    resume, correct the guest clock. A concurrent restore is refused."""
    t0 = time.monotonic()
    check_name(name)
    with store.lock(name, wait=False):
        rec = vm.reconcile(store, await recover(store, store.get_vm(name), timeouts))
        if rec.state != "saved":
            raise StateError(f"{name} is {rec.state}, not saved")
        saved = verify(store, rec)
        state, manifest = state_paths(store, name)
        t_checked = time.monotonic()
        async with Launch(store, SavedVM(store, rec), rec.spec, timeouts=timeouts,
                          gen=rec.info.gen) as launch:
            m = await launch.spawn(incoming=("defer",))
            t_spawned = time.monotonic()
            await checkpoints.checkpoint("restore.spawned")
            await load_incoming(m, f"file:{state}", timeouts.migrate, {"mode": saved.mode},
                                x_ignore_shared=True)
        t_loaded = time.monotonic()
        try:
            # The state is consumed: from here on the memory file moves on.
            unlink_quietly(manifest)
            fsync_path(manifest.parent)
            await checkpoints.checkpoint("restore.loaded")
            rec.state = "running" if saved.was_running else "paused"
            rec.info.saved = None
            rec.info.restored_at = time.time()
            store.update_vm(rec)
            with contextlib.suppress(VmforkError):  # back to defaults for later migrations
                await migration.set_parameters(m, mode="normal")
                await migration.set_capabilities(m, x_ignore_shared=False)
            if saved.was_running:  # a VM saved while paused comes back paused
                await m.resume()
        finally:
            await m.disconnect()
        t_running = time.monotonic()
        unlink_quietly(state)
    clock = (await sync_guest_clock(store, rec, timeouts) if sync_clock and saved.was_running
             else False)
    t_end = time.monotonic()
    log.info("%s: saved -> %s (%.3f s)", name, rec.state, t_running - t0)
    return RestoreResult(name=name, state=rec.state, pid=rec.pid, seconds=t_end - t0,
                         running_seconds=t_running - t0, check_seconds=t_checked - t0,
                         spawn_seconds=t_spawned - t_checked,
                         load_seconds=t_loaded - t_spawned, clock_synced=clock)


__all__ = [
    "MANIFEST_FILE", "STATE_FILE", "check_saveable", "load_incoming", "recover",
    "restore", "save", "state_paths", "sync_guest_clock", "verify",
]
