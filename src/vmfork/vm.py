"""VM operations over the catalog: run, pause/resume, exec, stop.

Owns what a ``run`` request means (:class:`RunOptions` checked and turned into
a :class:`VMSpec`: images, disks and their overlays, the memory file, the
accelerator) and the operations on a live VM. Starting QEMU goes through the
launch transaction (:mod:`vmfork.launch`); an operation that finds a VM's QEMU
gone records it as ``dead``; ``stop`` removes the VM with everything it owns.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import secrets
import shutil
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from vmfork import admission, checkpoints, ports
from vmfork.agents import AGENTS as AGENTS
from vmfork.agents import agent_for as agent_for
from vmfork.agents import guest_exec as guest_exec
from vmfork.agents import qga_for as qga_for
from vmfork.errors import InvalidInput, StateError, VmforkError
from vmfork.files import fsync_path, unlink_quietly
from vmfork.guest import readiness
from vmfork.images.demo import demo_image
from vmfork.launch import (
    Launch,
    NewVM,
    attach,
    machine_for,
    qemu_log,
    remove_vm_files,
    undo_all_abandoned,
)
from vmfork.listing import ABANDONED, LIVE_STATES, death_cause, describe, observed_state
from vmfork.names import check_name
from vmfork.private import private_dir
from vmfork.proc import process_alive
from vmfork.qemu.accel import resolve_accel
from vmfork.qemu.machine import READY_MARKER, Machine, find_qemu
from vmfork.records import VMInfo, VMRecord
from vmfork.results import ExecResult, VMStatus
from vmfork.spec import DiskSpec, MemorySpec, NetSpec, Readiness, VMSpec, new_mac, parse_ready
from vmfork.store import Store
from vmfork.timeouts import DEFAULT, Timeouts, check_seconds
from vmfork.update import forwards

log = logging.getLogger("vmfork.vm")

@dataclass(frozen=True)
class RunOptions:
    """What a user asks for with ``vmfork run``."""

    name: str
    memory_mib: int = 256
    cpus: int = 1
    demo: bool = False
    kernel: str | None = None
    initrd: str | None = None
    append: str | None = None
    disks: tuple[str, ...] = ()
    #: ``user`` (QEMU's user-mode network, one virtio NIC) or ``none``; not
    #: given (None): ``user`` if port forwards or ``--ready tcp:PORT`` need
    #: it, else ``none``.
    net: str | None = None
    ports: tuple[tuple[int, int], ...] = ()
    memory_dir: str | None = None
    memory_backend: str = "file"
    accel: str = "auto"
    qemu: str = "qemu-system-x86_64"
    #: Wait until the guest is ready, as *ready* says (False: return once
    #: QEMU runs, whatever *ready* says).
    wait_ready: bool = True
    #: How to know the guest is ready (:func:`vmfork.spec.parse_ready`).
    ready: str = "auto"
    persistent: bool = False
    #: A named guest image (``demo`` or ``debian``) that supplies kernel,
    #: initrd, command line and boot disk.
    image: str | None = None
    #: Each disk gets a qcow2 overlay in the VM's directory; the image given
    #: is only ever read. False attaches the images themselves, writable.
    overlay: bool = True
    #: Kept for callers of older versions: every VM has the qemu-guest-agent port.
    qga: bool = True
    #: Seconds without use after which vmfork pauses the VM (None: never;
    #: :mod:`vmfork.idle`).
    idle_pause: float | None = None


#: Fewest seconds an idle policy may say (the watcher looks every second or two).
MIN_IDLE = 1.0


def check_idle_pause(seconds: object) -> float | None:
    """*seconds* as an idle policy (None or 0: never pause); InvalidInput if
    it is not a number of seconds from :data:`MIN_IDLE` on."""
    if seconds is None or (seconds == 0 and not isinstance(seconds, bool)):
        return None
    s = check_seconds(seconds, "idle pause")
    if s < MIN_IDLE:
        raise InvalidInput(f"invalid idle pause {s:g}: give at least {MIN_IDLE:g} seconds "
                           "(0: never)")
    return s


def _existing_file(path: str, what: str) -> str:
    p = Path(path).expanduser()
    if not p.is_file():
        raise InvalidInput(f"{what} {path!r} does not exist or is not a file")
    if not os.access(p, os.R_OK):
        raise InvalidInput(f"{what} {path!r} is not readable")
    return str(p.absolute())


def _disk_format(path: str) -> str:
    with open(path, "rb") as f:
        return "qcow2" if f.read(4) == b"QFI\xfb" else "raw"


#: File systems whose contents do not survive a host reboot.
VOLATILE_FS = frozenset({"tmpfs", "ramfs", "devtmpfs", "hugetlbfs"})


def filesystem_type(path: Path | str) -> str:
    """Type of the file system holding *path* (or its nearest existing parent),
    from the longest matching mount point in /proc/mounts."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    real = os.path.realpath(p)
    best, fstype = "", "unknown"
    try:
        with open("/proc/mounts") as f:
            for line in f:
                fields = line.split()
                if len(fields) < 3:
                    continue
                mnt = fields[1].replace("\\040", " ")
                inside = real == mnt or real.startswith(mnt.rstrip("/") + "/")
                if inside and len(mnt) >= len(best):
                    best, fstype = mnt, fields[2]
    except OSError:
        pass
    return fstype


