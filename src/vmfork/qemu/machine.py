"""One QEMU process: launch, QMP, readiness, pause/resume, stop, cleanup.

Owns the lifecycle of a single process, in small steps after QEMU's own
``QEMUMachine``: build argv and paths → spawn (stdin closed, output to a log,
own session so it outlives the caller, umask 077 so that everything it
creates is private: :mod:`vmfork.private`) → QMP handshake over an inherited
socketpair (no polling for a socket path) → readiness → shutdown (``quit``,
then SIGTERM, then SIGKILL, each with a deadline) → remove sockets. A failed
launch kills the process and raises :class:`LaunchError` with exit status,
argv and log tail. Every await that crosses the process boundary has a
deadline (:mod:`vmfork.timeouts`).

It is also the QMP boundary: :func:`qmp_execute` is the one place where
qemu.qmp's exceptions become vmfork's (:class:`QMPCommandError`).

It knows nothing of the catalog: callers (:mod:`vmfork.vm`) record what it
returns.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import psutil
from qemu.qmp import QMPClient
from qemu.qmp.error import QMPError
from qemu.qmp.qmp_client import ExecuteError

from vmfork.errors import LaunchError, QMPCommandError, StateError, VmforkError, VmforkTimeout
from vmfork.private import UMASK, make_dirs, opener
from vmfork.proc import blocked_in_kernel, process_alive, process_start_time
from vmfork.qemu import console_log
from vmfork.spec import CONSOLE_RING, CONSOLE_RING_ID, RunPaths, VMSpec, build_argv
from vmfork.tasks import run_to_end
from vmfork.timeouts import DEFAULT, Timeouts

T = TypeVar("T")
log = logging.getLogger("vmfork.machine")

READY_MARKER = b"VMFORK-READY"
#: How much of a log's end :func:`log_tail` reads.
TAIL_BYTES = 16384
#: During the readiness wait, the console's ring buffer is drained into
#: console.log at most this often (seconds), and once more at the end.
DRAIN_EVERY = 0.2


def log_tail(path: str | Path, lines: int = 20) -> str:
    """The last *lines* of a log file (continued from the file it rotated
    to, :func:`console_log.rotated`, if it has just been rotated), or '' if
    it cannot be read."""
    data = b""
    for p in (path, console_log.rotated(path)):
        try:
            with open(p, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - (TAIL_BYTES - len(data))))
                data = f.read() + data
        except FileNotFoundError:
            pass
        except OSError:
            break
        if len(data) >= TAIL_BYTES or data.count(b"\n") > lines:
            break
    return "\n".join(data.decode(errors="replace").splitlines()[-lines:])



def find_qemu(qmp_path: str) -> int | None:
    """The pid of the QEMU whose command line names *qmp_path* (its monitor):
    finds a QEMU whose pid was never recorded (a killed vmfork started it)."""
    for p in psutil.process_iter(["cmdline", "status"]):
        try:
            if p.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if any(qmp_path in a for a in (p.info["cmdline"] or []) if "unix:" in a):
                return int(p.pid)
        except psutil.Error:
            continue
    return None



async def deadline(aw: Awaitable[T], seconds: float, phase: str, detail: str = "") -> T:
    """Await *aw* for at most *seconds*; raise VmforkTimeout naming *phase*.

    Built on ``asyncio.timeout``, not ``asyncio.wait_for``: under Python
    3.11 a ``wait_for`` nested in another one swallows the outer
    cancellation when its own result arrives at that moment, so a polling
    loop under an outer deadline can run on past it. ``asyncio.timeout``
    counts cancellations and nests correctly."""
    try:
        async with asyncio.timeout(seconds):
            return await aw
    except TimeoutError as exc:
        raise VmforkTimeout(phase, seconds, detail) from exc


#: What a QEMU killed by SIGBUS most likely ran into.
SIGBUS_HINT = ("SIGBUS: its guest memory could not be allocated; is the memory directory "
               "full?")


def exit_text(code: int) -> str:
    """How a QEMU process ended, from its exit status (negative: a signal)."""
    if code >= 0:
        return f"exit status {code}"
    if code == -signal.SIGBUS:
        return f"killed by {SIGBUS_HINT}"
    return f"killed by signal {-code}"


async def qmp_execute(client: QMPClient, who: str, cmd: str, args: dict[str, Any] | None,
                      timeout: float) -> Any:
    """Run one QMP command on *client* within *timeout* seconds.

    The one place where qemu.qmp's exceptions become vmfork's: QEMU's error
    answer, a broken connection, or arguments that are not JSON raise
    :class:`QMPCommandError`; the deadline raises :class:`VmforkTimeout`.
    Callers that know what the failure means (a migration failed) wrap
    :class:`QMPCommandError` in their own class."""
    try:
        return await deadline(client.execute(cmd, args), timeout, f"QMP {cmd} on {who}")
    except ExecuteError as exc:
        err = exc.error.error
        raise QMPCommandError(who, cmd, err.class_, err.desc) from exc
    except (QMPError, EOFError, OSError) as exc:
        why = str(exc) or type(exc).__name__
        raise QMPCommandError(who, cmd, None, f"no answer ({why})") from exc
    except (TypeError, ValueError) as exc:
        raise QMPCommandError(who, cmd, None, f"arguments not sent ({exc})") from exc


def remove_sockets(paths: RunPaths) -> None:
    for p in (paths.qmp, paths.console, paths.agent, paths.qga):
        if not p:
            continue
        with contextlib.suppress(FileNotFoundError):
            os.unlink(p)


class Machine:
    """A running (or just-spawned) QEMU process and its QMP connection.

    Create with :meth:`launch` (spawn a new process) or :meth:`attach`
    (connect to one started by an earlier vmfork command).
    """

    def __init__(self, spec: VMSpec, paths: RunPaths, log_path: Path, pid: int,
                 argv: list[str] | None = None, proc: subprocess.Popen[bytes] | None = None,
                 timeouts: Timeouts = DEFAULT) -> None:
        self.spec = spec
        self.paths = paths
        self.log_path = log_path
        self.pid = pid
        self.argv = argv or []
        self.timeouts = timeouts
        self._proc = proc
        self._qmp_sock: socket.socket | None = None
        self._qmp = QMPClient(spec.name)
        self._qmp.logger = logging.getLogger(f"vmfork.qmp.{spec.name}")
        self.launched_at = time.monotonic()
        self.start_time = process_start_time(pid)

    @property
    def name(self) -> str:
        return self.spec.name

    # -- launch / attach --------------------------------------------------
    @classmethod
    async def launch(cls, spec: VMSpec, paths: RunPaths, log_path: Path,
                     incoming: tuple[str, ...] = (), timeouts: Timeouts = DEFAULT,
                     start_paused: bool = True, pass_fds: tuple[int, ...] = (),
                     connect_qmp: bool = True,
                     on_spawn: Callable[[int, float | None], None] | None = None) -> Machine:
        """Spawn QEMU for *spec*; return once its QMP monitor answers.

        With *start_paused* the guest waits for :meth:`resume`. Without
        *connect_qmp* (cpr-transfer destinations, whose monitor answers only
        later) call :meth:`connect` yourself. *on_spawn* is called with the
        pid and start time as soon as the process exists, before the QMP
        handshake (to record it); if it raises, QEMU is killed.
        """
        make_dirs(Path(paths.qmp).parent)
        remove_sockets(paths)
        ours, theirs = socket.socketpair()
        argv = build_argv(spec, paths, incoming=incoming, start_paused=start_paused)
        argv += ["-chardev", f"socket,id=qmp_fd,fd={theirs.fileno()}",
                 "-mon", "chardev=qmp_fd,mode=control"]
        log.debug("%s: launching %s", spec.name, " ".join(argv))
        try:
            with open(log_path, "ab", opener=opener) as logf:
                proc = subprocess.Popen(
                    argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                    pass_fds=(theirs.fileno(), *pass_fds), start_new_session=True,
                    umask=UMASK)
        except OSError as exc:
            ours.close()
            theirs.close()
            raise LaunchError(f"cannot start {spec.qemu}: {exc.strerror}", argv=argv) from exc
        finally:
            theirs.close()
        m = cls(spec, paths, log_path, proc.pid, argv=argv, proc=proc, timeouts=timeouts)
        m._qmp_sock = ours
        try:
            if on_spawn is not None:
                on_spawn(m.pid, m.start_time)
            if connect_qmp:
                await m.connect()
        except BaseException:
            await run_to_end(m.kill())
            raise
        return m

    async def connect(self) -> None:
        """Connect QMP: to the inherited socketpair after launch, else to the path."""
        sock = self._qmp_sock
        target: str | socket.socket = sock if sock is not None else self.paths.qmp
        try:
            await deadline(self._qmp.connect(target),
                           self.timeouts.start if sock is not None else self.timeouts.qmp,
                           f"QMP of {self.name}")
        except (VmforkTimeout, QMPError, OSError) as exc:
            if self._proc is None:
                raise StateError(f"{self.name}: cannot reach its QEMU monitor ({exc})") from exc
            await asyncio.sleep(0.05)  # let a dying QEMU finish so its status is known
            self._raise_if_exited("QEMU exited during start")
            if isinstance(exc, VmforkTimeout):
                raise
            raise LaunchError(f"cannot talk QMP to {self.name}: {exc}",
                              argv=self.argv, log_tail=log_tail(self.log_path)) from exc

    @classmethod
    async def attach(cls, spec: VMSpec, paths: RunPaths, log_path: Path, pid: int,
                     timeouts: Timeouts = DEFAULT) -> Machine:
        """Connect to the QMP socket of a QEMU started earlier."""
        m = cls(spec, paths, log_path, pid, timeouts=timeouts)
        await m.connect()
        return m

    def exitcode(self) -> int | None:
        """QEMU's exit status if it has exited (only known for our children)."""
        if self._proc is not None:
            return self._proc.poll()
        return None if process_alive(self.pid) else -1

    def alive(self) -> bool:
        if self._proc is not None:
            return self._proc.poll() is None
        return process_alive(self.pid, self.start_time)

    def check_running(self) -> None:
        """Raise LaunchError if QEMU has exited (while a guest was awaited)."""
        self._raise_if_exited(self._exited_before_ready())

    def _exited_before_ready(self) -> str:
        msg = f"{self.name}: QEMU exited before the guest was ready"
        if self.exitcode() == -signal.SIGBUS:
            msg += f" ({SIGBUS_HINT})"
        return msg

    def _raise_if_exited(self, message: str) -> None:
        code = self.exitcode()
        if code is not None:
            raise LaunchError(message, exitcode=code, argv=self.argv,
                              log_tail=log_tail(self.log_path))

    # -- QMP --------------------------------------------------------------
    async def qmp(self, cmd: str, args: dict[str, Any] | None = None,
                  timeout: float | None = None) -> Any:
        """Run one QMP command within *timeout* (default ``timeouts.qmp``);
        see :func:`qmp_execute` for what it raises; when the connection broke
        because our QEMU ended, the error says how it ended."""
        try:
            return await qmp_execute(self._qmp, self.name, cmd, args,
                                     timeout or self.timeouts.qmp)
        except QMPCommandError as exc:
            if exc.error_class is not None or self._proc is None:
                raise
            await asyncio.sleep(0.05)  # let a dying QEMU finish so its status is known
            code = self.exitcode()
            if code is None:
                raise
            raise QMPCommandError(self.name, cmd, None,
                                  f"{exc.desc}; QEMU ended, {exit_text(code)}") from exc

    @property
    def events(self) -> Any:
        """The qemu.qmp client, for event listeners."""
        return self._qmp

    async def status(self) -> str:
        result = await self.qmp("query-status")
        return str(result["status"])

    async def pause(self) -> None:
        await self.qmp("stop")
        log.info("%s: running -> paused", self.name)

    async def resume(self) -> None:
        await self.qmp("cont")
        log.info("%s: paused -> running", self.name)

    async def wait_status(self, wanted: set[str], timeout: float, phase: str,
                          interval: float = 0.005) -> str:
        """Poll query-status until it is one of *wanted*."""
        async def poll() -> str:
            while True:
                st = await self.status()
                if st in wanted:
                    return st
                await asyncio.sleep(interval)
        return await deadline(poll(), timeout, phase)

    # -- console ------------------------------------------------------------
    async def drain_console(self) -> None:
        """Move what the console's ring buffer holds into console.log
        (:mod:`vmfork.qemu.console_log`). Best effort: a QEMU that does not
        answer, or one started without the ring buffer, leaves the file as it is."""
        if not self.alive():
            return
        try:
            data = await self.qmp("ringbuf-read", {"device": CONSOLE_RING_ID,
                                                   "size": CONSOLE_RING, "format": "base64"})
            console_log.append(self.paths.console_log, base64.b64decode(str(data)))
        except (VmforkError, OSError, binascii.Error) as exc:
            log.debug("%s: console not drained: %s", self.name, exc)

    async def wait_console(self, marker: bytes = READY_MARKER,
                           timeout: float | None = None,
                           pattern: re.Pattern[bytes] | None = None) -> float:
        """Read the serial console until *marker* appears (or *pattern*
        matches the last 64 KiB read); return seconds waited.

        Drains the console's ring buffer into console.log as it goes
        (:meth:`drain_console`); if QEMU dies meanwhile, what the socket got
        after the last drain goes to console.log instead (the ring died with
        QEMU). Connect before the guest runs (QEMU started paused) so nothing
        is lost.
        """
        t0 = time.monotonic()
        t = timeout or self.timeouts.boot
        reader, writer = await deadline(asyncio.open_unix_connection(self.paths.console),
                                        self.timeouts.qmp, f"console of {self.name}")
        try:
            async def scan() -> None:
                buf = b""
                seen = drained = 0  # bytes read from the socket, at the last drain
                last_drain = time.monotonic()
                while not (pattern.search(buf) if pattern else marker in buf):
                    try:
                        chunk = await reader.read(4096)
                    except ConnectionResetError:
                        chunk = b""
                    if not chunk:
                        await asyncio.sleep(0.05)  # let a dying QEMU finish: its status
                        if not self.alive():
                            with contextlib.suppress(OSError, StateError):
                                console_log.append(self.paths.console_log,
                                                   buf[len(buf) - min(seen - drained, len(buf)):])
                        msg = self._exited_before_ready()
                        self._raise_if_exited(msg)
                        await self.drain_console()
                        raise LaunchError(msg, argv=self.argv,
                                          log_tail=log_tail(self.paths.console_log))
                    seen += len(chunk)
                    buf = (buf + chunk)[-65536:]
                    if time.monotonic() - last_drain >= DRAIN_EVERY:
                        await self.drain_console()
                        drained, last_drain = seen, time.monotonic()
            try:
                await deadline(scan(), t, f"{self.name} to boot")
            except VmforkTimeout as exc:
                await self.drain_console()
                raise VmforkTimeout(exc.phase, exc.seconds, "console: " + " | ".join(
                    log_tail(self.paths.console_log, 3).splitlines())) from exc
            await self.drain_console()
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
        return time.monotonic() - t0

    # -- shutdown -------------------------------------------------------------
    async def disconnect(self) -> None:
        """Drop the QMP connection; QEMU keeps running. A cancellation waits
        until the connection is closed (within ``timeouts.qmp``): qemu.qmp
        left half-way leaves tasks whose errors nobody retrieves."""
        try:
            with contextlib.suppress(Exception):
                await run_to_end(deadline(self._qmp.disconnect(), self.timeouts.qmp,
                                          "QMP disconnect"))
        finally:
            if self._qmp_sock is not None:
                self._qmp_sock.close()
                self._qmp_sock = None

    async def _wait_exit(self, timeout: float) -> bool:
        if self._proc is not None:
            proc = self._proc
            try:
                await asyncio.to_thread(proc.wait, timeout)
                return True
            except subprocess.TimeoutExpired:
                return False
        t_end = time.monotonic() + timeout
        while time.monotonic() < t_end:
            if not process_alive(self.pid, self.start_time):
                self._reap()
                return True
            await asyncio.sleep(0.02)
        return not process_alive(self.pid, self.start_time)

    def _reap(self) -> None:
        """Collect the exit status if QEMU was a child of this process (spawned
        through another Machine object), so that it leaves no zombie."""
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, os.WNOHANG)

    def _signal(self, sig: int) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    async def shutdown(self, force: bool = False) -> None:
        """End QEMU: ``quit``, then SIGTERM, then SIGKILL, each with a deadline.

        Idempotent; sockets are removed afterwards.
        """
        try:
            if not force and self.alive():
                await self.drain_console()
                with contextlib.suppress(VmforkError):  # QEMU may hang up before answering
                    await self.qmp("quit", timeout=self.timeouts.stop)
                if await self._wait_exit(self.timeouts.stop):
                    return
            # Killed, QEMU can only end; it ends late if a thread is blocked
            # in the kernel (a page fault on a lazily served memory file).
            for sig, seconds in ((signal.SIGTERM, self.timeouts.stop),
                                 (signal.SIGKILL, self.timeouts.killed_exit)):
                self._signal(sig)
                if await self._wait_exit(seconds):
                    return
            blocked = " (blocked in the kernel)" if blocked_in_kernel(self.pid) else ""
            raise StateError(f"{self.name}: QEMU (pid {self.pid}) did not exit{blocked}")
        finally:
            await self.disconnect()
            remove_sockets(self.paths)
            log.info("%s: stopped", self.name)

    async def kill(self) -> None:
        """SIGKILL and reap; for failure paths."""
        await self.shutdown(force=True)
