"""Templates and copy-on-write clones, with a warm pool.

Owns the template life cycle: freeze a running VM (device state saved with
``x-ignore-shared``, so RAM is not written; the VM's shared memory file
becomes the template's read-only memory file), check a template before use
(QEMU version, machine type, memory file size, state sha256), start clones
that map the memory file privately (``share=off``, copy-on-write) and load the
device state, keep a warm pool of QEMU processes waiting for incoming state,
and remove templates only when nothing uses them.

Disks: a template takes over its VM's qcow2 overlays (``disk{i}.qcow2`` in
the template directory, read-only); each clone writes to an overlay of its
own backed by them. When the VM has qemu-guest-agent its file systems are
frozen right before the pause, so disk and memory are saved at one instant;
each clone thaws them right after it runs, before anything writes.

Hooks: a shell command (``on_clone``) run in each clone after its identity,
before :func:`clone` returns; a template keeps a default one, a call may
replace it.

A clone is an ordinary VM record (``template`` set, memory not owned); after
it runs it is given its own identity (:mod:`vmfork.identity`); the VM
generation ID is new per QEMU process, so the guest reseeds its RNG.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

from vmfork import vm
from vmfork.errors import (
    AlreadyExists,
    GuestError,
    InvalidInput,
    StateError,
    TemplateError,
    VmforkTimeout,
)
from vmfork.files import sha256_file
from vmfork.guest import identity
from vmfork.qemu import migration
from vmfork.qemu.machine import Machine, deadline, process_alive
from vmfork.records import PoolMember, VMInfo, VMRecord
from vmfork.results import CloneResult, PoolMemberStatus, PoolStatus
from vmfork.spec import DiskSpec, MemorySpec, NetSpec, VMSpec, check_name, new_mac
from vmfork.store import Store
from vmfork.timeouts import DEFAULT, Timeouts

log = logging.getLogger("vmfork.template")
T = TypeVar("T")


# -- creating -----------------------------------------------------------------
def template_dir(store: Store, name: str) -> Path:
    return store.templates_dir / check_name(name, "template")


async def create_from_vm(store: Store, name: str, vm_name: str,
                         timeouts: Timeouts = DEFAULT,
                         on_clone: str | None = None) -> dict[str, Any]:
    """Freeze the running VM *vm_name* into template *name*; the VM ends.

    Its disk overlays become the template's (read-only). With
    qemu-guest-agent and disks, the guest's file systems are frozen right
    before the pause; if anything fails before QEMU ends, the VM is resumed
    and thawed. *on_clone* is the default hook of the template's clones."""
    check_name(name, "template")
    if store.has_template(name):
        raise AlreadyExists(f"a template named {name!r} exists already")
    rec = vm.get_live(store, vm_name)
    check_disks_templatable(rec.spec)
    if rec.spec.memory.backend != "file" or not rec.spec.memory.share:
        rec = await _share_memory(store, rec, timeouts)
    tdir = template_dir(store, name)
    tdir.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    frozen = False
    t_frozen = 0.0
    try:
        async with vm.attached(store, vm_name, timeouts) as (rec, m):
            was_running = await m.status() == "running"
            ident = await migration.qemu_identity(m)
            if was_running and rec.spec.qga and any(not d.readonly for d in rec.spec.disks):
                await _freeze(store, rec, timeouts)
                frozen = True
                t_frozen = time.monotonic() - t0
            try:
                await m.pause()
                try:
                    stats, digest = await migration.save_state(
                        m, tdir / "state", timeouts.migrate, x_ignore_shared=True)
                except OSError as exc:
                    raise TemplateError(f"{vm_name}: writing the template state failed: "
                                        f"{exc}") from exc
            except BaseException:
                if was_running:
                    with contextlib.suppress(Exception):
                        await m.resume()
                if frozen:
                    await _thaw_quietly(store, rec, timeouts)
                raise
            t_saved = time.monotonic() - t0
            await m.shutdown()
    except BaseException:
        shutil.rmtree(tdir, ignore_errors=True)
        raise
    # QEMU has ended: the VM's overlays (and files it kept in its directory)
    # and its memory file become the template's, read-only.
    src_dir = store.vm_dir(vm_name)
    try:
        disks, entries, files = await asyncio.to_thread(_adopt_files, rec.spec, src_dir, tdir)
    except BaseException:
        shutil.rmtree(tdir, ignore_errors=True)
        raise
    src = Path(str(rec.spec.memory.path))
    mem = src.with_name(f"tpl-{name}-{secrets.token_hex(4)}.mem")
    os.rename(src, mem)
    os.chmod(mem, 0o444)
    spec = rec.spec.with_(name=name, machine=ident["machine"], disks=disks,
                          kernel=files.get("kernel", rec.spec.kernel),
                          initrd=files.get("initrd", rec.spec.initrd),
                          memory=MemorySpec(backend="file", path=str(mem), share=False,
                                            readonly=True))
    manifest = {
        "name": name, "created": time.time(), "source_vm": vm_name,
        "parent": rec.template,
        "memory_file": str(mem), "memory_size": mem.stat().st_size,
        "state_file": str(tdir / "state"), "state_sha256": digest,
        "state_size": (tdir / "state").stat().st_size,
        "disks": entries, "frozen": frozen, "on_clone": on_clone,
        "qemu_version": ident["qemu_version"], "machine": ident["machine"],
        "qemu": rec.spec.qemu, "spec": json.loads(spec.to_json()),
        "guest": (rec.info.guest or "demo"),
        # seconds: the state save; total_seconds: from the request until the
        # state was saved (freeze included).
        "save": {**stats.to_dict(), "freeze_seconds": round(t_frozen, 4),
                 "total_seconds": round(t_saved, 4)},
    }
    (tdir / "manifest.json").write_text(json.dumps(manifest, indent=2))
    store.add_template(name, manifest)
    shutil.rmtree(store.run_dir(vm_name), ignore_errors=True)
    shutil.rmtree(src_dir, ignore_errors=True)
    store.remove_vm(vm_name)
    log.info("template %s: created from %s (state %d bytes, %d disks%s)", name, vm_name,
             manifest["state_size"], len(entries), ", frozen" if frozen else "")
    return manifest


