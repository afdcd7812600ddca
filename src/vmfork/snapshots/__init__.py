"""Save and restore VMs without copying RAM, and portable snapshots with RAM.

Owns three things:

* **save / restore.** A VM's RAM already lives in a shared memory file, so a
  save writes only the device state (``x-ignore-shared`` in QEMU's
  ``cpr-reboot`` mode, a few hundred KB at any RAM size), ends QEMU and
  flushes the memory file to disk; a restore starts QEMU on the same file
  (``share=on``), loads the device state and resumes. The state file and its
  manifest live in the VM's own directory (:meth:`Store.vm_dir`), next to its
  disk overlays, which stay in place and are reopened by the restore; the
  catalog record stays, in state ``saved``. After a restore the guest clock
  is set (qemu-guest-agent ``guest-set-time`` where the VM has its port, else
  ``date`` through the serial agent).
* **Integrity and crash safety.** The state file is written under a temporary
  name, fsynced and renamed; its manifest (sha256, sizes, memory file) is
  written the same way *after* it. A manifest therefore always describes a
  complete state file, and it exists only while the memory file holds exactly
  the RAM the state belongs to: restore deletes it once the state is loaded,
  before the guest runs again. :func:`recover` uses this to finish what a
  killed vmfork left half-way (a dead VM with a complete manifest becomes
  ``saved``; an interrupted restore is rolled back or adopted). Restore takes
  the VM's lock without waiting and moves the record ``saved -> restoring``
  atomically, so a second concurrent restore is refused at once.
* **Portable snapshots.** :func:`export` writes one file: a 64 KiB header
  (magic line and a JSON manifest), the kernel and initrd the VM booted, and a
  QEMU ``mapped-ram`` stream (sparse: only non-zero pages take space) at a
  1 MiB-aligned offset. :func:`import_` checks every sha256, then loads the
  stream into a fresh QEMU on a new memory file (``file:F,offset=N``). The
  file carries no disks: VMs with disks are refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import secrets
import shutil
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any, BinaryIO

from vmfork import vm
from vmfork.errors import (
    AlreadyExists,
    GuestError,
    InvalidInput,
    MigrationError,
    StateError,
    VmforkError,
    VmforkTimeout,
)
from vmfork.files import fsync_path, sha256_file
from vmfork.guest import identity
from vmfork.qemu import migration
from vmfork.qemu.machine import Machine, deadline, process_alive
from vmfork.records import SAVE_MODE, SavedState, VMInfo, VMRecord
from vmfork.results import (
    ExportResult,
    ImportResult,
    MigrationStats,
    RestoreResult,
    SaveResult,
)
from vmfork.spec import MIB, MemorySpec, VMSpec, check_name
from vmfork.store import Store
from vmfork.templates import create
from vmfork.templates.manifest import TemplateManifest, template_dir
from vmfork.timeouts import DEFAULT, Timeouts

log = logging.getLogger("vmfork.snapshot")

STATE_FILE = "state.mig"
MANIFEST_FILE = "state.json"
#: Clock sync after a restore or import is best effort: a guest without the
#: agent must not hold the command up for the default exec deadline.
CLOCK_TIMEOUTS = Timeouts(agent=5.0, exec=10.0)
#: Environment variable naming a step at which save/restore stall (for tests
#: that kill vmfork with SIGKILL at a known point).
STALL_ENV = "VMFORK_TEST_STALL"

EXPORT_MAGIC = b"VMFORK-SNAPSHOT\n"
EXPORT_FORMAT = 1
EXPORT_HEADER_SIZE = 64 * 1024
EXPORT_ALIGN = MIB




def state_paths(store: Store, name: str) -> tuple[Path, Path]:
    """The state file and its manifest for VM *name*."""
    d = store.vm_dir(name)
    return d / STATE_FILE, d / MANIFEST_FILE




def _unlink(*paths: Path) -> None:
    for p in paths:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


async def _checkpoint(step: str) -> None:
    """A named point in save/restore. Tests stall vmfork here (``STALL_ENV``)
    to kill it, or replace this function to kill QEMU."""
    if os.environ.get(STALL_ENV) == step:
        log.warning("stalling at %s (%s is set)", step, STALL_ENV)
        await asyncio.sleep(3600)


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
    for disk in rec.spec.disks:
        # The disks stay in place while the VM is saved; the state refers to
        # what the guest wrote to them.
        for path, what in ((disk.path, "disk"), (disk.backing, "disk's base image")):
            if path and not Path(path).is_file():
                raise MigrationError(f"{name}: its {what} {path} is missing")
    return saved


def _manifest_matches(store: Store, rec: VMRecord) -> SavedState | None:
    """The manifest of a complete save for *rec*, or None."""
    try:
        return verify(store, replace(rec, info=VMInfo()))
    except (MigrationError, OSError):
        return None


async def _kill_stale(store: Store, rec: VMRecord) -> None:
    """End a QEMU left behind by a killed vmfork command (it never ran the guest)."""
    if rec.pid and process_alive(rec.pid, rec.pid_start):
        m = Machine(rec.spec, vm.paths_for(store, rec), vm.qemu_log(store, rec.name), rec.pid)
        await m.shutdown(force=True)


async def recover(store: Store, rec: VMRecord) -> VMRecord:
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
            await _kill_stale(store, rec)
            rec.state, rec.pid, rec.pid_start = "saved", None, None
        else:
            rec.state = "paused" if alive else "dead"
        store.update_vm(rec)
        log.warning("%s: interrupted restore recovered -> %s", rec.name, rec.state)
        return rec
    if rec.state in (*vm.LIVE_STATES, "dead") and not process_alive(rec.pid, rec.pid_start):
        saved = _manifest_matches(store, rec)
        if saved is not None:
            await asyncio.to_thread(fsync_path, saved.memory_file)
            for sock in store.run_dir(rec.name).glob("*.sock"):  # the dead QEMU's
                _unlink(sock)
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
    save) → ``quit`` (from here a dead QEMU means a complete save:
    :func:`recover`) → fsync the memory file → record ``saved``.
    """
    t0 = time.monotonic()
    check_name(name)
    with store.lock(name):
        rec = vm.get_live(store, name)
        mem = check_saveable(rec)
        state, manifest = state_paths(store, name)
        state.parent.mkdir(parents=True, exist_ok=True)
        assert rec.pid is not None
        m = await Machine.attach(rec.spec, vm.paths_for(store, rec), vm.qemu_log(store, name),
                                 rec.pid, timeouts=timeouts)
        stats: MigrationStats | None = None
        try:
            status = await m.status()
            saved_before = _manifest_matches(store, rec) if status == "postmigrate" else None
            if status == "postmigrate" and saved_before is None:
                # The last migration was not a complete save of ours (QEMU
                # refuses to migrate again from here): run on, then save.
                await m.resume()
                status = "running"
            was_running = status == "running"
            if status not in ("running", "paused", "postmigrate"):
                raise StateError(f"{name}: cannot save a VM in QEMU state {status!r}")
            if saved_before is None:
                _unlink(manifest, state)
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
                await _checkpoint("paused")
                try:
                    ident = await migration.qemu_identity(m)
                    stats, digest = await migration.save_state(
                        m, state, timeouts.migrate, parameters={"mode": SAVE_MODE},
                        x_ignore_shared=True)
                except BaseException:
                    await _undo_pause(m, was_running)
                    raise
                await _checkpoint("state-written")
                saved = SavedState(name=name, state_file=str(state), sha256=digest,
                                   size=state.stat().st_size, memory_file=str(mem),
                                   memory_size=mem.stat().st_size,
                                   save_id=secrets.token_hex(8), saved_at=time.time(),
                                   qemu_version=ident["qemu_version"],
                                   machine=ident["machine"], was_running=was_running)
                saved.save_to(manifest)
            await _checkpoint("manifest-written")
            await m.shutdown()
        except BaseException:
            if not m.alive():  # QEMU died under us: clear its sockets
                await m.shutdown(force=True)
            raise
        finally:
            await m.disconnect()
        await _checkpoint("qemu-quit")
        t_sync = time.monotonic()
        await asyncio.to_thread(fsync_path, mem)
        fsync_path(mem.parent)
        final_flush = time.monotonic() - t_sync
        rec.state, rec.pid, rec.pid_start = "saved", None, None
        rec.info.saved = saved
        store.update_vm(rec)
    t_end = time.monotonic()
    log.info("%s: %s -> saved (%d bytes of state)", name,
             "running" if was_running else "paused", saved.size)
    return SaveResult(name=name, state="saved", state_file=str(state), state_size=saved.size,
                      sha256=saved.sha256, memory_file=str(mem),
                      memory_size=saved.memory_size, seconds=t_end - t0,
                      downtime_seconds=t_end - t_pause, preflush_seconds=preflush,
                      flush_seconds=final_flush, migration=stats)


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


