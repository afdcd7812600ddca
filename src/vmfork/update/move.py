"""The move of a guest from one QEMU process to a new one, and its rollback.

Owns the steps between "the update is recorded" and "the guest runs in the
new QEMU" (:class:`Move`): launch the new QEMU paused (``-S``) and waiting
for its state, set capabilities and parameters on both sides, migrate, load,
hand the host port forwards over (:mod:`vmfork.update.forwards`), resume.
The guest never runs in the new QEMU before the whole state has
arrived, so until then the old QEMU (which still holds the guest, untouched)
can always take it back.

Every step can fail: the new process does not start, the migration fails or
exceeds ``timeouts.migrate``, the guest does not run afterwards, a phase hook
raises. :func:`roll_back` then kills the new QEMU, removes its sockets and
memory file, lets the old QEMU run the guest as before, and raises an error
naming the cause (and the rollback).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qemu.qmp import EventListener

from vmfork import checkpoints
from vmfork.errors import LaunchError, MigrationError, StateError, VmforkError, VmforkTimeout
from vmfork.launch import qemu_log
from vmfork.private import private_dir
from vmfork.qemu import migration
from vmfork.qemu.machine import Machine, deadline, exit_text, log_tail
from vmfork.qemu.pause import pause_ms, resume_running
from vmfork.records import VMRecord
from vmfork.results import MigrationStats
from vmfork.spec import VMSpec
from vmfork.store import Store
from vmfork.timeouts import Timeouts
from vmfork.update import forwards

log = logging.getLogger("vmfork.update")

#: Local migrations are not throttled (QEMU's default is 128 MiB/s).
UNLIMITED_BANDWIDTH = 1 << 40
#: Phases reported to a :data:`PhaseHook`, in order: ``launched`` (new QEMU
#: spawned), ``migrating`` (migration accepted by the old QEMU, still
#: running), ``migrated`` (state loaded in the new QEMU, guest not yet
#: resumed), ``resumed`` (guest runs in the new QEMU; no rollback after this).
PHASES = ("launched", "migrating", "migrated", "resumed")
#: ``hook(phase, new_pid)``, plain or async; raising before ``resumed`` rolls
#: the update back like any failure.
PhaseHook = Callable[[str, int], Awaitable[None] | None]


async def call_hook(hook: PhaseHook | None, phase: str, pid: int) -> None:
    """Mark the update's *phase* (checkpoint ``update.PHASE``) and call *hook*."""
    await checkpoints.checkpoint(f"update.{phase}")
    if hook is None:
        return
    result = hook(phase, pid)
    if inspect.isawaitable(result):
        await result


def move_sockets(store: Store, name: str, gen: int) -> tuple[Path, Path]:
    """The migration and cpr sockets of the move to generation *gen*."""
    d = store.run_dir(name)
    return d / f"mig.{gen}.sock", d / f"cpr.{gen}.sock"


def remove_move_sockets(store: Store, name: str, gen: int) -> None:
    for p in move_sockets(store, name, gen):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