def check_disks_templatable(spec: VMSpec) -> None:
    """Refuse a VM whose writable disk is not an overlay: a template cannot
    take over an image the user attached (``--no-overlay``)."""
    for disk in spec.disks:
        if disk.backing is None and not disk.readonly:
            raise TemplateError(f"{spec.name}: disk {disk.path} is attached without an overlay "
                                "(--no-overlay); a template needs its disks as overlays")


def disk_record(path: Path, index: int, backing: str | None) -> dict[str, Any]:
    """The manifest entry of a template disk: enough to notice it changed."""
    st = path.stat()
    entry: dict[str, Any] = {"index": index, "path": str(path), "size": st.st_size,
                             "mtime_ns": st.st_mtime_ns, "backing": backing}
    if backing is not None:
        bst = Path(backing).stat()
        entry.update(backing_size=bst.st_size, backing_mtime_ns=bst.st_mtime_ns)
    return entry


def _adopt_files(spec: VMSpec, src_dir: Path, tdir: Path
                 ) -> tuple[tuple[DiskSpec, ...], list[dict[str, Any]], dict[str, str]]:
    """Move the VM's disk overlays into *tdir* as ``disk{i}.qcow2`` (read-only),
    and a kernel or initrd that lives in its directory *src_dir*. Returns the
    template's disks, their manifest entries and the moved boot files; on a
    failure everything moved goes back."""
    moved: list[tuple[Path, Path]] = []

    def move(src: Path, dst: Path) -> None:
        shutil.move(src, dst)
        moved.append((src, dst))

    try:
        disks: list[DiskSpec] = []
        entries: list[dict[str, Any]] = []
        for i, disk in enumerate(spec.disks):
            if disk.backing is None:  # a read-only image: shared as it is
                disks.append(disk)
                continue
            dst = tdir / f"disk{i}.qcow2"
            move(Path(disk.path), dst)
            os.chmod(dst, 0o444)
            disks.append(replace(disk, path=str(dst), readonly=False))
            entries.append(disk_record(dst, i, disk.backing))
        files: dict[str, str] = {}
        for key in ("kernel", "initrd"):
            path = getattr(spec, key)
            if path and Path(path).is_relative_to(src_dir):
                dst = tdir / key
                move(Path(path), dst)
                files[key] = str(dst)
        return tuple(disks), entries, files
    except BaseException:
        for src, dst in reversed(moved):
            with contextlib.suppress(OSError):
                os.chmod(dst, 0o644)
                shutil.move(dst, src)
        raise