async def _incoming(m: Machine, uri: str, timeout: float, parameters: dict[str, Any],
                    **caps: bool) -> None:
    await migration.set_capabilities(m, **caps)
    if parameters:
        await migration.set_parameters(m, **parameters)
    await m.qmp("migrate-incoming", {"uri": uri, "exit-on-error": False})
    st = await _wait_loaded(m, timeout)
    if st not in ("paused", "prelaunch", "running"):
        raise MigrationError(f"{m.name}: loading the state ended in QEMU state {st!r}")


async def _sync_clock(store: Store, rec: VMRecord) -> bool:
    """Set the guest clock to the host's with a ``date`` command through the
    guest agent (qemu-guest-agent's ``guest-set-time`` also writes the
    hardware clock, 1-4 s under TCG; QEMU's RTC follows the host anyway).
    Best effort: False (and a warning) if it failed."""
    try:
        await identity.sync_clock(store, rec, CLOCK_TIMEOUTS)
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
        rec = vm.reconcile(store, await recover(store, store.get_vm(name)))
        if rec.state != "saved":
            raise StateError(f"{name} is {rec.state}, not saved")
        saved = verify(store, rec)
        state, manifest = state_paths(store, name)
        t_checked = time.monotonic()
        if not store.set_state_if(name, "saved", "restoring"):
            raise StateError(f"{name} is being restored by another vmfork command")
        rec.state = "restoring"
        m: Machine | None = None
        try:
            m = await vm.launch_recorded(store, rec, incoming=("defer",), timeouts=timeouts,
                                         gen=rec.info.gen)
            rec.pid, rec.pid_start = m.pid, m.start_time
            store.update_vm(rec)
            t_spawned = time.monotonic()
            await _checkpoint("restore-spawned")
            await _incoming(m, f"file:{state}", timeouts.migrate, {"mode": saved.mode},
                            x_ignore_shared=True)
        except BaseException:
            if m is not None:
                await m.kill()
            rec.state, rec.pid, rec.pid_start = "saved", None, None
            store.update_vm(rec)
            raise
        t_loaded = time.monotonic()
        try:
            # The state is consumed: from here on the memory file moves on.
            _unlink(manifest)
            fsync_path(manifest.parent)
            await _checkpoint("restore-loaded")
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
        _unlink(state)
    clock = await _sync_clock(store, rec) if sync_clock and saved.was_running else False
    t_end = time.monotonic()
    log.info("%s: saved -> %s (%.3f s)", name, rec.state, t_running - t0)
    return RestoreResult(name=name, state=rec.state, pid=rec.pid, seconds=t_end - t0,
                         running_seconds=t_running - t0, check_seconds=t_checked - t0,
                         spawn_seconds=t_spawned - t_checked,
                         load_seconds=t_loaded - t_spawned, clock_synced=clock)


