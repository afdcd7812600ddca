"""The pool of a template: QEMU processes started in advance for its clones.

Owns the pool members (a process per member, recorded as a
:class:`~vmfork.records.PoolMember`): spawning one (*cold*: waiting for the
template's state; *warm*: state loaded, guest run through one agent command,
paused again), handing one to a clone (:func:`take_member`), killing one;
the pool's target (size and kind) and its status; and keeping the pool at its
target: :func:`fill_pool` tops it up once, :func:`keep` keeps it there until
it is stopped or cancelled.

Taking a member does not refill the pool: whoever runs :func:`keep` (``vmfork
pool T --keep``, or a service) replaces members taken by clones or whose QEMU
died. Members outlive the process that spawned them; they end when the pool
shrinks, changes kind, or its template is removed.

The pool of a template is changed under the lock ``_pool.<template>``
(members are spawned and killed holding it); a clone takes a member without
it, by deleting its catalog row (:meth:`Store.take_pool_member`), so taking
never waits for a refill.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import shutil
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

from vmfork import admission, checkpoints, ports, vm
from vmfork.errors import GuestError, InvalidInput, LaunchError, TemplateError, VmforkError
from vmfork.guest import identity
from vmfork.launch import Launch, NewPoolMember, qemu_log
from vmfork.names import POOL_ID_HEX, check_name, pool_lock, pool_member_name
from vmfork.proc import process_alive
from vmfork.qemu import migration
from vmfork.qemu.machine import Machine
from vmfork.records import TEMPLATE_READY, PoolMember, TemplateManifest, VMInfo, VMRecord
from vmfork.results import PoolMemberStatus, PoolStatus
from vmfork.store import Store
from vmfork.templates.manifest import check, clone_spec
from vmfork.timeouts import DEFAULT, Timeouts

log = logging.getLogger("vmfork.template.pool")
T = TypeVar("T")

#: Largest pool of one template.
MAX_POOL = 64
#: Seconds :func:`keep` waits between two looks at the pool.
KEEP_INTERVAL = 1.0
#: Longest wait of :func:`keep` after refills that failed in a row (the wait
#: doubles from KEEP_INTERVAL with each failure).
KEEP_BACKOFF_MAX = 60.0


# -- members ------------------------------------------------------------------


async def _spawn_member(store: Store, manifest: TemplateManifest, timeouts: Timeouts,
                        warm: bool = False) -> PoolMember:
    """Start one pool process for *manifest* and record it; one that could not
    bind a forward's host port (another process took it) is started again
    on new ports. On any failure, cancellation included, its QEMU is killed
    and its files are removed before the exception propagates: nothing
    half-started stays."""
    attempt = 1
    while True:
        try:
            return await _spawn_member_once(store, manifest, timeouts, warm)
        except LaunchError as exc:
            if not ports.collided(exc) or attempt >= ports.ATTEMPTS:
                raise
            attempt += 1
            log.info("pool %s: a forwarded host port was taken; starting on new ports",
                     manifest.name)


async def _spawn_member_once(store: Store, manifest: TemplateManifest, timeouts: Timeouts,
                             warm: bool) -> PoolMember:
    mid = pool_member_name(manifest.name, secrets.token_hex(POOL_ID_HEX // 2))
    admission.check_clone(mid, manifest.name, manifest.spec.memory_mib)
    spec = clone_spec(manifest, mid, store.vm_dir(mid), store.kernel_stubs_dir)
    member = PoolMember(mid, manifest.name, spec, 0, None, time.time(), warm=warm)
    async with Launch(store, NewPoolMember(store, member), spec, timeouts=timeouts) as launch:
        m = await launch.spawn(incoming=("defer",), fresh_overlays=True)
        await checkpoints.checkpoint("pool.spawned")
        if warm:
            await _warm_up(store, manifest, mid, m, timeouts)
        await m.disconnect()
        store.set_pool_member_ready(mid)
        member.ready = True
    log.info("pool %s: %s ready (pid %d, %s)", manifest.name, mid, member.pid,
             "warm" if warm else "cold")
    return member


async def _warm_up(store: Store, manifest: TemplateManifest, mid: str, m: Machine,
                   timeouts: Timeouts) -> None:
    """Make pool process *m* a warm member: load the template's state, let the
    guest run until its agent has answered one command, pause it again.

    Under TCG a new QEMU process translates the guest's code afresh: the first
    guest command after a clone costs ~0.2-0.3 s more than later ones. A warm
    member has paid that before it is handed out. Its guest has already seen
    its own VM generation ID (each pool process gets a new one) and reseeded,
    and a guest frozen in the template is thawed; hostname, machine-id, MAC
    and clock are set when it becomes a clone."""
    await migration.load_state(m, manifest.state_path, timeouts.migrate,
                               x_ignore_shared=manifest.ignore_shared)
    await m.resume()
    rec = VMRecord(name=mid, spec=m.spec, state="running", pid=m.pid,
                   info=VMInfo(guest=manifest.guest, agent=manifest.agent))
    if manifest.frozen:
        # Its disk overlay is its own already; qemu-guest-agent runs no
        # command while the file systems are frozen.
        await identity.thaw(store, rec, timeouts)
    if manifest.agent != "none":  # a guest with no agent warms up by running alone
        r = await vm.guest_exec(store, rec, "true", timeouts.exec, timeouts)
        if r.exit_code != 0:
            raise GuestError(f"{mid}: the warm-up command failed ({r.exit_code}): "
                             f"{(r.stderr or r.stdout).strip()}")
    await m.pause()


def _discard_files(store: Store, member_id: str) -> None:
    shutil.rmtree(store.run_dir(member_id), ignore_errors=True)
    shutil.rmtree(store.vm_dir(member_id), ignore_errors=True)


def discard_member_files(store: Store, member: PoolMember) -> None:
    """Remove the run and VM directories of a member whose QEMU is gone."""
    _discard_files(store, member.id)


async def kill_member(store: Store, member: PoolMember) -> None:
    """End a member's QEMU (if it still runs) and remove its files; the
    caller has taken it out of the catalog (:meth:`Store.take_pool_member`)."""
    if process_alive(member.pid, member.pid_start):
        m = Machine(member.spec, store.run_paths(member.id), qemu_log(store, member.id),
                    member.pid)
        await m.kill()
    discard_member_files(store, member)


def take_member(store: Store, template: str) -> PoolMember | None:
    """Take a live member of *template*'s pool out of the catalog for a clone
    (the oldest first); None if there is none. Members found dead on the way
    are dropped with their files. Does not refill the pool."""
    for member in store.pool_members(template):
        if not member.ready:
            continue  # still being started
        if not store.take_pool_member(member.id):
            continue  # another process took it first
        if process_alive(member.pid, member.pid_start):
            return member
        discard_member_files(store, member)
    return None


# -- the pool -----------------------------------------------------------------
def check_size(size: int) -> int:
    """*size* if it is a valid pool size, else InvalidInput."""
    if not 0 <= size <= MAX_POOL:
        raise InvalidInput(f"invalid pool size {size}: must be 0-{MAX_POOL}")
    return size


async def fill_pool(store: Store, template: str, timeouts: Timeouts = DEFAULT) -> int:
    """Bring the pool of *template* to its target once: drop members whose
    QEMU died or that are of the other kind (warm/cold), end those over the
    target, spawn the missing ones. Return the live count (0 if the template
    was removed meanwhile, or is being removed)."""
    async with store.lock_async(pool_lock(template)):
        found = store.template_work(template)
        if found is None or found[0] != TEMPLATE_READY:  # removed, or being removed
            return 0
        manifest = store.get_template(template)
        target = store.pool_target(template)
        warm = store.pool_warm(template)
        live = []
        for member in store.pool_members(template):
            alive = process_alive(member.pid, member.pid_start)
            # A member not ready under our lock was left by a filler that died.
            if alive and member.warm == warm and member.ready:
                live.append(member)
            elif store.take_pool_member(member.id):
                if not alive:
                    log.info("pool %s: %s (pid %d) is gone", template, member.id, member.pid)
                await kill_member(store, member)
        for member in live[target:]:
            if store.take_pool_member(member.id):
                await kill_member(store, member)
        live = live[:target]
        if len(live) < target:
            check(manifest, timeouts=timeouts, cache_dir=store.cache_dir)
        while len(live) < target:
            live.append(await _spawn_member(store, manifest, timeouts, warm))
        return len(live)


async def set_pool(store: Store, template: str, size: int,
                   timeouts: Timeouts = DEFAULT, warm: bool | None = None) -> int:
    """Set the pool of *template* to *size* processes (0 drains) and fill it
    once; return the live count.

    *warm* members have the state loaded and the guest run through one agent
    command already (see :func:`_warm_up`); None keeps the pool's kind."""
    check_size(size)
    store.get_template(check_name(template, "template"))
    store.set_pool_target(template, size, warm)
    return await fill_pool(store, template, timeouts)