@dataclass
class Move:
    """One move in progress: what it needs for its steps and its rollback."""

    store: Store
    rec: VMRecord
    old: Machine
    mode: str
    #: The spec recorded for the new QEMU, and the one it is launched with
    #: (without host port forwards, which move at the switch-over).
    new_spec: VMSpec
    launch_spec: VMSpec
    gen: int
    timeouts: Timeouts
    hook: PhaseHook | None
    bandwidth: int | None
    was_running: bool
    #: The old QEMU's migration parameters before the move (restored on rollback).
    old_params: dict[str, Any]
    new: Machine | None = None
    #: A memory file the move creates (a copy into a file): removed on rollback.
    new_memory_file: str | None = None
    stats: MigrationStats | None = None
    #: What the move could not do but did not fail for (a port forward lost).
    warnings: list[str] = field(default_factory=list)
    switch_seconds: float = 0.0
    phase: str = "launching"
    log_offset: int = 0
    stop_listener: EventListener = field(default_factory=lambda: EventListener("STOP"))
    resume_listener: EventListener = field(default_factory=lambda: EventListener("RESUME"))

    @property
    def name(self) -> str:
        return self.rec.name

    @property
    def mig_sock(self) -> Path:
        return move_sockets(self.store, self.name, self.gen)[0]

    @property
    def cpr_sock(self) -> Path:
        return move_sockets(self.store, self.name, self.gen)[1]

    def pause_host_ms(self) -> float | None:
        """Guest stop in the old QEMU to resume in the new one, by QEMU's
        event timestamps (host clock); None if either event is missing."""
        return pause_ms(self.stop_listener, self.resume_listener)

    # -- steps ----------------------------------------------------------------
    async def launch(self) -> Machine:
        """Start the new QEMU, paused, waiting for the incoming state."""
        remove_move_sockets(self.store, self.name, self.gen)
        paths = self.store.run_paths(self.name, self.gen)
        mem = self.launch_spec.memory
        if mem.backend == "file" and mem.path:
            private_dir(Path(mem.path).parent, "memory dir")
        logp = qemu_log(self.store, self.name)
        with contextlib.suppress(OSError):
            self.log_offset = logp.stat().st_size
        if self.mode == "cpr-transfer":
            cpr = {"channel-type": "cpr", "addr": {"transport": "socket", "type": "unix",
                                                   "path": str(self.cpr_sock)}}
            new = await Machine.launch(self.launch_spec, paths, logp,
                                       incoming=(f"unix:{self.mig_sock}", json.dumps(cpr)),
                                       timeouts=self.timeouts, connect_qmp=False)
            self.new = new
            await deadline(self._wait_listening(new, self.cpr_sock), self.timeouts.start,
                           f"the new QEMU of {self.name} to listen for cpr state")
        else:
            self.new = new = await Machine.launch(self.launch_spec, paths, logp,
                                                  incoming=("defer",), timeouts=self.timeouts)
        return new

    async def _wait_listening(self, new: Machine, path: Path) -> None:
        while not path.exists():
            code = new.exitcode()
            if code is not None:
                raise LaunchError(f"{self.name}: the new QEMU exited during start",
                                  exitcode=code, argv=new.argv, log_tail=log_tail(new.log_path))
            await asyncio.sleep(0.002)

    async def prepare(self, new: Machine) -> dict[str, Any]:
        """Set capabilities and parameters on both sides; return migrate's args."""
        old = self.old
        params: dict[str, Any] = {"max_bandwidth": self.bandwidth or UNLIMITED_BANDWIDTH}
        if "mode" in self.old_params:
            params["mode"] = "cpr-transfer" if self.mode == "cpr-transfer" else "normal"
        await migration.set_parameters(old, **params)
        await migration.set_capabilities(old, x_ignore_shared=self.mode == "ignore-shared")
        if self.mode == "cpr-transfer":
            return {"channels": [
                {"channel-type": "main", "addr": {"transport": "socket", "type": "unix",
                                                  "path": str(self.mig_sock)}},
                {"channel-type": "cpr", "addr": {"transport": "socket", "type": "unix",
                                                 "path": str(self.cpr_sock)}}]}
        await migration.set_capabilities(new, x_ignore_shared=self.mode == "ignore-shared")
        await migration.start_incoming(new, f"unix:{self.mig_sock}")
        return {"uri": f"unix:{self.mig_sock}"}

    async def switch(self, new: Machine, args: dict[str, Any]) -> None:
        """Migrate, load the state in the new QEMU and resume the guest there."""
        t0 = time.monotonic()

        async def started() -> None:
            await call_hook(self.hook, "migrating", new.pid)
        with self.old.events.listen(self.stop_listener):
            task = asyncio.ensure_future(migration.migrate(
                self.old, args, self.timeouts.migrate, "live update", on_started=started))
            try:
                if self.mode == "cpr-transfer":
                    await new.connect()  # QEMU greets once it has read the cpr state
                self.stats = await task
            finally:
                if not task.done():
                    task.cancel()
                elif not task.cancelled():
                    task.exception()  # seen; the failure that came first is reported
        await migration.wait_incoming(new, self.timeouts.migrate)
        await call_hook(self.hook, "migrated", new.pid)
        self.warnings += await forwards.hand_over(self.old, new, self.new_spec.net)
        if self.was_running:
            await resume_running(new, self.resume_listener, "the new QEMU")
        self.switch_seconds = time.monotonic() - t0

    # -- rollback ---------------------------------------------------------------
    def new_exit_note(self) -> str:
        new = self.new
        if new is None:
            return ""
        code = new.exitcode()
        if code is None:
            return ""
        return f" (the new QEMU, pid {new.pid}, ended: {exit_text(code)})"

    async def rollback(self) -> None:
        """Kill the new QEMU, remove what it owned, let the old one run the guest."""
        new = self.new
        if new is not None:
            with contextlib.suppress(ProcessLookupError):
                if new.alive():
                    os.kill(new.pid, signal.SIGKILL)
            await new.kill()
        remove_move_sockets(self.store, self.name, self.gen)
        if self.new_memory_file:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.new_memory_file)
        old = self.old
        await migration.cancel(old, self.timeouts.migrate)
        restore = {k.replace("-", "_"): self.old_params[k]
                   for k in ("mode", "max-bandwidth") if k in self.old_params}
        if restore:
            await migration.set_parameters(old, **restore)
        await migration.set_capabilities(old, x_ignore_shared=False)
        for w in await forwards.ensure(old, self.rec.spec.net):
            log.warning("%s: %s", self.name, w)
        status = await old.status()
        if self.was_running and status != "running":
            if status not in ("paused", "postmigrate"):
                raise StateError(f"{self.name}: the old QEMU is in state {status!r}")
            await old.resume()
            status = await old.status()
        wanted = "running" if self.was_running else "paused"
        if status != wanted:
            raise StateError(f"{self.name}: the old QEMU is {status}, not {wanted}")