# -- portable snapshots -----------------------------------------------------------
def _align(n: int, a: int = EXPORT_ALIGN) -> int:
    return (n + a - 1) // a * a


def _hash_range(f: BinaryIO, start: int, end: int) -> str:
    """sha256 of bytes [start, end) of *f*, holes read as zeros without I/O."""
    h = hashlib.sha256()
    fd = f.fileno()
    zeros = bytes(1 << 20)
    pos = start
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:  # no data after pos
            data = end
        data = min(data, end)
        while pos < data:  # a hole
            n = min(len(zeros), data - pos)
            h.update(zeros[:n] if n < len(zeros) else zeros)
            pos += n
        if pos >= end:
            break
        try:
            hole = min(os.lseek(fd, pos, os.SEEK_HOLE), end)
        except OSError:
            hole = end
        while pos < hole:
            chunk = os.pread(fd, min(1 << 22, hole - pos), pos)
            if not chunk:
                raise MigrationError(f"{f.name}: ends before byte {end}")
            h.update(chunk)
            pos += len(chunk)
    return h.hexdigest()


def _sha256(path: Path) -> str:
    return sha256_file(path)


def read_header(path: Path | str) -> dict[str, Any]:
    """The manifest of an export file; raise MigrationError if it is not one."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            head = f.read(EXPORT_HEADER_SIZE)
    except OSError as exc:
        raise InvalidInput(f"cannot read snapshot file {str(p)!r}: {exc.strerror}") from exc
    if not head.startswith(EXPORT_MAGIC):
        raise MigrationError(f"{p} is not a vmfork snapshot file (no header)")
    body = head[len(EXPORT_MAGIC):].split(b"\0", 1)[0]
    try:
        header: dict[str, Any] = json.loads(body)
    except ValueError as exc:
        raise MigrationError(f"{p}: snapshot header is corrupt ({exc})") from exc
    if header.get("format") != EXPORT_FORMAT:
        raise MigrationError(f"{p}: snapshot format {header.get('format')!r} is not supported "
                             f"(this vmfork reads format {EXPORT_FORMAT})")
    return header


def check_export(path: Path | str, header: dict[str, Any] | None = None) -> dict[str, Any]:
    """Check every sha256 in an export file; return its header."""
    p = Path(path)
    header = header or read_header(p)
    size = p.stat().st_size
    with open(p, "rb") as f:
        parts = [*header["blobs"].items(), ("RAM", header["ram"])]
        for what, part in parts:
            end = part["offset"] + part["size"]
            if end > size:
                raise MigrationError(f"{p} is truncated: {what} ends at byte {end}, "
                                     f"the file has {size}")
            if _hash_range(f, part["offset"], end) != part["sha256"]:
                raise MigrationError(f"{p} is corrupt: the {what} sha256 differs from its "
                                     "header")
    return header


def _write_export_tail(tmp: Path, header: dict[str, Any],
                       blob_files: dict[str, Path]) -> None:
    """Fill the head of QEMU's file: blobs, header; hash; fsync."""
    with open(tmp, "r+b") as f:
        for key, src in blob_files.items():
            part = header["blobs"][key]
            with open(src, "rb") as s:
                f.seek(part["offset"])
                shutil.copyfileobj(s, f, 1 << 20)
        f.flush()
        end = os.fstat(f.fileno()).st_size
        header["ram"]["size"] = end - header["ram"]["offset"]
        header["ram"]["sha256"] = _hash_range(f, header["ram"]["offset"], end)
        head = EXPORT_MAGIC + json.dumps(header, indent=1).encode()
        if len(head) >= EXPORT_HEADER_SIZE:
            raise MigrationError(f"snapshot header too large ({len(head)} bytes)")
        f.seek(0)
        f.write(head + b"\0" * (EXPORT_HEADER_SIZE - len(head)))
        f.flush()
        os.fsync(f.fileno())