def is_persistent_dir(path: Path | str) -> bool:
    return filesystem_type(path) not in VOLATILE_FS


def memory_file_path(memory_dir: Path, name: str) -> Path:
    return memory_dir / f"{name}-{secrets.token_hex(4)}.mem"


def memory_dir(spec: VMSpec) -> Path | None:
    """The directory of *spec*'s memory file (None for a memfd)."""
    mem = spec.memory
    return Path(mem.path).parent if mem.backend == "file" and mem.path else None


#: Named guest images for ``vmfork run --image``.
IMAGES = ("demo", "debian")


def image_options(store: Store, opts: RunOptions) -> RunOptions:
    """Fill kernel, initrd, command line and boot disk from a named image."""
    if opts.image not in IMAGES:
        raise InvalidInput(f"unknown image {opts.image!r}: use one of {', '.join(IMAGES)}")
    if opts.demo or opts.kernel or opts.initrd:
        raise InvalidInput("--image cannot be combined with --demo, --kernel or --initrd")
    if opts.image == "demo":
        return dataclasses.replace(opts, image=None, demo=True)
    from vmfork.images.debian import debian_image
    img = debian_image(store.images_dir)
    # Ready once the image's own readiness unit has run (multi-user reached,
    # udev settled, an address on the NIC), which its marker says; its
    # qemu-guest-agent answers before that.
    ready = f"console:{READY_MARKER.decode()}" if opts.ready == "auto" else opts.ready
    return dataclasses.replace(opts, image=None, kernel=img.kernel, initrd=img.initrd,
                               append=opts.append or img.append,
                               disks=(img.disk, *opts.disks), net=opts.net or "user",
                               ready=ready)


def disk_specs(store: Store, opts: RunOptions) -> tuple[DiskSpec, ...]:
    """The VM's disks: by default a qcow2 overlay in its VM directory over
    each image given (created by :func:`create_overlays`)."""
    images = [_existing_file(d, "disk") for d in opts.disks]
    if not opts.overlay:
        return tuple(DiskSpec(path=p, format=_disk_format(p)) for p in images)
    vdir = store.vm_dir(opts.name)
    return tuple(DiskSpec(path=str(vdir / f"disk{i}.qcow2"), format="qcow2", backing=p,
                          backing_format=_disk_format(p)) for i, p in enumerate(images))