async def _freeze(store: Store, rec: VMRecord, timeouts: Timeouts) -> None:
    """Freeze the guest's file systems (QGA), or thaw and raise TemplateError."""
    try:
        async with vm.qga_for(store, rec, timeouts) as g:
            n = await g.fsfreeze_freeze(timeout=timeouts.exec)
    except (GuestError, VmforkTimeout) as exc:
        await _thaw_quietly(store, rec, timeouts)
        raise TemplateError(f"{rec.name}: freezing the guest's file systems failed: "
                            f"{exc}") from exc
    log.info("%s: %d file systems frozen", rec.name, n)


async def _thaw_quietly(store: Store, rec: VMRecord, timeouts: Timeouts) -> None:
    """Best effort thaw of the source VM after a failed template creation.
    A freeze that timed out may still be running in the agent, so the
    session may wait as long as a command."""
    try:
        async with vm.qga_for(store, rec, replace(timeouts, agent=timeouts.exec)) as g:
            await g.fsfreeze_thaw(timeout=timeouts.exec)
    except Exception as exc:
        log.warning("%s: could not thaw the guest's file systems: %s", rec.name, exc)


async def _share_memory(store: Store, rec: VMRecord, timeouts: Timeouts) -> VMRecord:
    """Give a VM with private memory (a clone) a shared memory file of its own
    by a local copy migration, so it can become a template (chained templates)."""
    try:
        from vmfork import update
    except ImportError as exc:  # pragma: no cover - update ships with vmfork
        raise TemplateError(f"{rec.name}: its memory is private; cannot template it") from exc
    await update.update(store, rec.name, mode="copy", timeouts=timeouts)
    new = store.get_vm(rec.name)
    if new.spec.memory.backend != "file" or not new.spec.memory.share:
        raise TemplateError(f"{rec.name}: could not move its memory to a shared file")
    return new


async def create_demo(store: Store, name: str, memory_mib: int = 512,
                      prepare: str | None = None, accel: str = "auto",
                      timeouts: Timeouts = DEFAULT,
                      on_clone: str | None = None) -> dict[str, Any]:
    """Boot the demo guest, run *prepare* in it, and freeze it as *name*
    (*on_clone*: the clones' default hook)."""
    check_name(name, "template")
    if store.has_template(name):
        raise AlreadyExists(f"a template named {name!r} exists already")
    build = f"{name}.build"
    await vm.run(store, vm.RunOptions(name=build, memory_mib=memory_mib, demo=True,
                                      accel=accel), timeouts)
    try:
        if prepare:
            r = await vm.exec_(store, build, prepare, timeouts=timeouts)
            if r.exit_code != 0:
                raise TemplateError(f"--prepare failed with status {r.exit_code}: "
                                    f"{(r.stderr or r.stdout).strip()[-200:]}")
        return await create_from_vm(store, name, build, timeouts, on_clone=on_clone)
    finally:
        if store.has_vm(build):
            await vm.stop(store, build, force=True)


