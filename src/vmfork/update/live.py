"""``update()``: move a running VM's guest into a new QEMU process, maybe
another binary, keeping the VM's name, console, agent and data.

Owns the order of one live update, under the VM's lock: settle an earlier
interrupted update (:mod:`.recovery`) → check that the memory file at the
VM's path is the one its QEMU uses (:func:`vmfork.private.check_open_by`)
→ learn what both binaries support
(:mod:`vmfork.qemu.features`) and choose the mode (:mod:`.modes`) → record
the intent → move (:mod:`.move`; rolled back on any failure) → commit
(:mod:`.commit`) → report what it did and cost, with the host memory peak
(:mod:`.memory`).
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Any

from vmfork import vm
from vmfork.errors import InvalidInput, LaunchError, StateError, VmforkError
from vmfork.launch import attach, qemu_log
from vmfork.names import check_name
from vmfork.private import check_open_by
from vmfork.qemu import features, migration
from vmfork.qemu.features import QemuFeatures
from vmfork.qemu.machine import Machine, deadline
from vmfork.records import UpdateIntent, VMRecord
from vmfork.results import UpdateReport
from vmfork.spec import MemorySpec, NetSpec
from vmfork.store import Store
from vmfork.timeouts import DEFAULT, Timeouts
from vmfork.update import recovery
from vmfork.update.commit import commit
from vmfork.update.memory import MemorySampler, check_copy_headroom, memory_files
from vmfork.update.modes import check_mode, choose_mode, memory_kind
from vmfork.update.move import Move, PhaseHook, call_hook, roll_back

log = logging.getLogger("vmfork.update")


async def update(store: Store, name: str, qemu: str | None = None, mode: str = "auto",
                 timeouts: Timeouts = DEFAULT, on_phase: PhaseHook | None = None,
                 max_bandwidth: int | None = None) -> UpdateReport:
    """Move VM *name*'s guest into a new QEMU (binary *qemu*, default the VM's own).

    *mode* is one of :data:`vmfork.update.modes.MODES`. The move (migration,
    state load, resume) must finish within ``timeouts.migrate``.
    *max_bandwidth* (bytes/s) throttles a copy (default unthrottled).
    *on_phase(phase, new_pid)* is called at each of
    :data:`vmfork.update.move.PHASES`; if it raises before ``resumed``, the
    update rolls back like any failure.

    An interrupted earlier update of the VM is settled first. On failure the
    old QEMU keeps (or resumes) the guest, the new one is removed, and the
    error names the cause.
    """
    check_mode(mode)
    check_name(name)
    t0 = time.monotonic()
    async with store.lock_async(name):
        await recovery.settle_held(store, store.get_vm(name), timeouts)
        rec = vm.get_live(store, name)
        if rec.pid is None:
            raise StateError(f"{name} has no QEMU process")
        # The guest runs on in the new QEMU, or again in the old one after a
        # rollback: an interrupted save no longer describes it.
        vm.invalidate_save(store, name)
        binary = features.resolve_binary(qemu or rec.spec.qemu)
        qemu_str = binary if qemu else rec.spec.qemu
        old = await attach(store, rec, timeouts)
        try:
            return await _update(store, rec, old, binary, qemu_str, mode, timeouts,
                                 on_phase, max_bandwidth, t0)
        finally:
            await old.disconnect()


async def _features(store: Store, old: Machine, binary: str,
                    timeouts: Timeouts) -> tuple[QemuFeatures, QemuFeatures]:
    """What the running QEMU and the new binary support."""
    cache = features.FeatureCache(store.cache_dir)
    old_feats = await features.of_running(old, cache)
    try:
        new_feats = await features.of_binary(binary, cache, qemu_log(store, old.name),
                                             timeouts)
    except LaunchError as exc:
        raise LaunchError(f"{old.name}: the new QEMU did not start", exitcode=exc.exitcode,
                          argv=exc.argv, log_tail=exc.log_tail) from exc
    return old_feats, new_feats


def _new_memory(store: Store, rec: VMRecord, mode: str) -> MemorySpec:
    """The new QEMU's memory: the same, or for a copy a fresh one of its own."""
    mem = rec.spec.memory
    if mode != "copy":
        return mem
    if mem.backend == "memfd":
        return MemorySpec(backend="memfd")
    if memory_kind(mem) == "shared-file" and mem.path:
        mdir = Path(mem.path).parent
    else:
        mdir = store.memory_dir
    return MemorySpec(backend="file", path=str(vm.memory_file_path(mdir, rec.name)),
                      share=True)