def build_spec(store: Store, opts: RunOptions) -> VMSpec:
    """Check *opts* and turn them into a VMSpec (touches no QEMU)."""
    store.check_new_name(opts.name)
    if opts.image is not None:
        opts = image_options(store, opts)
    if opts.demo and (opts.kernel or opts.disks):
        raise InvalidInput("--demo cannot be combined with --kernel or --disk")
    kernel = initrd = None
    append = opts.append or ""
    if opts.demo:
        img = demo_image(store.images_dir)
        kernel, initrd, append = img.kernel, img.initrd, opts.append or img.append
    elif opts.kernel:
        kernel = _existing_file(opts.kernel, "kernel")
        initrd = _existing_file(opts.initrd, "initrd") if opts.initrd else None
    elif not opts.disks:
        raise InvalidInput("nothing to boot: give --demo, --kernel or --disk")
    disks = disk_specs(store, opts)
    if shutil.which(opts.qemu) is None and not os.access(opts.qemu, os.X_OK):
        raise InvalidInput(f"QEMU binary {opts.qemu!r} not found")
    if opts.persistent and opts.memory_backend != "file":
        raise InvalidInput("--persistent needs the file memory backend")
    if opts.memory_backend == "memfd":
        memory = MemorySpec(backend="memfd")
    elif opts.memory_backend == "file":
        if opts.memory_dir:
            mdir = Path(opts.memory_dir).absolute()
        else:
            mdir = store.home / "memory" if opts.persistent else store.memory_dir
        private_dir(mdir, "memory dir")  # UnsafePath before anything is made
        if opts.persistent and not is_persistent_dir(mdir):
            raise InvalidInput(f"--persistent needs a memory dir on disk; {str(mdir)!r} is on "
                               f"{filesystem_type(mdir)}")
        memory = MemorySpec(backend="file", path=str(memory_file_path(mdir, opts.name)),
                            share=True)
    else:
        raise InvalidInput(f"invalid memory backend {opts.memory_backend!r}: use file or memfd")
    accel = opts.accel
    if accel == "auto":
        probe = demo_image(store.images_dir)
        accel = resolve_accel(accel, opts.qemu, probe.kernel, probe.initrd, store.home)
    if accel not in ("kvm", "tcg"):
        raise InvalidInput(f"invalid accelerator {opts.accel!r}: use auto, kvm or tcg")
    ready = parse_ready(opts.ready)
    net = NetSpec(mac=new_mac(), ports=_ports_for(opts, ready)) if _wants_net(opts, ready) else None
    return VMSpec(name=opts.name, memory_mib=opts.memory_mib, memory=memory, cpus=opts.cpus,
                  kernel=kernel, initrd=initrd, append=append, disks=disks, net=net,
                  accel=accel, qemu=opts.qemu, qga=True, ready=str(ready), hpet=False)


#: Network choices of ``vmfork run --net``.
NETS = ("user", "none")


def _wants_net(opts: RunOptions, ready: Readiness) -> bool:
    """True if the VM gets a NIC on QEMU's user-mode network."""
    if opts.net is not None and opts.net not in NETS:
        raise InvalidInput(f"invalid network {opts.net!r}: use user or none")
    needs = "port forwards" if opts.ports else f"--ready {ready}" if ready.kind == "tcp" else ""
    if opts.net == "none" and needs:
        raise InvalidInput(f"{needs} need a network: use --net user, not --net none")
    return opts.net == "user" or bool(needs)


def _ports_for(opts: RunOptions, ready: Readiness) -> tuple[tuple[int, int], ...]:
    """The port forwards asked for, plus one on a free host port to the guest
    port that ``--ready tcp:PORT`` waits for if none forwards it."""
    if ready.kind != "tcp" or any(g == ready.port for _h, g in opts.ports):
        return opts.ports
    return (*opts.ports, (ports.free_port(), ready.port))




async def run(store: Store, opts: RunOptions, timeouts: Timeouts = DEFAULT) -> VMStatus:
    """Start a VM and (by default) wait until its guest is ready, as its
    readiness says (:mod:`vmfork.guest.readiness`). Launches that a killed
    vmfork abandoned are undone first (:func:`vmfork.launch.undo_abandoned`):
    their names and memory are free again."""
    idle_pause = check_idle_pause(opts.idle_pause)
    await undo_all_abandoned(store, timeouts)
    spec = build_spec(store, opts)
    admission.check_new_vm(spec.name, spec.memory_mib, memory_dir(spec))
    rec = VMRecord(name=spec.name, spec=spec, state="starting",
                   info=VMInfo(owns_memory=True, idle_pause=idle_pause))
    t0 = time.monotonic()
    async with Launch(store, NewVM(store, rec), spec, timeouts=timeouts) as launch:
        m = await launch.spawn(fresh_overlays=True)
        await checkpoints.checkpoint("run.spawned")
        await m.resume()
        if opts.wait_ready:
            ready = await readiness.wait_ready(store, rec, m, timeouts)
            rec.info.agent, rec.info.guest_os = ready.agent, ready.os_info
        rec.state = "running"
        rec.info.boot_seconds = round(time.monotonic() - t0, 3)
        store.update_vm(rec)
        await m.disconnect()
    log.info("%s: running (pid %d, %.2f s)", rec.name, rec.pid, rec.info.boot_seconds)
    return describe(rec)



