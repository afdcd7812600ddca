"""Templates and copy-on-write clones, with a warm pool.

Owns the template life cycle: freeze a running VM (device state saved with
``x-ignore-shared``, so RAM is not written; the VM's shared memory file
becomes the template's read-only memory file), check a template before use
(QEMU version, machine type, memory file size, state sha256), start clones
that map the memory file privately (``share=off``, copy-on-write) and load the
device state, keep a warm pool of QEMU processes waiting for incoming state,
and remove templates only when nothing uses them.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import identity, migration, vm
from .errors import (
    AlreadyExists,
    InvalidInput,
    StateError,
    TemplateError,
)
from .machine import Machine, process_alive
from .spec import MemorySpec, NetSpec, VMSpec, check_name, new_mac
from .store import PoolMember, Store, VMRecord
from .timeouts import DEFAULT, Timeouts

log = logging.getLogger("vmfork.template")


# -- creating -----------------------------------------------------------------
def template_dir(store: Store, name: str) -> Path:
    return store.templates_dir / check_name(name, "template")


async def create_from_vm(store: Store, name: str, vm_name: str,
                         timeouts: Timeouts = DEFAULT) -> dict[str, Any]:
    """Freeze the running VM *vm_name* into template *name*; the VM ends."""
    check_name(name, "template")
    if store.has_template(name):
        raise AlreadyExists(f"a template named {name!r} exists already")
    rec = vm.get_live(store, vm_name)
    if rec.spec.memory.backend != "file" or not rec.spec.memory.share:
        rec = await _share_memory(store, rec, timeouts)
    tdir = template_dir(store, name)
    tdir.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    try:
        async with vm.attached(store, vm_name, timeouts) as (rec, m):
            was_running = await m.status() == "running"
            ident = await migration.qemu_identity(m)
            await m.pause()
            try:
                stats, digest = await migration.save_state(
                    m, tdir / "state", timeouts.migrate, x_ignore_shared=True)
            except BaseException:
                if was_running:
                    with contextlib.suppress(Exception):
                        await m.resume()
                raise
            await m.shutdown()
    except BaseException:
        shutil.rmtree(tdir, ignore_errors=True)
        raise
    # QEMU has ended: the VM's memory file becomes the template's, read-only.
    src = Path(str(rec.spec.memory.path))
    mem = src.with_name(f"tpl-{name}-{secrets.token_hex(4)}.mem")
    os.rename(src, mem)
    os.chmod(mem, 0o444)
    spec = rec.spec.with_(name=name, machine=ident["machine"],
                          memory=MemorySpec(backend="file", path=str(mem), share=False,
                                            readonly=True))
    manifest = {
        "name": name, "created": time.time(), "source_vm": vm_name,
        "parent": rec.template,
        "memory_file": str(mem), "memory_size": mem.stat().st_size,
        "state_file": str(tdir / "state"), "state_sha256": digest,
        "state_size": (tdir / "state").stat().st_size,
        "qemu_version": ident["qemu_version"], "machine": ident["machine"],
        "qemu": rec.spec.qemu, "spec": json.loads(spec.to_json()),
        "guest": rec.info.get("guest", "demo"),
        "save": {"seconds": round(time.monotonic() - t0, 4), **stats.to_dict()},
    }
    (tdir / "manifest.json").write_text(json.dumps(manifest, indent=2))
    store.add_template(name, manifest)
    shutil.rmtree(store.run_dir(vm_name), ignore_errors=True)
    store.remove_vm(vm_name)
    log.info("template %s: created from %s (state %d bytes)", name, vm_name,
             manifest["state_size"])
    return manifest


async def _share_memory(store: Store, rec: VMRecord, timeouts: Timeouts) -> VMRecord:
    """Give a VM with private memory (a clone) a shared memory file of its own
    by a local copy migration, so it can become a template (chained templates)."""
    try:
        from . import update
    except ImportError as exc:  # pragma: no cover - update ships with vmfork
        raise TemplateError(f"{rec.name}: its memory is private; cannot template it") from exc
    await update.update(store, rec.name, mode="copy", timeouts=timeouts)
    new = store.get_vm(rec.name)
    if new.spec.memory.backend != "file" or not new.spec.memory.share:
        raise TemplateError(f"{rec.name}: could not move its memory to a shared file")
    return new


async def create_demo(store: Store, name: str, memory_mib: int = 512,
                      prepare: str | None = None, accel: str = "auto",
                      timeouts: Timeouts = DEFAULT) -> dict[str, Any]:
    """Boot the demo guest, run *prepare* in it, and freeze it as *name*."""
    check_name(name, "template")
    if store.has_template(name):
        raise AlreadyExists(f"a template named {name!r} exists already")
    build = f"{name}.build"
    await vm.run(store, vm.RunOptions(name=build, memory_mib=memory_mib, demo=True,
                                      accel=accel), timeouts)
    try:
        if prepare:
            r = await vm.exec_(store, build, prepare, timeouts=timeouts)
            if r.status != 0:
                raise TemplateError(f"--prepare failed with status {r.status}: "
                                    f"{r.text.strip()[-200:]}")
        return await create_from_vm(store, name, build, timeouts)
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
    if migration.sha256_file(state) != manifest["state_sha256"]:
        raise TemplateError(f"template {name}: state file {state} is corrupt "
                            "(sha256 differs from the manifest)")
    ver = qemu_binary_version(qemu or manifest["qemu"])
    if ver != manifest["qemu_version"]:
        raise TemplateError(f"template {name} was made with QEMU {manifest['qemu_version']}, "
                            f"this QEMU is {ver}")


def template_spec(manifest: dict[str, Any]) -> VMSpec:
    return VMSpec.from_dict(manifest["spec"])


def clone_spec(manifest: dict[str, Any], name: str) -> VMSpec:
    """The spec of a new clone: template memory mapped privately, new VM
    generation ID, new MAC."""
    spec = template_spec(manifest)
    net = NetSpec(mac=new_mac(), ports=spec.net.ports) if spec.net else None
    return spec.with_(name=name, vmgenid=str(uuid.uuid4()), net=net,
                      memory=MemorySpec(backend="file", path=manifest["memory_file"],
                                        share=False, readonly=True))


# -- cloning ------------------------------------------------------------------
@dataclass
class CloneResult:
    """One clone and how long each step took (seconds from the clone's start)."""

    name: str
    pid: int
    pooled: bool
    spawn: float       # QEMU up, QMP answering (0 for a pooled process)
    state_loaded: float
    running: float
    responsive: float  # the guest agent answered (identity applied)

    def to_dict(self) -> dict[str, Any]:
        return {k: (round(v, 4) if isinstance(v, float) else v)
                for k, v in self.__dict__.items()}


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
                timeouts: Timeouts = DEFAULT) -> list[CloneResult]:
    """Start clones of *template*; return when all of them run."""
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
    results = await asyncio.gather(
        *(_clone_one(store, manifest, n, use_pool, set_identity, timeouts) for n in names),
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


async def _clone_one(store: Store, manifest: dict[str, Any], name: str, use_pool: bool,
                     set_identity: bool, timeouts: Timeouts) -> CloneResult:
    t0 = time.monotonic()
    member = _take_pool_member(store, manifest["name"]) if use_pool else None
    spec = member.spec.with_(name=name) if member else clone_spec(manifest, name)
    rec = VMRecord(name=name, spec=spec, state="starting", template=manifest["name"],
                   info={"owns_memory": False, "guest": manifest.get("guest", "demo")})
    try:
        store.add_vm(rec)
    except AlreadyExists:
        if member:
            await _kill_member(store, member)
        raise
    m: Machine | None = None
    try:
        if member:
            # The pool process's sockets keep working after their directory
            # is renamed: a bound UNIX socket is found by its inode.
            os.rename(store.run_dir(member.id), store.run_dir(name))
            m = await Machine.attach(spec, store.run_paths(name), vm.qemu_log(store, name),
                                     member.pid, timeouts=timeouts)
        else:
            m = await vm.launch_recorded(store, rec, incoming=("defer",), timeouts=timeouts)
        rec.pid, rec.pid_start = m.pid, m.start_time
        store.update_vm(rec)
        t_spawn = time.monotonic() - t0
        await migration.load_state(m, Path(manifest["state_file"]), timeouts.migrate,
                                   x_ignore_shared=True)
        t_loaded = time.monotonic() - t0
        await m.resume()
        t_running = time.monotonic() - t0
        rec.state = "running"
        store.update_vm(rec)
        await m.disconnect()
        if set_identity:
            await identity.make_unique(store, rec, timeouts)
        t_resp = time.monotonic() - t0
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
                       running=t_running, responsive=t_resp)


