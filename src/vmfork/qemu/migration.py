"""Moving device state in and out of QEMU: capabilities, save, load, wait.

Owns the QMP sequences every feature shares (templates, clones, update,
save/restore): set migration capabilities and parameters, start a migration
to a URI or a file, wait for it with QEMU's MIGRATION events (no polling),
load an incoming state, cancel a running migration, and read what QEMU
reports (bytes, downtime). Saves to a file are atomic: a temporary name,
fsync, rename, then a sha256.

A QMP command that fails here (:class:`QMPCommandError`) is wrapped, with its
cause, into a :class:`MigrationError` at this module's boundary; waits raise
:class:`VmforkTimeout`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from qemu.qmp import EventListener

from vmfork.errors import MigrationError, QMPCommandError, VmforkError, VmforkTimeout
from vmfork.files import fsync_path, sha256_file
from vmfork.private import FILE_MODE
from vmfork.qemu.machine import Machine, deadline
from vmfork.results import MigrationStats

FINAL = ("completed", "failed", "cancelled")
#: ``query-migrate`` statuses of a QEMU with no migration under way.
IDLE = (None, "none", *FINAL)


async def command(m: Machine, cmd: str, args: dict[str, Any] | None = None) -> Any:
    """Run one migration QMP command; QEMU's refusal becomes a MigrationError."""
    try:
        return await m.qmp(cmd, args)
    except QMPCommandError as exc:
        raise MigrationError(str(exc)) from exc


async def set_capabilities(m: Machine, **caps: bool) -> None:
    caps.setdefault("events", True)
    await command(m, "migrate-set-capabilities", {"capabilities": [
        {"capability": k.replace("_", "-"), "state": v} for k, v in caps.items()]})


async def set_parameters(m: Machine, **params: Any) -> None:
    await command(m, "migrate-set-parameters",
                  {k.replace("_", "-"): v for k, v in params.items()})


async def query(m: Machine) -> dict[str, Any]:
    """QEMU's ``query-migrate`` answer (``status`` absent: none ever ran)."""
    info = await command(m, "query-migrate")
    return info if isinstance(info, dict) else {}


async def cancel(m: Machine, timeout: float) -> None:
    """Cancel *m*'s migration if one is under way and wait until it has ended."""
    async def wait_idle() -> None:
        cancelled = False
        while (await query(m)).get("status") not in IDLE:
            if not cancelled:
                await command(m, "migrate_cancel")
                cancelled = True
            await asyncio.sleep(0.01)
    await deadline(wait_idle(), timeout, f"cancelling the migration of {m.name}")


async def _wait_final(listener: EventListener, m: Machine, timeout: float, phase: str) -> str:
    async def wait() -> str:
        while True:
            ev = await listener.get()
            data: Any = ev["data"]
            status = str(data["status"])
            if status in FINAL:
                return status
    try:
        return await deadline(wait(), timeout, phase)
    except VmforkTimeout:
        with contextlib.suppress(VmforkError):
            await command(m, "migrate_cancel")
        raise


async def migrate(m: Machine, args: dict[str, Any], timeout: float,
                  phase: str = "migration",
                  on_started: Callable[[], Awaitable[None]] | None = None) -> MigrationStats:
    """Run ``migrate`` with *args* and wait for it to end; raise on failure.

    *on_started* is awaited once QEMU has accepted the command, while the
    migration runs (live update uses it for its phase hooks).
    """
    t0 = time.monotonic()
    listener = EventListener("MIGRATION")
    with m.events.listen(listener):
        await command(m, "migrate", args)
        if on_started is not None:
            await on_started()
        status = await _wait_final(listener, m, timeout, f"{phase} of {m.name}")
    seconds = time.monotonic() - t0
    info = await query(m)
    if status != "completed":
        raise MigrationError(f"{m.name}: {phase} {status}: "
                             f"{info.get('error-desc', 'no reason given')}")
    ram = info.get("ram", {})
    return MigrationStats(status=status, seconds=seconds,
                          total_time_ms=info.get("total-time"),
                          downtime_ms=info.get("downtime"),
                          ram_bytes=int(ram.get("transferred", 0)),
                          total_bytes=int(ram.get("transferred", 0)) + _device_bytes(info))


def _device_bytes(info: dict[str, Any]) -> int:
    return int(info.get("vfio", {}).get("transferred", 0))


async def start_incoming(m: Machine, uri: str | None = None,
                         channels: list[dict[str, Any]] | None = None) -> None:
    args: dict[str, Any] = {"channels": channels} if channels else {"uri": uri}
    await command(m, "migrate-incoming", args)


async def wait_incoming(m: Machine, timeout: float) -> str:
    """Wait until an incoming migration has been loaded; return the run state."""
    async def poll() -> str:
        while True:
            st = str((await command(m, "query-status"))["status"])
            if st != "inmigrate":
                return st
            await asyncio.sleep(0.002)
    st = await deadline(poll(), timeout, f"incoming state of {m.name}")
    if st not in ("paused", "running", "prelaunch"):
        raise MigrationError(f"{m.name}: loading device state ended in state {st!r}")
    return st


async def load_state(m: Machine, path: Path, timeout: float, **caps: bool) -> str:
    """Load a device-state file into a QEMU started with ``-incoming defer``."""
    await set_capabilities(m, **caps)
    await start_incoming(m, f"file:{path}")
    return await wait_incoming(m, timeout)


def create_private(path: Path) -> None:
    """Create the empty file *path*, 0600, for QEMU to write a migration
    stream into: QEMU keeps the mode of a file it opens, and a QEMU started
    by an earlier vmfork may run with a looser umask."""
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE))


async def save_state(m: Machine, path: Path, timeout: float,
                     parameters: dict[str, Any] | None = None,
                     **caps: bool) -> tuple[MigrationStats, str]:
    """Write the device state of a paused VM to *path* atomically.

    Returns QEMU's statistics and the sha256 of the file. With
    ``x_ignore_shared=True`` RAM in shared files is not written. The file is
    0600 whatever the umask of QEMU (:func:`create_private`).
    """
    tmp = path.with_name(f".{path.name}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    create_private(tmp)
    await set_capabilities(m, **caps)
    if parameters:
        await set_parameters(m, **parameters)
    try:
        stats = await migrate(m, {"uri": f"file:{tmp}"}, timeout, "state save")
        fsync_path(tmp)
        digest = await asyncio.to_thread(sha256_file, tmp)
        os.replace(tmp, path)
        fsync_path(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    return stats, digest