# -- a save's files, and what invalidates them ------------------------------------------
#: A save's device state and its manifest, in the VM's own directory
#: (:mod:`vmfork.snapshots.save` writes and reads them).
STATE_FILE = "state.mig"
MANIFEST_FILE = "state.json"


def state_paths(store: Store, name: str) -> tuple[Path, Path]:
    """The state file and its manifest for VM *name*."""
    d = store.vm_dir(name)
    return d / STATE_FILE, d / MANIFEST_FILE


def invalidate_save(store: Store, name: str) -> None:
    """Delete the save files of a live VM before its guest runs again; the
    caller holds the VM's lock.

    A save's manifest describes the device state of a QEMU that has not run
    the guest since: a save killed after writing it leaves the VM live (its
    QEMU paused in ``postmigrate``), and ``vmfork save`` can finish that
    save. Once anything continues the guest (resume, an update, a rollback,
    an export of a running VM), RAM and disks move on from that state, and a
    restore from it would load stale devices onto newer memory: every such
    path calls this first. The manifest goes first, so that a kill between
    the two deletions leaves no manifest without its state."""
    state, manifest = state_paths(store, name)
    if manifest.exists() or state.exists():
        log.warning("%s: the guest runs again; its interrupted save is invalidated", name)
        unlink_quietly(manifest)
        fsync_path(manifest.parent)
        unlink_quietly(state)


def reconcile(store: Store, rec: VMRecord) -> VMRecord:
    """Record a VM whose QEMU is gone as dead (:func:`vmfork.listing.observed_state`;
    an abandoned launch is undone, not recorded: :func:`vmfork.launch.undo_abandoned`)."""
    state = observed_state(rec)
    if state != rec.state and state != ABANDONED:
        rec.state = state
        store.update_vm(rec)
    return rec



def get_live(store: Store, name: str) -> VMRecord:
    rec = reconcile(store, store.get_vm(check_name(name)))
    if rec.state == "dead":
        cause = death_cause(rec)
        raise StateError(f"{name}: its QEMU process is gone (dead"
                         f"{'; ' + cause if cause else ''}); 'vmfork stop {name}' removes it")
    if rec.state not in LIVE_STATES:
        raise StateError(f"{name} is {rec.state}, not running")
    return rec


@contextlib.asynccontextmanager
async def attached(store: Store, name: str,
                   timeouts: Timeouts = DEFAULT) -> AsyncIterator[tuple[VMRecord, Machine]]:
    """Lock the VM, check it is alive and connect to its QMP monitor."""
    async with store.lock_async(check_name(name)):
        rec = get_live(store, name)
        m = await attach(store, rec, timeouts)
        try:
            yield rec, m
        finally:
            await m.disconnect()


async def drain_console(store: Store, name: str, timeouts: Timeouts = DEFAULT) -> None:
    """Move the console output QEMU holds for a live VM into its console.log
    (:meth:`Machine.drain_console`). Best effort: a VM busy with another
    command for longer than one QMP deadline, or unreachable, is left as is."""
    with contextlib.suppress(VmforkError):
        async with store.lock_async(check_name(name), wait=timeouts.qmp):
            rec = get_live(store, name)
            m = await attach(store, rec, timeouts)
            try:
                await m.drain_console()
            finally:
                await m.disconnect()


async def pause(store: Store, name: str, timeouts: Timeouts = DEFAULT) -> None:
    async with attached(store, name, timeouts) as (rec, m):
        if await m.status() != "running":
            raise StateError(f"{name} is not running (it is {await m.status()})")
        await m.pause()
        rec.state, rec.info.idle_since = "paused", None  # the user's pause: no use undoes it
        store.update_vm(rec)