def check_exportable(spec: VMSpec) -> None:
    """Raise StateError if a snapshot file cannot carry the VM: it holds RAM,
    device state, kernel and initrd, not disks, and a copy that reopened the
    VM's disks (or its overlays) would write to them behind the VM's back."""
    if spec.disks:
        paths = ", ".join(d.path for d in spec.disks)
        raise StateError(f"{spec.name}: it has disks ({paths}); a snapshot file carries "
                         "RAM and device state only, not disks: use 'vmfork save' and "
                         "'vmfork restore' (the disks stay in place)")


async def export(store: Store, name: str, file: Path | str,
                 timeouts: Timeouts = DEFAULT) -> ExportResult:
    """Write VM *name* (running, paused or saved) with its RAM to one file.

    A running VM is paused for the copy and resumed after; a saved VM is loaded
    into a temporary QEMU that maps its memory file privately (the file is not
    written) and stays saved.
    """
    t0 = time.monotonic()
    dest = Path(file).absolute()
    if dest.exists():
        raise AlreadyExists(f"{dest} exists already")
    if not dest.parent.is_dir():
        raise InvalidInput(f"directory {str(dest.parent)!r} does not exist")
    check_name(name)
    with store.lock(name, wait=False):
        rec = vm.reconcile(store, await recover(store, store.get_vm(name)))
        spec = rec.spec
        check_exportable(spec)
        blob_files = {k: Path(v) for k, v in (("kernel", spec.kernel),
                                              ("initrd", spec.initrd)) if v}
        for k, p in blob_files.items():
            if not p.is_file():
                raise StateError(f"{name}: its {k} {p} is missing; cannot export")
        blobs: dict[str, dict[str, Any]] = {}
        pos = EXPORT_HEADER_SIZE
        for k, p in blob_files.items():
            size = p.stat().st_size
            blobs[k] = {"offset": pos, "size": size,
                        "sha256": await asyncio.to_thread(_sha256, p)}
            pos = _align(pos + size, 4096)
        ram_offset = _align(pos)
        tmp = dest.with_name(f".{dest.name}.{secrets.token_hex(3)}.tmp")
        own = rec.state == "saved"
        if own:
            saved = verify(store, rec)
            private = spec.with_(memory=MemorySpec(backend="file", path=spec.memory.path,
                                                   share=False, readonly=True))
            m = await vm.launch_recorded(store, rec, incoming=("defer",), timeouts=timeouts,
                                         spec=private)
            was_running = False
        elif rec.state in vm.LIVE_STATES:
            assert rec.pid is not None
            m = await Machine.attach(spec, vm.paths_for(store, rec),
                                     vm.qemu_log(store, name), rec.pid, timeouts=timeouts)
            was_running = await m.status() == "running"
        else:
            raise StateError(f"{name} is {rec.state}; only a running, paused or saved VM "
                             "can be exported")
        try:
            if own:
                await _incoming(m, f"file:{saved.state_file}", timeouts.migrate,
                                {"mode": saved.mode}, x_ignore_shared=True)
            elif was_running:
                await m.pause()
            await migration.set_parameters(m, mode="normal")
            ident = await migration.qemu_identity(m)
            await migration.set_capabilities(m, x_ignore_shared=False, mapped_ram=True)
            try:
                stats = await migration.migrate(
                    m, {"uri": f"file:{tmp},offset={ram_offset}"}, timeouts.migrate, "export")
            finally:
                with contextlib.suppress(VmforkError):
                    await migration.set_capabilities(m, mapped_ram=False)
            header = {
                "format": EXPORT_FORMAT, "name": name, "created": time.time(),
                "memory_mib": spec.memory_mib, "qemu_version": ident["qemu_version"],
                "machine": ident["machine"], "spec": json.loads(spec.to_json()),
                "capabilities": {"mapped-ram": True}, "blobs": blobs,
                "ram": {"offset": ram_offset, "size": 0, "sha256": ""},
            }
            await asyncio.to_thread(_write_export_tail, tmp, header, blob_files)
            os.replace(tmp, dest)
            fsync_path(dest.parent)
        except BaseException:
            _unlink(tmp)
            if own:
                await m.kill()
            raise
        finally:
            if own:
                await m.shutdown()
            else:
                if was_running:
                    with contextlib.suppress(VmforkError):
                        await m.resume()
                await m.disconnect()
    st = dest.stat()
    log.info("%s: exported to %s (%d bytes, %d allocated)", name, dest, st.st_size,
             st.st_blocks * 512)
    return ExportResult(name=name, file=str(dest), size=st.st_size,
                        allocated=st.st_blocks * 512, memory_mib=spec.memory_mib,
                        seconds=time.monotonic() - t0, migration=stats)