# -- warm pool ----------------------------------------------------------------
async def _spawn_member(store: Store, manifest: dict[str, Any],
                        timeouts: Timeouts) -> PoolMember:
    mid = f"pool.{manifest['name']}.{secrets.token_hex(3)}"
    spec = clone_spec(manifest, mid)
    paths = store.run_paths(mid)
    Path(paths.qmp).parent.mkdir(parents=True, exist_ok=True)
    try:
        m = await Machine.launch(spec, paths, store.run_dir(mid) / "qemu.log",
                                 incoming=("defer",), timeouts=timeouts)
    except BaseException:
        shutil.rmtree(store.run_dir(mid), ignore_errors=True)
        raise
    await m.disconnect()
    member = PoolMember(mid, manifest["name"], spec, m.pid, m.start_time, time.time())
    store.add_pool_member(member)
    return member


def _discard_member_files(store: Store, member: PoolMember) -> None:
    shutil.rmtree(store.run_dir(member.id), ignore_errors=True)


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
        live = []
        for member in store.pool_members(template):
            if process_alive(member.pid, member.pid_start):
                live.append(member)
            elif store.take_pool_member(member.id):
                _discard_member_files(store, member)
        for member in live[target:]:
            if store.take_pool_member(member.id):
                await _kill_member(store, member)
        live = live[:target]
        if len(live) < target:
            check(manifest)
        while len(live) < target:
            live.append(await _spawn_member(store, manifest, timeouts))
        return len(live)