async def resume(store: Store, name: str, timeouts: Timeouts = DEFAULT) -> None:
    async with attached(store, name, timeouts) as (rec, m):
        st = await m.status()
        if st not in ("paused", "postmigrate"):  # postmigrate: after an export or save
            raise StateError(f"{name} is not paused (it is {st})")
        await resume_held(store, rec, m)


async def resume_held(store: Store, rec: VMRecord, m: Machine) -> None:
    """Resume VM *rec* through its QEMU *m* (the caller holds the VM's lock)
    and record it running. One paused for idling gets its port forwards
    back (:mod:`vmfork.idle`); a port a watcher still holds comes back in
    the watcher's next round."""
    invalidate_save(store, rec.name)
    await m.resume()
    if rec.info.idle_since is not None:
        for warning in await forwards.ensure(m, rec.spec.net):
            log.info("%s: %s", rec.name, warning)
    rec.state, rec.info.idle_since = "running", None
    store.update_vm(rec)


async def status(store: Store, name: str, timeouts: Timeouts = DEFAULT) -> str:
    async with attached(store, name, timeouts) as (_rec, m):
        return await m.status()


async def stop(store: Store, name: str, force: bool = False,
               timeouts: Timeouts = DEFAULT) -> None:
    """End a VM's QEMU (if it runs) and remove the VM and its files, with
    whatever an interrupted live update left (:func:`_end_update_leftovers`)."""
    check_name(name)
    async with store.lock_async(name):
        rec = store.get_vm(name)
        if rec.pid and process_alive(rec.pid, rec.pid_start):
            m = machine_for(store, rec, timeouts)
            if not force:
                with contextlib.suppress(Exception):
                    await m.connect()
            await m.shutdown(force=force)
        await _end_update_leftovers(store, rec, timeouts)
        await _end_fork_leftovers(store, rec, timeouts)
        remove_vm_files(store, rec)
        store.remove_vm(name)
    log.info("%s: removed", name)


async def _end_update_leftovers(store: Store, rec: VMRecord, timeouts: Timeouts) -> None:
    """Kill the QEMU processes an unsettled live update left beside the VM's
    own (the new one of ``info.update``, the old one of ``info.retire``) and
    remove a copy's new memory file. The VM is being removed: nothing is left
    to settle (:mod:`vmfork.update.recovery` would otherwise)."""
    intent, retired = rec.info.update, rec.info.retire
    if intent is not None:
        paths = store.run_paths(rec.name, intent.gen)
        pid = find_qemu(paths.qmp)
        if pid is not None and pid != rec.pid:
            await Machine(intent.spec, paths, qemu_log(store, rec.name), pid,
                          timeouts=timeouts).kill()
        if intent.new_memory_file and intent.new_memory_file != rec.spec.memory.path:
            unlink_quietly(intent.new_memory_file)
    stale = retired is not None and process_alive(retired.pid, retired.pid_start)
    if retired is not None and stale and retired.pid != rec.pid:
        await Machine(rec.spec, store.run_paths(rec.name, retired.gen),
                      qemu_log(store, rec.name), retired.pid, timeouts=timeouts).kill()


async def _end_fork_leftovers(store: Store, rec: VMRecord, timeouts: Timeouts) -> None:
    """Kill the new QEMU of an unsettled fork of the VM and remove the fork's
    base reservation and files (:class:`vmfork.records.ForkWork`): the VM is
    being removed, the fork with it."""
    work = rec.info.fork
    if work is None:
        return
    if work.new_pid and work.new_pid != rec.pid and process_alive(work.new_pid, work.new_start):
        await Machine(work.spec, store.run_paths(rec.name, work.gen), qemu_log(store, rec.name),
                      work.new_pid, timeouts=timeouts).kill()
    unlink_quietly(work.memory_to)
    shutil.rmtree(work.directory, ignore_errors=True)
    store.drop_reservation(work.base)


async def exec_(store: Store, name: str, command: str,
                timeout: float | None = None, timeouts: Timeouts = DEFAULT,
                agent: str = "auto") -> ExecResult:
    """Run *command* in the guest of the running VM *name* (see :func:`guest_exec`)."""
    rec = get_live(store, name)
    if rec.state == "paused":
        raise StateError(f"{name} is paused; resume it first")
    return await guest_exec(store, rec, command, timeout, timeouts, agent)