# -- checking -----------------------------------------------------------------
_QEMU_VERSIONS: dict[tuple[str, float], str] = {}


def qemu_binary_version(qemu: str) -> str:
    """Version of a QEMU binary (from ``--version``; cached per path and mtime)."""
    path = shutil.which(qemu) or qemu
    try:
        key = (path, os.stat(path).st_mtime)
    except OSError as exc:
        raise TemplateError(f"QEMU binary {qemu!r} not found") from exc
    if key not in _QEMU_VERSIONS:
        out = subprocess.run([path, "--version"], capture_output=True, text=True,
                             timeout=10).stdout
        words = out.split()
        ver = words[words.index("version") + 1] if "version" in words else "unknown"
        _QEMU_VERSIONS[key] = ver
    return _QEMU_VERSIONS[key]


def check(manifest: dict[str, Any], qemu: str | None = None) -> None:
    """Refuse a template whose files or QEMU no longer match its manifest."""
    name = manifest["name"]
    mem = Path(manifest["memory_file"])
    if not mem.is_file():
        raise TemplateError(f"template {name}: memory file {mem} is missing")
    if mem.stat().st_size != manifest["memory_size"]:
        raise TemplateError(f"template {name}: memory file {mem} was resized "
                            f"({mem.stat().st_size} bytes, expected {manifest['memory_size']})")
    state = Path(manifest["state_file"])
    if not state.is_file():
        raise TemplateError(f"template {name}: state file {state} is missing")
    if sha256_file(state) != manifest["state_sha256"]:
        raise TemplateError(f"template {name}: state file {state} is corrupt "
                            "(sha256 differs from the manifest)")
    check_disks(manifest)
    ver = qemu_binary_version(qemu or manifest["qemu"])
    if ver != manifest["qemu_version"]:
        raise TemplateError(f"template {name} was made with QEMU {manifest['qemu_version']}, "
                            f"this QEMU is {ver}")


def check_disks(manifest: dict[str, Any]) -> None:
    """Refuse a template whose disk overlays (or the images under them) are
    missing or were changed since it was made (size or mtime differs)."""
    name = manifest["name"]
    for entry in manifest.get("disks", ()):
        path = Path(entry["path"])
        try:
            st = path.stat()
        except FileNotFoundError:
            raise TemplateError(f"template {name}: disk overlay {path} is missing") from None
        if (st.st_size, st.st_mtime_ns) != (entry["size"], entry["mtime_ns"]):
            raise TemplateError(f"template {name}: disk overlay {path} was modified "
                                "(size or mtime differs from the manifest)")
        backing = entry.get("backing")
        if backing is None or "backing_size" not in entry:
            continue
        try:
            bst = Path(backing).stat()
        except FileNotFoundError:
            raise TemplateError(f"template {name}: image {backing} under its disk "
                                "is missing") from None
        if (bst.st_size, bst.st_mtime_ns) != (entry["backing_size"], entry["backing_mtime_ns"]):
            raise TemplateError(f"template {name}: image {backing} under its disk changed "
                                "since the template was made")


def template_spec(manifest: dict[str, Any]) -> VMSpec:
    return VMSpec.from_dict(manifest["spec"])


def template_mac(manifest: dict[str, Any]) -> str | None:
    """The MAC the template's guest has (its NIC keeps it in every clone
    until the clone's identity is applied)."""
    net = template_spec(manifest).net
    return net.mac if net else None


def clone_disks(disks: tuple[DiskSpec, ...], vdir: Path) -> tuple[DiskSpec, ...]:
    """A clone's disks: a fresh qcow2 overlay in its directory *vdir* over each
    of the template's overlays; read-only images are shared as they are."""
    return tuple(d if d.readonly and d.backing is None else
                 DiskSpec(path=str(vdir / f"disk{i}.qcow2"), format="qcow2", backing=d.path,
                          backing_format=d.format)
                 for i, d in enumerate(disks))