def log_since(path: Path, offset: int) -> str:
    """What QEMU wrote to the shared qemu.log since *offset* (the new process's part)."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read(16384).decode(errors="replace")
    except OSError:
        return ""


async def roll_back(move: Move, exc: BaseException) -> None:
    """Undo a failed move and raise an error naming the cause (and the
    rollback). Returns only for CancelledError and KeyboardInterrupt, which
    the caller re-raises."""
    name = move.name
    note = move.new_exit_note()
    if isinstance(exc, Exception):
        log.warning("%s: update failed (%s)%s; rolling back", name, exc, note)
    else:
        log.info("%s: update interrupted; rolling back", name)
    try:
        await move.rollback()
    except BaseException as rb_exc:
        if isinstance(rb_exc, asyncio.CancelledError):
            raise
        raise MigrationError(f"{name}: update failed ({exc}){note}, and the old QEMU "
                             f"(pid {move.old.pid}) could not take the guest back: "
                             f"{rb_exc}") from exc
    if not isinstance(exc, Exception):
        return
    where = f"the old QEMU (pid {move.old.pid})"
    done = (f"rolled back, the guest runs on in {where}" if move.was_running
            else f"rolled back, the guest stays in {where}")
    if isinstance(exc, VmforkTimeout):
        raise VmforkTimeout(exc.phase, exc.seconds, f"update {done}{note}") from exc
    if isinstance(exc, LaunchError) and move.phase == "launching":
        tail = log_since(qemu_log(move.store, name), move.log_offset) or exc.log_tail
        raise LaunchError(f"{name}: update {done}: the new QEMU did not start",
                          exitcode=exc.exitcode, argv=exc.argv, log_tail=tail) from exc
    cause: BaseException = exc
    if isinstance(exc, LaunchError):
        cause = MigrationError("the new QEMU ended during the move")
    elif not isinstance(exc, VmforkError):
        cause = MigrationError(f"unexpected {type(exc).__name__}: {exc}")
    raise MigrationError(f"{name}: update ({move.mode}) {done}: {cause}{note}") from exc


__all__ = ["PHASES", "Move", "PhaseHook", "call_hook", "move_sockets", "remove_move_sockets",
           "roll_back"]