async def _update(store: Store, rec: VMRecord, old: Machine, binary: str, qemu_str: str,
                  requested: str, timeouts: Timeouts, hook: PhaseHook | None,
                  bandwidth: int | None, t0: float) -> UpdateReport:
    name = rec.name
    status = await old.status()
    if status not in ("running", "paused"):
        raise StateError(f"{name} is {status}; an update needs a running or paused guest")
    mem = rec.spec.memory
    if mem.backend == "file" and mem.path:
        # The new QEMU opens the memory file by its path: it must be the
        # file the old one holds the guest's RAM in, not one put in its place.
        check_open_by(old.pid, mem.path, name)
    old_feats, new_feats = await _features(store, old, binary, timeouts)
    chosen, reason = choose_mode(requested, rec.spec, old_feats, new_feats)
    machine = await features.running_machine(old)
    if machine not in new_feats.machines:
        raise InvalidInput(f"{name}: the new QEMU ({new_feats.version}) lacks machine type "
                           f"{machine!r} that the guest runs on")
    new_memory = _new_memory(store, rec, chosen)
    if chosen == "copy":
        check_copy_headroom(rec.spec, old.pid, new_memory)
    new_spec = rec.spec.with_(qemu=qemu_str, machine=machine, memory=new_memory)
    # Host port forwards stay with the old QEMU until the switch-over.
    launch_spec = new_spec.with_(qemu=binary)
    if new_spec.net and new_spec.net.ports:
        launch_spec = launch_spec.with_(net=NetSpec(mac=new_spec.net.mac))
    old_params = await old.qmp("query-migrate-parameters")
    gen = rec.info.gen + 1
    move = Move(store=store, rec=rec, old=old, mode=chosen, new_spec=new_spec,
                launch_spec=launch_spec, gen=gen, timeouts=timeouts, hook=hook,
                bandwidth=bandwidth, was_running=status == "running", old_params=old_params)
    if chosen == "copy" and new_spec.memory.backend == "file":
        move.new_memory_file = new_spec.memory.path
    intent = UpdateIntent(gen, new_spec, chosen, move.was_running, move.new_memory_file)
    prev_state = "running" if move.was_running else "paused"
    rec.state = "updating"
    # Written before the new QEMU exists, so that a vmfork killed from here on
    # leaves enough behind to finish or undo the move (recovery.settle).
    rec.info.update = intent
    store.update_vm(rec)
    files = memory_files(rec.spec) + memory_files(new_spec)
    log.info("%s: updating (%s, pid %d)", name, chosen, old.pid)
    try:
        with MemorySampler((old.pid,), files) as sampler:
            try:
                new = await move.launch()
                sampler.watch((old.pid, new.pid), files)
                move.phase = "moving"
                await call_hook(hook, "launched", new.pid)
                args = await move.prepare(new)
                await deadline(move.switch(new, args), timeouts.migrate,
                               f"live update of {name}")
                sampler.sample()
            except BaseException as exc:
                await roll_back(move, exc)
                raise  # only reached for CancelledError / KeyboardInterrupt
    except BaseException:
        rec.state = prev_state
        rec.info.update = None
        store.update_vm(rec)
        raise
    # The guest runs in the new QEMU. A failure from here on leaves the
    # intent recorded, and the next command commits (recovery.settle).
    info: dict[str, Any] = {}
    with contextlib.suppress(VmforkError):
        info = await migration.query(old)
    try:
        warnings = move.warnings + await commit(store, rec, new, old, intent)
    finally:
        await new.disconnect()
    log.info("%s: now in pid %d (%s)", name, new.pid, chosen)
    await call_hook(hook, "resumed", new.pid)
    return _report(move, new, info, sampler, old_feats, new_feats, reason, qemu_str, t0,
                   warnings)


def _report(move: Move, new: Machine, info: dict[str, Any], sampler: MemorySampler,
            old_feats: QemuFeatures, new_feats: QemuFeatures, reason: str, qemu_str: str,
            t0: float, warnings: list[str]) -> UpdateReport:
    stats = move.stats
    downtime = stats.downtime_ms if stats is not None else None
    ram = info.get("ram", {})
    return UpdateReport(
        name=move.name, mode=move.mode, reason=reason, qemu=qemu_str,
        qemu_version_before=old_feats.version, qemu_version_after=new_feats.version,
        old_pid=move.old.pid, new_pid=new.pid, generation=move.gen,
        pause_qemu_ms=float(downtime) if downtime is not None else None,
        pause_host_ms=move.pause_host_ms(),
        total_seconds=round(time.monotonic() - t0, 4),
        switch_seconds=round(move.switch_seconds, 4),
        ram_bytes_copied=int(ram.get("normal-bytes", 0)),
        bytes_transferred=stats.ram_bytes if stats is not None else 0,
        memory_before_bytes=sampler.first, peak_memory_bytes=sampler.peak,
        memory_file=move.new_spec.memory.path, warnings=tuple(warnings))


__all__ = ["update"]