def move_disks(spec: VMSpec, old_dir: Path, new_dir: Path) -> VMSpec:
    """*spec* with the disks that lived in *old_dir* moved to *new_dir*
    (a pool member's directory renamed to its clone's)."""
    def moved(d: DiskSpec) -> DiskSpec:
        p = Path(d.path)
        return replace(d, path=str(new_dir / p.relative_to(old_dir))) \
            if p.is_relative_to(old_dir) else d
    return spec.with_(disks=tuple(moved(d) for d in spec.disks))


def clone_spec(manifest: dict[str, Any], name: str, vdir: Path) -> VMSpec:
    """The spec of a new clone (its files in *vdir*): template memory mapped
    privately, new VM generation ID, new MAC, own disk overlays."""
    spec = template_spec(manifest)
    net = NetSpec(mac=new_mac(), ports=spec.net.ports) if spec.net else None
    return spec.with_(name=name, vmgenid=str(uuid.uuid4()), net=net,
                      disks=clone_disks(spec.disks, vdir),
                      memory=MemorySpec(backend="file", path=manifest["memory_file"],
                                        share=False, readonly=True))


def hook_failure(name: str, status: int, output: str, limit: int = 300) -> str:
    """One-line message for an on-clone hook that failed in clone *name*."""
    tail = " | ".join(ln.strip() for ln in output.strip().splitlines() if ln.strip())
    if len(tail) > limit:
        tail = "..." + tail[-limit:]
    return f"{name}: the on-clone hook failed with status {status}" + \
        (f": {tail}" if tail else " (no output)")


# -- cloning ------------------------------------------------------------------

def next_clone_names(store: Store, template: str, count: int) -> list[str]:
    names: list[str] = []
    i = 1
    while len(names) < count:
        n = f"{template}-{i}"
        if not store.has_vm(n) and n not in names:
            names.append(n)
        i += 1
    return names


