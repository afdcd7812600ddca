"""Clones of a template: copy-on-write VMs started from its device state.

Owns starting clones (:func:`clone`): each one is a QEMU process that maps the
template's memory file privately (``share=off``, copy-on-write) and loads its
device state, or a pool member taken over (:mod:`vmfork.templates.pool`);
then it is thawed if the template was frozen, given its own identity
(hostname, machine-id, MAC, clock: :mod:`vmfork.guest.identity`; the VM
generation ID is new per QEMU process, so the guest reseeds its RNG), and its
on-clone hook runs. A clone is an ordinary VM record (``template`` set,
memory not owned). Taking a pool member does not refill the pool
(:func:`vmfork.templates.pool.keep` does).

One call starts at most :data:`MAX_CLONES` clones, :data:`MAX_STARTING` of
them at a time by default; each is admitted first
(:func:`vmfork.admission.check_clone`). A clone that fails is undone and the
others run on (:class:`vmfork.errors.PartialClone` reports both), unless the
call asks for all or nothing.
A clone gets each of its template's port forwards on a free host port of its
own (:mod:`vmfork.ports`), reported in its :class:`CloneResult` and status.

Hooks: a shell command (``on_clone``) run in each clone after its identity,
before :func:`clone` returns; a template keeps a default one, a call may
replace it. A clone whose hook fails is removed (with the others of its call
if it asked for all or nothing).

The template's first clone records the template's working set from its start
until it answers, before its hook (:mod:`vmfork.lazy.working_set`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import time
from collections.abc import Callable

from vmfork import admission, checkpoints, ports, vm
from vmfork.errors import (
    AlreadyExists,
    GuestError,
    InvalidInput,
    LaunchError,
    PartialClone,
    VmforkError,
    VmforkTimeout,
)
from vmfork.guest import identity
from vmfork.launch import Launch, NewVM, undo_all_abandoned
from vmfork.lazy import lifecycle, working_set
from vmfork.names import check_name, derived
from vmfork.private import make_dirs
from vmfork.qemu import migration
from vmfork.qemu.machine import deadline
from vmfork.records import PoolMember, TemplateManifest, VMInfo, VMRecord
from vmfork.results import CloneResult
from vmfork.store import Store
from vmfork.tasks import run_to_end
from vmfork.templates import pool
from vmfork.templates.manifest import (
    check,
    clone_spec,
    move_disks,
    template_dir,
    template_mac,
)
from vmfork.timeouts import DEFAULT, Timeouts

log = logging.getLogger("vmfork.template.clone")

#: Most clones one call starts (``clone -n``).
MAX_CLONES = 64
#: Most clones of one call whose QEMU is being started (spawned or taken from
#: the pool, state loaded, resumed) at once; the rest wait their turn. Their
#: identity and hook steps run concurrently.
MAX_STARTING = 4


def check_starting(n: int) -> int:
    """*n* if it is a valid number of clones started at once, else InvalidInput."""
    if not 1 <= n <= MAX_CLONES:
        raise InvalidInput(f"invalid number of clones started at once {n}: must be "
                           f"1-{MAX_CLONES}")
    return n


def check_count(count: int) -> int:
    """*count* if it is a valid number of clones for one call, else InvalidInput."""
    if not 1 <= count <= MAX_CLONES:
        raise InvalidInput(f"invalid clone count {count}: must be 1-{MAX_CLONES} per call")
    return count


def next_clone_names(store: Store, template: str, count: int) -> list[str]:
    """*count* free names ``TEMPLATE-k``, lowest *k* first."""
    names: list[str] = []
    i = 1
    while len(names) < count:
        n = derived(template, f"-{i}")
        if not store.has_vm(n) and n not in names:
            names.append(n)
        i += 1
    return names


async def clone(store: Store, template: str, names: list[str] | None = None,
                count: int = 1, use_pool: bool = True, set_identity: bool = True,
                timeouts: Timeouts = DEFAULT,
                on_clone: str | None = None, *, all_or_nothing: bool = False,
                max_starting: int = MAX_STARTING) -> list[CloneResult]:
    """Start clones of *template*; return when all of them run (and their
    hook has run). *on_clone* replaces the template's default hook for this
    call ("" runs none). With *use_pool* a clone takes a pool member if one
    is ready (the pool is not refilled). At most *max_starting* are being
    started at once. A clone that fails is undone; the others run on, and
    :class:`PartialClone` names them and the failures — or, if every clone
    failed, the first failure is raised. With *all_or_nothing* one failure
    removes every clone of the call. Launches that a killed vmfork abandoned
    are undone first (:func:`vmfork.launch.undo_abandoned`): their names are
    free again."""
    manifest = store.get_template(check_name(template, "template"))
    await undo_all_abandoned(store, timeouts)
    check_count(count if names is None else len(names))
    if names is None:
        names = next_clone_names(store, template, count)
    for n in names:
        store.check_new_name(n)
        if store.has_vm(n):
            raise AlreadyExists(f"a VM named {n!r} exists already")
    if len(set(names)) != len(names):
        raise InvalidInput("clone names must differ")
    check_starting(max_starting)
    # A pulled template's memory server stays mounted until every clone of
    # this call has its memory file open.
    with lifecycle.memory_held(store, template_dir(store, template), manifest,
                               timeouts.stop) as manifest:
        check(manifest, timeouts=timeouts, cache_dir=store.cache_dir)
        hook = manifest.on_clone if on_clone is None else on_clone
        starting = asyncio.Semaphore(max_starting)
        tasks = [asyncio.ensure_future(_clone_one(store, manifest, n, use_pool, set_identity,
                                                  timeouts, hook or None, starting))
                 for n in names]
        try:
            if all_or_nothing:
                return list(await asyncio.gather(*tasks))
            await asyncio.wait(tasks)
            errors = [t.exception() for t in tasks]
            bug = next((e for e in errors if e is not None and not isinstance(e, VmforkError)),
                       None)
            if bug is not None:  # not an error of a clone: undo them all, raise it
                raise bug
        except BaseException:
            # One failed with all or nothing, or the call was cancelled: undo
            # the whole batch, to its end even if this call is cancelled
            # (again) meanwhile.
            await run_to_end(_undo_batch(store, tasks))
            raise
    return _outcome(names, tasks)


def _outcome(names: list[str], tasks: list[asyncio.Task[CloneResult]]
             ) -> list[CloneResult]:
    """The clones of a call that does not ask for all or nothing, each task
    done: their results, or PartialClone (the first error if none runs). Each
    clone that failed has undone its own launch."""
    done: list[CloneResult] = []
    failed: list[tuple[str, VmforkError]] = []
    for name, t in zip(names, tasks, strict=True):
        exc = t.exception()
        if exc is None:
            done.append(t.result())
        else:
            assert isinstance(exc, VmforkError)
            failed.append((name, exc))
    if not failed:
        return done
    for name, exc in failed:
        log.info("%s: not started: %s", name, exc)
    if not done:
        raise failed[0][1]
    raise PartialClone(done, failed, len(names))


async def _undo_batch(store: Store, tasks: list[asyncio.Task[CloneResult]]) -> None:
    """Stop the clones of a failed call: those still starting where they are
    (each undoes its own launch), and wait until every one has; then remove
    those that made it."""
    for t in tasks:
        t.cancel()
    await asyncio.wait(tasks)
    for t in tasks:
        if not t.cancelled() and t.exception() is None:
            with contextlib.suppress(Exception):
                await vm.stop(store, t.result().name, force=True)


def hook_failure(name: str, status: int, output: str, limit: int = 300) -> str:
    """One-line message for an on-clone hook that failed in clone *name*."""
    tail = " | ".join(ln.strip() for ln in output.strip().splitlines() if ln.strip())
    if len(tail) > limit:
        tail = "..." + tail[-limit:]
    return f"{name}: the on-clone hook failed with status {status}" + (
        f": {tail}" if tail else " (no output)")


async def run_hook(store: Store, rec: VMRecord, hook: str,
                   timeouts: Timeouts = DEFAULT) -> tuple[int, str]:
    """Run an on-clone hook in the guest; return its status and output, or
    raise GuestError (one line, naming the VM) if it fails or times out
    (after ``timeouts.exec``; the deadline around the whole call adds the
    time allowed for reaching the agent, ``timeouts.agent``)."""
    try:
        r = await deadline(vm.guest_exec(store, rec, hook, timeouts.exec, timeouts),
                           timeouts.exec + timeouts.agent, f"the on-clone hook of {rec.name}")
    except VmforkTimeout as exc:
        raise GuestError(f"{rec.name}: the on-clone hook did not finish within "
                         f"{timeouts.exec:g} s") from exc
    output = r.stdout + r.stderr
    if r.exit_code != 0:
        raise GuestError(hook_failure(rec.name, r.exit_code, output))
    return r.exit_code, output


def _adopt_member_dirs(store: Store, member: PoolMember, name: str) -> None:
    """Rename a pool member's directories to its clone's. Its QEMU keeps
    working: a bound UNIX socket is found by its inode, and open disk images
    by their file descriptors."""
    os.rename(store.run_dir(member.id), store.run_dir(name))
    old = store.vm_dir(member.id)
    if old.exists():
        new = store.vm_dir(name)
        shutil.rmtree(new, ignore_errors=True)  # a leftover: the name is reserved now
        make_dirs(new.parent)
        os.rename(old, new)


async def _clone_one(store: Store, manifest: TemplateManifest, name: str, use_pool: bool,
                     set_identity: bool, timeouts: Timeouts, hook: str | None,
                     starting: asyncio.Semaphore) -> CloneResult:
    """Start clone *name*; a QEMU that could not bind a forward's host port
    (another process took it) is started again on new ports."""
    attempt = 1
    while True:
        try:
            return await _start_clone(store, manifest, name, use_pool, set_identity, timeouts,
                                      hook, starting)
        except LaunchError as exc:
            if not ports.collided(exc) or attempt >= ports.ATTEMPTS:
                raise
            attempt += 1
            log.info("%s: a forwarded host port was taken; starting on new ports", name)


async def _start_clone(store: Store, manifest: TemplateManifest, name: str, use_pool: bool,
                       set_identity: bool, timeouts: Timeouts, hook: str | None,
                       starting: asyncio.Semaphore) -> CloneResult:
    """Start clone *name*, holding one of the *starting* slots from before its
    QEMU is spawned (or taken from the pool) until its guest runs; identity
    and hook run after the slot is given back. Timings count from when it
    got the slot."""
    await starting.acquire()
    held = True

    def give_back() -> None:
        nonlocal held
        if held:
            held = False
            starting.release()

    try:
        return await _started_clone(store, manifest, name, use_pool, set_identity, timeouts,
                                    hook, give_back)
    finally:
        give_back()


async def _started_clone(store: Store, manifest: TemplateManifest, name: str, use_pool: bool,
                         set_identity: bool, timeouts: Timeouts, hook: str | None,
                         running: Callable[[], None]) -> CloneResult:
    t0 = time.monotonic()
    member = pool.take_member(store, manifest.name) if use_pool else None
    if member:
        spec = move_disks(member.spec.with_(name=name), store.vm_dir(member.id),
                          store.vm_dir(name))
    else:
        admission.check_clone(name, manifest.name, manifest.spec.memory_mib)
        spec = clone_spec(manifest, name, store.vm_dir(name), store.kernel_stubs_dir)
    rec = VMRecord(name=name, spec=spec, state="starting", template=manifest.name,
                   info=VMInfo(owns_memory=False, guest=manifest.guest, agent=manifest.agent,
                               idle_pause=store.template_idle_pause(manifest.name)))
    adopt = (member.pid, member.pid_start) if member else None
    hook_result: tuple[int, str] | None = None
    t_hook: float | None = None
    made: dict[str, str] = {}
    recorder: working_set.Recorder | None = None
    try:
        async with Launch(store, NewVM(store, rec), spec, timeouts=timeouts,
                          adopt=adopt) as launch:
            if member:
                _adopt_member_dirs(store, member, name)
                m = await launch.attach()
            else:
                m = await launch.spawn(incoming=("defer",), fresh_overlays=True)
            t_spawn = time.monotonic() - t0
            recorder = working_set.Recorder.start_for(template_dir(store, manifest.name),
                                                      manifest, m.pid, name)
            await checkpoints.checkpoint("clone.spawned")
            if not (member and member.warm):  # a warm member has its state already
                await migration.load_state(m, manifest.state_path, timeouts.migrate,
                                           x_ignore_shared=manifest.ignore_shared)
            t_loaded = time.monotonic() - t0
            await m.resume()
            t_running = time.monotonic() - t0
            running()
            rec.state = "running"
            store.update_vm(rec)
            await m.disconnect()
            # A warm pool member thawed its file systems when it was warmed up.
            frozen = manifest.frozen and not (member and member.warm)
            if set_identity:
                _, made = await identity.make_unique(store, rec, timeouts,
                                                     old_mac=template_mac(manifest),
                                                     thaw_first=frozen)
                if identity.skipped(made):
                    log.warning("%s: %s", name, identity.skipped(made))
            elif frozen:
                await identity.thaw(store, rec, timeouts)
            t_resp = time.monotonic() - t0
            if recorder is not None:
                await asyncio.to_thread(recorder.finish)
                recorder = None
            await checkpoints.checkpoint("clone.identity")
            if hook:
                hook_result = await run_hook(store, rec, hook, timeouts)
                t_hook = time.monotonic() - t0
    except BaseException:
        if member:  # its files, if they were not moved to the clone's
            pool.discard_member_files(store, member)
        raise
    finally:
        if recorder is not None:
            recorder.cancel()
    log.info("%s: cloned from %s in %.3f s (%s)", name, manifest.name, t_running,
             "pool" if member else "spawned")
    return CloneResult(name=name, pid=m.pid, pooled=member is not None,
                       spawn=0.0 if member else t_spawn, state_loaded=t_loaded,
                       running=t_running, responsive=t_resp,
                       hook_status=hook_result[0] if hook_result else None,
                       hook_output=hook_result[1] if hook_result else None,
                       hook_done=t_hook, ports=spec.net.ports if spec.net else (),
                       identity=made)