async def import_(store: Store, file: Path | str, name: str, persistent: bool = False,
                  memory_dir: Path | str | None = None, resume: bool = True,
                  files_dir: Path | None = None,
                  timeouts: Timeouts = DEFAULT) -> ImportResult:
    """Bring an export file back as VM *name*, on a new memory file, running
    (or paused with ``resume=False``). Every sha256 is checked first. The
    kernel and initrd go to *files_dir* (default: the VM's own directory)."""
    t0 = time.monotonic()
    src = Path(file).absolute()
    check_name(name)
    header = read_header(src)
    if store.has_vm(name):
        raise AlreadyExists(f"a VM named {name!r} exists already")
    if header.get("spec", {}).get("disks"):
        raise MigrationError(f"{src}: its VM had disks, which a snapshot file does not "
                             "carry; it cannot be imported")
    await asyncio.to_thread(check_export, src, header)
    t_checked = time.monotonic()
    if memory_dir:
        mdir = Path(memory_dir).absolute()
    else:
        mdir = store.home / "memory" if persistent else store.memory_dir
    if persistent and not vm.is_persistent_dir(mdir):
        raise InvalidInput(f"--persistent needs a memory dir on disk; {str(mdir)!r} is on "
                           f"{vm.filesystem_type(mdir)}")
    source = VMSpec.from_dict(header["spec"])
    qemu = source.qemu if shutil.which(source.qemu) else "qemu-system-x86_64"
    vdir = files_dir or store.vm_dir(name)
    files = {k: str(vdir / k) for k in header["blobs"]}
    spec = source.with_(
        name=name, qemu=qemu, machine=header["machine"], vmgenid=str(uuid.uuid4()),
        kernel=files.get("kernel"), initrd=files.get("initrd"),
        memory=MemorySpec(backend="file", path=str(vm.memory_file_path(mdir, name)),
                          share=True))
    rec = VMRecord(name=name, spec=spec, state="starting",
                   info=VMInfo(owns_memory=True, imported_from=str(src)))
    store.add_vm(rec)  # reserves the name
    m: Machine | None = None
    try:
        with store.lock(name, wait=False):
            vdir.mkdir(parents=True, exist_ok=True)
            await asyncio.to_thread(_extract_blobs, src, header, files)
            m = await vm.launch_recorded(store, rec, incoming=("defer",), timeouts=timeouts)
            rec.pid, rec.pid_start = m.pid, m.start_time
            store.update_vm(rec)
            t_spawned = time.monotonic()
            await _incoming(m, f"file:{src},offset={header['ram']['offset']}",
                            timeouts.migrate, {}, x_ignore_shared=False, mapped_ram=True)
            t_loaded = time.monotonic()
            await migration.set_capabilities(m, mapped_ram=False)
            if resume:
                await m.resume()
            rec.state = "running" if resume else "paused"
            store.update_vm(rec)
            await m.disconnect()
    except BaseException:
        if m is not None:
            await m.kill()
        vm.remove_vm_files(store, rec)
        store.remove_vm(name)
        raise
    clock = await _sync_clock(store, rec) if resume else False
    log.info("%s: imported from %s", name, src)
    return ImportResult(name=name, state=rec.state, pid=rec.pid, file=str(src),
                        memory_file=spec.memory.path, memory_mib=spec.memory_mib,
                        seconds=time.monotonic() - t0, check_seconds=t_checked - t0,
                        load_seconds=t_loaded - t_spawned, clock_synced=clock)