async def set_pool(store: Store, template: str, size: int,
                   timeouts: Timeouts = DEFAULT) -> int:
    """Keep *size* QEMU processes waiting for *template*'s state (0 drains)."""
    if size < 0 or size > 64:
        raise InvalidInput(f"invalid pool size {size}: must be 0-64")
    store.get_template(check_name(template, "template"))
    store.set_pool_target(template, size)
    return await fill_pool(store, template, timeouts)


def spawn_refill(store: Store, template: str) -> None:
    """Refill the pool in a detached process, so ``clone`` returns at once."""
    env = dict(os.environ, VMFORK_HOME=str(store.home), VMFORK_MEMORY_DIR=str(store.memory_dir))
    log_path = store.home / "pool-refill.log"
    with open(log_path, "ab") as logf:
        subprocess.Popen([sys.executable, "-m", "vmfork", "pool", template, "--refill"],
                         stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                         env=env, start_new_session=True)


def pool_status(store: Store, template: str) -> dict[str, Any]:
    members = store.pool_members(template)
    return {"template": template, "target": store.pool_target(template),
            "ready": sum(1 for m in members if process_alive(m.pid, m.pid_start)),
            "members": [{"id": m.id, "pid": m.pid} for m in members]}


# -- listing and removing -----------------------------------------------------
def users(store: Store, template: str) -> list[str]:
    """VMs created from *template* (clones) that still exist."""
    return [r.name for r in store.list_vms() if r.template == template]


async def remove(store: Store, name: str, force: bool = False,
                 timeouts: Timeouts = DEFAULT) -> None:
    """Delete a template; refuse while clones or pool members use it."""
    manifest = store.get_template(check_name(name, "template"))
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