def pool_status(store: Store, template: str) -> PoolStatus:
    """The target of *template*'s pool and its members as the catalog lists them
    (``ready``: those whose QEMU runs)."""
    members = store.pool_members(template)
    return PoolStatus(template=template, target=store.pool_target(template),
                      warm=store.pool_warm(template),
                      ready=sum(1 for m in members
                                if m.ready and process_alive(m.pid, m.pid_start)),
                      members=tuple(PoolMemberStatus(id=m.id, pid=m.pid, warm=m.warm,
                                                     ready=m.ready) for m in members))


async def _unless_stopped(aw: Coroutine[Any, Any, T], stop: asyncio.Event) -> T | None:
    """Await *aw*, unless *stop* is set first: then cancel it, wait until its
    cleanup has run, and return None. Cancelling the caller cancels *aw* the
    same way (and waits for its cleanup) before the cancellation propagates."""
    task = asyncio.ensure_future(aw)
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
        if not task.done():
            task.cancel()
            await asyncio.wait({task})
    if task.cancelled():
        return None
    return task.result()


async def keep(store: Store, template: str, size: int | None = None,
               warm: bool | None = None, *, interval: float = KEEP_INTERVAL,
               stop: asyncio.Event | None = None,
               timeouts: Timeouts = DEFAULT) -> PoolStatus:
    """Keep the pool of *template* at its target until *stop* is set or the
    task is cancelled; return the pool's status then.

    *size* and *warm*, if given, set the target first (as :func:`set_pool`).
    Every *interval* seconds the pool is filled (:func:`fill_pool`), which
    replaces members taken by clones or whose QEMU died. Stopping or
    cancelling interrupts a refill in progress: the member being spawned is
    killed and removed; the members already in the pool stay for later
    clones. Ends by itself when the template is removed. A refill that fails
    is retried (with a growing wait, up to :data:`KEEP_BACKOFF_MAX` s), except
    a TemplateError (the template no longer matches its files or QEMU),
    which ends the keeper."""
    check_name(template, "template")
    store.get_template(template)
    if size is not None or warm is not None:
        store.set_pool_target(template, store.pool_target(template) if size is None
                              else check_size(size), warm)
    stop = stop if stop is not None else asyncio.Event()
    log.info("pool %s: keeping %d %s member(s)", template, store.pool_target(template),
             "warm" if store.pool_warm(template) else "cold")
    failures = 0
    try:
        while not stop.is_set() and store.has_template(template):
            try:
                filled = await _unless_stopped(fill_pool(store, template, timeouts), stop)
            except TemplateError:
                raise
            except VmforkError as exc:
                failures += 1
                log.warning("pool %s: refill failed (%s); retrying", template, exc)
            else:
                if filled is None:
                    break
                failures = 0
            pause = min(interval * 2 ** failures, max(interval, KEEP_BACKOFF_MAX))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(pause):
                    await stop.wait()
    finally:
        log.info("pool %s: keeper stopped", template)
    return pool_status(store, template)