def _extract_blobs(src: Path, header: dict[str, Any], files: dict[str, str]) -> None:
    with open(src, "rb") as f:
        for key, dest in files.items():
            part = header["blobs"][key]
            f.seek(part["offset"])
            left = part["size"]
            with open(dest, "wb") as out:
                while left:
                    chunk = f.read(min(1 << 20, left))
                    if not chunk:
                        raise MigrationError(f"{src} is truncated in its {key}")
                    out.write(chunk)
                    left -= len(chunk)


async def import_template(store: Store, file: Path | str, name: str,
                          persistent: bool = False, memory_dir: Path | str | None = None,
                          timeouts: Timeouts = DEFAULT) -> TemplateManifest:
    """Bring an export file back as template *name*: import it as a paused
    temporary VM (the guest does not run) and freeze that with
    :func:`vmfork.templates.create.create_from_vm`."""
    check_name(name, "template")
    if store.has_template(name):
        raise AlreadyExists(f"a template named {name!r} exists already")
    tmp_name = f"import-{secrets.token_hex(4)}"
    # Kernel and initrd go straight to the template's directory, which the
    # template owns (removing the template deletes it).
    tdir = template_dir(store, name)
    tdir.mkdir(parents=True, exist_ok=True)
    try:
        await import_(store, file, tmp_name, persistent=persistent, memory_dir=memory_dir,
                      resume=False, files_dir=tdir, timeouts=timeouts)
        try:
            return await create.create_from_vm(store, name, tmp_name, timeouts,
                                               imported_from=str(Path(file).absolute()))
        except BaseException:
            with contextlib.suppress(VmforkError):
                await vm.stop(store, tmp_name, force=True)
            raise
    except BaseException:
        shutil.rmtree(tdir, ignore_errors=True)
        raise


__all__ = [
    "check_export", "export", "import_", "import_template", "read_header",
    "recover", "restore", "save", "verify",
]