async def clone(store: Store, template: str, names: list[str] | None = None,
                count: int = 1, use_pool: bool = True, set_identity: bool = True,
                timeouts: Timeouts = DEFAULT,
                on_clone: str | None = None) -> list[CloneResult]:
    """Start clones of *template*; return when all of them run (and their
    hook has run). *on_clone* replaces the template's default hook for this
    call ("" runs none). If one clone fails, all of this call are removed."""
    manifest = store.get_template(check_name(template, "template"))
    if count < 1:
        raise InvalidInput(f"invalid clone count {count}: must be at least 1")
    if names is None:
        names = next_clone_names(store, template, count)
    for n in names:
        check_name(n)
        if store.has_vm(n):
            raise AlreadyExists(f"a VM named {n!r} exists already")
    if len(set(names)) != len(names):
        raise InvalidInput("clone names must differ")
    check(manifest)
    hook = manifest.get("on_clone") if on_clone is None else on_clone
    results = await asyncio.gather(
        *(_clone_one(store, manifest, n, use_pool, set_identity, timeouts, hook or None)
          for n in names),
        return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        for r in results:
            if isinstance(r, CloneResult):
                with contextlib.suppress(Exception):
                    await vm.stop(store, r.name, force=True)
        raise errors[0]
    if use_pool and store.pool_target(template) > 0:
        spawn_refill(store, template)
    return [r for r in results if isinstance(r, CloneResult)]


def _take_pool_member(store: Store, template: str) -> PoolMember | None:
    for member in store.pool_members(template):
        if not store.take_pool_member(member.id):
            continue
        if process_alive(member.pid, member.pid_start):
            return member
        _discard_member_files(store, member)
    return None


def _adopt_member_dirs(store: Store, member: PoolMember, name: str) -> None:
    """Rename a pool member's directories to its clone's. Its QEMU keeps
    working: a bound UNIX socket is found by its inode, and open disk images
    by their file descriptors."""
    os.rename(store.run_dir(member.id), store.run_dir(name))
    old = store.vm_dir(member.id)
    if old.exists():
        new = store.vm_dir(name)
        shutil.rmtree(new, ignore_errors=True)  # a leftover: the name is reserved now
        new.parent.mkdir(parents=True, exist_ok=True)
        os.rename(old, new)


async def run_hook(store: Store, rec: VMRecord, hook: str,
                   timeouts: Timeouts = DEFAULT) -> tuple[int, str]:
    """Run an on-clone hook in the guest; return its status and output, or
    raise GuestError (one line, naming the VM) if it fails or times out."""
    try:
        r = await deadline(vm.guest_exec(store, rec, hook, timeouts.exec, timeouts),
                           timeouts.exec + 1.0, f"the on-clone hook of {rec.name}")
    except VmforkTimeout as exc:
        raise GuestError(f"{rec.name}: the on-clone hook did not finish within "
                         f"{timeouts.exec:g} s") from exc
    output = r.stdout + r.stderr
    if r.exit_code != 0:
        raise GuestError(hook_failure(rec.name, r.exit_code, output))
    return r.exit_code, output


async def _clone_one(store: Store, manifest: dict[str, Any], name: str, use_pool: bool,
                     set_identity: bool, timeouts: Timeouts,
                     hook: str | None = None) -> CloneResult:
    t0 = time.monotonic()
    member = _take_pool_member(store, manifest["name"]) if use_pool else None
    if member:
        spec = move_disks(member.spec.with_(name=name), store.vm_dir(member.id),
                          store.vm_dir(name))
    else:
        spec = clone_spec(manifest, name, store.vm_dir(name))
    rec = VMRecord(name=name, spec=spec, state="starting", template=manifest["name"],
                   info=VMInfo(owns_memory=False, guest=manifest.get("guest", "demo")))
    try:
        store.add_vm(rec)
    except AlreadyExists:
        if member:
            await _kill_member(store, member)
        raise
    m: Machine | None = None
    hook_result: tuple[int, str] | None = None
    t_hook: float | None = None
    try:
        if member:
            _adopt_member_dirs(store, member, name)
            m = await Machine.attach(spec, store.run_paths(name), vm.qemu_log(store, name),
                                     member.pid, timeouts=timeouts)
        else:
            await asyncio.to_thread(vm.create_overlays, spec, True)
            m = await vm.launch_recorded(store, rec, incoming=("defer",), timeouts=timeouts)
        rec.pid, rec.pid_start = m.pid, m.start_time
        store.update_vm(rec)
        t_spawn = time.monotonic() - t0
        if not (member and member.warm):  # a warm member has its state already
            await migration.load_state(m, Path(manifest["state_file"]), timeouts.migrate,
                                       x_ignore_shared=True)
        t_loaded = time.monotonic() - t0
        await m.resume()
        t_running = time.monotonic() - t0
        rec.state = "running"
        store.update_vm(rec)
        await m.disconnect()
        # A warm pool member thawed its file systems when it was warmed up.
        frozen = bool(manifest.get("frozen")) and not (member and member.warm)
        if set_identity:
            await identity.make_unique(store, rec, timeouts, old_mac=template_mac(manifest),
                                       thaw_first=frozen)
        elif frozen:
            await identity.thaw(store, rec, timeouts)
        t_resp = time.monotonic() - t0
        if hook:
            hook_result = await run_hook(store, rec, hook, timeouts)
            t_hook = time.monotonic() - t0
    except BaseException:
        if m is not None:
            await m.kill()
        elif member:
            await _kill_member(store, member)
        vm.remove_vm_files(store, rec)
        store.remove_vm(name)
        raise
    log.info("%s: cloned from %s in %.3f s (%s)", name, manifest["name"], t_running,
             "pool" if member else "spawned")
    return CloneResult(name=name, pid=rec.pid, pooled=member is not None,
                       spawn=0.0 if member else t_spawn, state_loaded=t_loaded,
                       running=t_running, responsive=t_resp,
                       hook_status=hook_result[0] if hook_result else None,
                       hook_output=hook_result[1] if hook_result else None,
                       hook_done=t_hook)


# -- warm pool ----------------------------------------------------------------
async def _spawn_member(store: Store, manifest: dict[str, Any],
                        timeouts: Timeouts, warm: bool = False) -> PoolMember:
    mid = f"pool.{manifest['name']}.{secrets.token_hex(3)}"
    spec = clone_spec(manifest, mid, store.vm_dir(mid))
    paths = store.run_paths(mid)
    Path(paths.qmp).parent.mkdir(parents=True, exist_ok=True)
    m: Machine | None = None
    try:
        await asyncio.to_thread(vm.create_overlays, spec, True)
        m = await Machine.launch(spec, paths, store.run_dir(mid) / "qemu.log",
                                 incoming=("defer",), timeouts=timeouts)
        if warm:
            await _warm_up(store, manifest, mid, m, timeouts)
    except BaseException:
        if m is not None:
            await m.kill()
        shutil.rmtree(store.run_dir(mid), ignore_errors=True)
        shutil.rmtree(store.vm_dir(mid), ignore_errors=True)
        raise
    await m.disconnect()
    member = PoolMember(mid, manifest["name"], spec, m.pid, m.start_time, time.time(),
                        warm=warm)
    store.add_pool_member(member)
    return member


async def _warm_up(store: Store, manifest: dict[str, Any], mid: str, m: Machine,
                   timeouts: Timeouts) -> None:
    """Make pool process *m* a warm member: load the template's state, let the
    guest run until its agent has answered one command, pause it again.

    Under TCG a new QEMU process translates the guest's code afresh: the first
    guest command after a clone costs ~0.2-0.3 s more than later ones. A warm
    member has paid that before it is handed out. Its guest has already seen
    its own VM generation ID (each pool process gets a new one) and reseeded,
    and a guest frozen in the template is thawed; hostname, machine-id, MAC
    and clock are set when it becomes a clone."""
    await migration.load_state(m, Path(manifest["state_file"]), timeouts.migrate,
                               x_ignore_shared=True)
    await m.resume()
    rec = VMRecord(name=mid, spec=m.spec, state="running", pid=m.pid,
                   info=VMInfo(guest=manifest.get("guest", "demo")))
    if manifest.get("frozen"):
        # Its disk overlay is its own already; qemu-guest-agent runs no
        # command while the file systems are frozen.
        await identity.thaw(store, rec, timeouts)
    r = await vm.guest_exec(store, rec, "true", timeouts.exec, timeouts)
    if r.exit_code != 0:
        raise GuestError(f"{mid}: the warm-up command failed ({r.exit_code}): "
                         f"{(r.stderr or r.stdout).strip()}")
    await m.pause()


def _discard_member_files(store: Store, member: PoolMember) -> None:
    shutil.rmtree(store.run_dir(member.id), ignore_errors=True)
    shutil.rmtree(store.vm_dir(member.id), ignore_errors=True)


async def _kill_member(store: Store, member: PoolMember) -> None:
    if process_alive(member.pid, member.pid_start):
        m = Machine(member.spec, store.run_paths(member.id),
                    store.run_dir(member.id) / "qemu.log", member.pid)
        await m.kill()
    _discard_member_files(store, member)


async def fill_pool(store: Store, template: str, timeouts: Timeouts = DEFAULT) -> int:
    """Bring the pool of *template* to its target size; return the live count."""
    with store.lock(f"pool.{template}"):
        if not store.has_template(template):
            return 0  # removed meanwhile
        manifest = store.get_template(template)
        target = store.pool_target(template)
        warm = store.pool_warm(template)
        live = []
        for member in store.pool_members(template):
            if process_alive(member.pid, member.pid_start) and member.warm == warm:
                live.append(member)
            elif store.take_pool_member(member.id):
                await _kill_member(store, member)  # dead, or of the other kind
        for member in live[target:]:
            if store.take_pool_member(member.id):
                await _kill_member(store, member)
        live = live[:target]
        if len(live) < target:
            check(manifest)
        while len(live) < target:
            live.append(await _spawn_member(store, manifest, timeouts, warm))
        return len(live)


async def set_pool(store: Store, template: str, size: int,
                   timeouts: Timeouts = DEFAULT, warm: bool | None = None) -> int:
    """Keep *size* QEMU processes waiting for *template*'s state (0 drains).

    *warm* members have the state loaded and the guest run through one agent
    command already (see :func:`_warm_up`); None keeps the pool's kind."""
    if size < 0 or size > 64:
        raise InvalidInput(f"invalid pool size {size}: must be 0-64")
    store.get_template(check_name(template, "template"))
    store.set_pool_target(template, size, warm)
    return await fill_pool(store, template, timeouts)


def spawn_refill(store: Store, template: str) -> None:
    """Refill the pool in a detached process, so ``clone`` returns at once."""
    env = dict(os.environ, VMFORK_HOME=str(store.home), VMFORK_MEMORY_DIR=str(store.memory_dir))
    log_path = store.home / "pool-refill.log"
    with open(log_path, "ab") as logf:
        subprocess.Popen([sys.executable, "-m", "vmfork", "pool", template, "--refill"],
                         stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                         env=env, start_new_session=True)


def pool_status(store: Store, template: str) -> PoolStatus:
    members = store.pool_members(template)
    return PoolStatus(template=template, target=store.pool_target(template),
                      warm=store.pool_warm(template),
                      ready=sum(1 for m in members if process_alive(m.pid, m.pid_start)),
                      members=tuple(PoolMemberStatus(id=m.id, pid=m.pid, warm=m.warm)
                                    for m in members))


# -- listing and removing -----------------------------------------------------
def children_of(store: Store, template: str) -> list[str]:
    """Templates made from clones of *template* (its ``parent``)."""
    return [m["name"] for m in store.list_templates() if m.get("parent") == template]


def users(store: Store, template: str) -> list[str]:
    """VMs created from *template* (clones) that still exist."""
    return [r.name for r in store.list_vms() if r.template == template]


async def remove(store: Store, name: str, force: bool = False,
                 timeouts: Timeouts = DEFAULT) -> None:
    """Delete a template with its files (memory, state, disk overlays);
    refuse while clones or pool members use it (*force* stops them) and,
    even with *force*, while another template was made from one of its clones."""
    manifest = store.get_template(check_name(name, "template"))
    children = children_of(store, name)
    if children:
        raise StateError(f"template {name} has child templates ({', '.join(children)}) "
                         "made from its clones; remove them first")
    clones = users(store, name)
    members = store.pool_members(name)
    if (clones or members) and not force:
        what = []
        if clones:
            what.append(f"clones {', '.join(clones)}")
        if members:
            what.append(f"{len(members)} pool processes")
        raise StateError(f"template {name} is in use by {' and '.join(what)}; "
                         "stop them or use --force")
    for c in clones:
        await vm.stop(store, c, force=True, timeouts=timeouts)
    with store.lock(f"pool.{name}"):  # no refill may spawn while we remove
        store.set_pool_target(name, 0)
        for member in store.pool_members(name):
            if store.take_pool_member(member.id):
                await _kill_member(store, member)
        store.remove_template(name)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(manifest["memory_file"])
    shutil.rmtree(template_dir(store, name), ignore_errors=True)
    log.info("template %s: removed", name)


def get(store: Store, name: str) -> dict[str, Any]:
    return store.get_template(check_name(name, "template"))

