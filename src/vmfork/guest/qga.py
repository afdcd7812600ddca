"""Talking to qemu-guest-agent (QGA) over its virtio-serial port.

Owns the QGA session: the ``guest-sync-delimited`` handshake on the raw
socket, then commands through qemu.qmp's :class:`QMPClient` with greeting and
capability negotiation turned off (QGA has neither). The handshake cannot go
through qemu.qmp: its answer starts with a 0xFF byte that is not JSON, and a
session must first skip whatever an earlier client left in the channel.

On top of it: ``guest-exec`` + ``guest-exec-status`` (exit status, stdout and
stderr apart; shell commands run as the serial agent runs them,
:data:`SHELL_WRAPPER`),
``guest-set-time`` and ``guest-fsfreeze-freeze``/``-thaw``. The socket takes
one client at a time, so sessions on one VM are serialised by a file lock
(waited for with a deadline, :mod:`vmfork.locking`).
Every await that crosses the process boundary has a deadline.

What the guest sends is bounded (:mod:`vmfork.guest.limits`): the handshake
reads each byte once and gives up after :data:`MAX_SYNC_NOISE` bytes of
noise or a sync answer over :data:`MAX_SYNC_LINE`; one reply may be at most
:data:`READBUFLEN` bytes (qemu.qmp's read buffer); a ``guest-exec``'s output
at most :data:`~vmfork.guest.limits.MAX_ANSWER` bytes. Past a cap the
session ends with :class:`~vmfork.guest.limits.TooMuchOutput`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import re
import secrets
import socket
import time
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from qemu.qmp import QMPClient
from qemu.qmp.error import QMPError
from qemu.qmp.qmp_client import ExecuteError

from vmfork import locking
from vmfork.errors import GuestError, VmforkTimeout
from vmfork.guest.limits import MAX_ANSWER, MAX_ANSWER_B64, TooMuchOutput
from vmfork.qemu.machine import deadline
from vmfork.results import ExecResult
from vmfork.timeouts import DEFAULT

log = logging.getLogger("vmfork.qga")

#: Resets QGA's JSON parser; also the first byte of a delimited sync answer.
DELIMITER = b"\xff"
#: guest-exec-status polls: the first comes POLL_FIRST s after the command
#: started, each later one waits twice as long as the one before, up to
#: POLL_MAX. A short command is seen done within ms of its end (a fixed 50 ms
#: poll added ~50 ms to every exec); a long one costs a poll every 50 ms.
POLL_FIRST = 0.002
POLL_MAX = 0.05
#: How a shell command runs through QGA, as the serial agent runs it: its
#: stdout and stderr go to two files on tmpfs (/run, which fsfreeze leaves
#: alone) that are printed, apart, to QGA's pipes when the shell ends. QGA
#: alone would wait until every process holding those pipes closed them
#: (``daemon &`` would hold the command until the daemon ends). ``$1`` is the
#: command, ``$2`` the directory (ignored if it does not exist). The
#: wrapper's own messages (``cd``'s, a shell's report of a command killed by
#: a signal) go to /dev/null; fd 3 keeps QGA's stderr pipe for the command's
#: stderr and is closed for everything else. ``true``, not ``:``, creates the
#: files: dash exits on a redirection error of a special built-in. The files
#: are named after the wrapper's pid and removed in the background (an
#: external command costs ~20 ms under TCG).
SHELL_WRAPPER = (
    'exec 3>&2 2>/dev/null; '
    'o=/run/vmfork-exec.$$; true >"$o" || o=/tmp/vmfork-exec.$$; e=$o.err; '
    '{ true >"$o" && true >"$e"; } || '
    '{ echo "vmfork: cannot write $o in the guest" >&3; exit 125; }; '
    '( [ -z "$2" ] || cd "$2"; exec /bin/sh -c "$1" 2>"$e" ) >"$o" 3>&-; s=$?; '
    'cat "$o"; [ ! -s "$e" ] || cat "$e" >&3; '
    'rm -f "$o" "$e" </dev/null >/dev/null 3>&- & exit $s')
#: Longest QGA reply accepted (qemu.qmp's read buffer, which holds at most
#: this plus one chunk): a guest-exec-status carrying MAX_ANSWER bytes of
#: output in base64, and room for the rest of its JSON.
READBUFLEN = MAX_ANSWER_B64 + (64 << 10)
#: Longest sync answer (``{"return": ID}`` after the 0xFF) accepted.
MAX_SYNC_LINE = 4096
#: Most bytes skipped before the sync answer: stale replies an earlier
#: client left (at most one full reply each, in practice one).
MAX_SYNC_NOISE = 2 * READBUFLEN
#: Where the handshake's reader stops to look: a line end or a delimiter.
_SYNC_STOPS = re.compile(rb"[\n\xff]")


class GuestAgent:
    """A session with the qemu-guest-agent of one VM.

    Use as ``async with GuestAgent(sock, lock, name) as qga: ...``; entering
    takes the lock, connects and synchronises, leaving disconnects.
    """

    def __init__(self, socket_path: str, lock_path: Path, name: str = "guest",
                 timeout: float = DEFAULT.agent, lock_timeout: float | None = None) -> None:
        self.socket_path = socket_path
        self.lock_path = lock_path
        self.name = name
        self.timeout = timeout
        #: How long to wait for another session on this VM to end (by default
        #: about as long as that session's command may take).
        self.lock_timeout = DEFAULT.exec + timeout if lock_timeout is None else lock_timeout
        self._lockf: IO[str] | None = None
        self._client: QMPClient | None = None

    # -- session --------------------------------------------------------------
    async def __aenter__(self) -> GuestAgent:
        await self.connect()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    async def connect(self, timeout: float | None = None) -> None:
        """Lock, connect and synchronise (within *timeout* seconds)."""
        t = timeout or self.timeout
        self._lockf = await locking.acquire_async(
            self.lock_path, self.lock_timeout,
            f"{self.name}: the guest agent (QGA) is busy with another session")
        try:
            sock = await deadline(self._sync(), t, f"the guest agent (QGA) of {self.name}")
            client = QMPClient(self.name, readbuflen=READBUFLEN)
            # Under vmfork.qmp: the CLI shows its wire traces and reader failures
            # only with --debug (the failure also becomes the command's error).
            client.logger = logging.getLogger(f"vmfork.qmp.qga.{self.name}")
            client.await_greeting = False
            client.negotiate = False
            try:
                await deadline(client.connect(sock), t, f"QGA session of {self.name}")
            except QMPError as exc:
                sock.close()
                raise GuestError(f"{self.name}: QGA session failed: {exc}") from exc
            self._client = client
        except BaseException:
            self._unlock()
            raise

    async def close(self) -> None:
        """End the session (idempotent)."""
        client, self._client = self._client, None
        try:
            if client is not None:
                with contextlib.suppress(Exception):
                    await deadline(client.disconnect(), self.timeout, "QGA disconnect")
        finally:
            self._unlock()

    def _unlock(self) -> None:
        if self._lockf is not None:
            self._lockf.close()
            self._lockf = None

    async def _sync(self) -> socket.socket:
        """Connect and run guest-sync-delimited; return the synchronised socket.

        Everything before the 0xFF that starts our answer (stale replies to an
        earlier client, an error about the 0xFF itself) is dropped; answers
        to earlier syncs carry another id and are skipped too.
        """
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            try:
                await loop.sock_connect(sock, self.socket_path)
            except OSError as exc:
                raise GuestError(f"{self.name}: cannot reach the guest agent (QGA) "
                                 f"({exc.strerror})") from exc
            sync_id = secrets.randbelow(2**31)
            req = {"execute": "guest-sync-delimited", "arguments": {"id": sync_id}}
            await loop.sock_sendall(sock, DELIMITER + json.dumps(req).encode() + b"\n")
            await self._read_sync(sock, sync_id)
            return sock
        except BaseException:
            sock.close()
            raise

    async def _read_sync(self, sock: socket.socket, sync_id: int) -> None:
        """Read until the delimited answer ``0xFF {"return": sync_id}``.

        Each byte is looked at once; only the bytes after the last 0xFF
        (at most :data:`MAX_SYNC_LINE`) are kept."""
        loop = asyncio.get_running_loop()
        line: bytearray | None = None  # after a 0xFF, until its line ends
        skipped = 0
        while True:
            chunk = await loop.sock_recv(sock, 65536)
            if not chunk:
                raise GuestError(f"{self.name}: the guest agent (QGA) closed the channel")
            pos = 0
            for stop in _SYNC_STOPS.finditer(chunk):
                if line is not None:
                    line += chunk[pos:stop.start()]
                if stop.group() == DELIMITER:
                    line = bytearray()
                elif line is not None:
                    if _sync_id(line) == sync_id:
                        rest = chunk[stop.end():]
                        if rest.strip():
                            log.debug("%s: QGA sent more after sync: %r", self.name, rest[:200])
                        return
                    line = None
                pos = stop.end()
            if line is not None:
                line += chunk[pos:]
                if len(line) > MAX_SYNC_LINE:
                    raise TooMuchOutput(self.name, "a sync answer of the guest agent (QGA)",
                                        MAX_SYNC_LINE)
            skipped += len(chunk)
            if skipped > MAX_SYNC_NOISE:
                raise TooMuchOutput(self.name, "what the guest agent (QGA) sent before "
                                    "its sync answer", MAX_SYNC_NOISE)

    # -- commands -------------------------------------------------------------
    async def execute(self, cmd: str, args: dict[str, Any] | None = None,
                      timeout: float | None = None) -> Any:
        """Run one QGA command with a deadline; QGA errors become GuestError."""
        if self._client is None:
            raise GuestError(f"{self.name}: no QGA session; use 'async with GuestAgent(...)'")
        try:
            return await deadline(self._client.execute(cmd, args), timeout or self.timeout,
                                  f"QGA {cmd} on {self.name}")
        except ExecuteError as exc:
            raise GuestError(f"{self.name}: QGA {cmd} failed: {exc.error.error.desc}") from exc
        except QMPError as exc:
            # The session broke: the reader's error says why. A reply over
            # READBUFLEN makes qemu.qmp's reader fail with ValueError.
            cause: BaseException = exc
            try:
                await deadline(self._client.disconnect(), self.timeout, "QGA disconnect")
            except Exception as root:  # the reader's failure, re-raised
                cause = root
            if isinstance(cause, ValueError) and cmd == "guest-exec-status":
                # READBUFLEN holds MAX_ANSWER bytes of output: there was more.
                raise TooMuchOutput(self.name, "guest answer", MAX_ANSWER) from cause
            if isinstance(cause, ValueError):
                raise TooMuchOutput(self.name, f"a reply of the guest agent (QGA) to {cmd}",
                                    READBUFLEN) from cause
            raise GuestError(f"{self.name}: QGA {cmd} failed: {exc}") from exc

    async def ping(self) -> None:
        await self.execute("guest-ping")

    async def info(self) -> dict[str, Any]:
        """``guest-info``: the agent's version and supported commands."""
        result: dict[str, Any] = await self.execute("guest-info")
        return result

    async def exec(self, command: str | list[str], timeout: float = DEFAULT.exec,
                   input: bytes | None = None, cwd: str | None = None) -> ExecResult:
        """Run *command* in the guest; return its exit code, stdout and stderr.

        A string is a shell command, run as the serial agent runs it
        (:data:`SHELL_WRAPPER`): in *cwd* if given and it exists, and done
        when the shell ends even if it left a background process. A list is
        an argv, run as is (*cwd* does not apply): it is done when every
        process holding its stdout or stderr has closed it.

        A command killed by a signal reports status 128 + signal, as a shell
        does. Gives up (the command keeps running) after *timeout* seconds.
        """
        if isinstance(command, str):
            label = command
            argv = ["/bin/sh", "-c", SHELL_WRAPPER, "vmfork-exec", command, cwd or ""]
        else:
            argv = list(command)
            label = " ".join(argv)
        args: dict[str, Any] = {"path": argv[0], "arg": argv[1:], "capture-output": True}
        if input is not None:
            args["input-data"] = base64.b64encode(input).decode()
        t0 = time.monotonic()
        started = await self.execute("guest-exec", args)
        pid = int(started["pid"])

        out, err = bytearray(), bytearray()

        async def wait() -> dict[str, Any]:
            pause = POLL_FIRST
            while True:
                await asyncio.sleep(pause)
                st: dict[str, Any] = await self.execute("guest-exec-status", {"pid": pid})
                # QGA sends the output once, when the command has exited;
                # count every poll's anyway, against one cap.
                out.extend(self._output(st, "out-data"))
                err.extend(self._output(st, "err-data"))
                if len(out) + len(err) > MAX_ANSWER:
                    raise TooMuchOutput(self.name, "guest answer", MAX_ANSWER)
                if st.get("exited"):
                    return st
                pause = min(pause * 2, POLL_MAX)
        st = await deadline(wait(), timeout, f"guest command on {self.name}", label[:60])
        if st.get("out-truncated") or st.get("err-truncated"):
            log.warning("%s: QGA truncated the output of %s", self.name, argv[0])
        status = int(st["exitcode"]) if "exitcode" in st else 128 + int(st.get("signal", 0))
        return ExecResult.from_bytes(status, bytes(out), bytes(err), time.monotonic() - t0)

    def _output(self, status: dict[str, Any], key: str) -> bytes:
        """The bytes of one output field of a guest-exec-status reply."""
        text = status.get(key, "")
        try:
            if not isinstance(text, str):
                raise ValueError(key)
            return base64.b64decode(text, validate=True)
        except ValueError as exc:  # binascii.Error is one
            raise GuestError(f"{self.name}: QGA sent a garbled {key}") from exc

    async def set_time(self, ns: int | None = None, timeout: float | None = None) -> None:
        """Set the guest clock to *ns* (default: the host's time now) and the RTC.

        The guest agent also writes the RTC (``hwclock``), which takes 1-2 s
        under TCG: give *timeout* room for it."""
        t = time.time_ns() if ns is None else ns
        await self.execute("guest-set-time", {"time": t}, timeout=timeout)

    async def get_time(self) -> int:
        """The guest clock in nanoseconds since the epoch."""
        return int(await self.execute("guest-get-time"))

    async def fsfreeze_freeze(self, timeout: float | None = None) -> int:
        """Freeze the guest's file systems; return how many were frozen.

        Thaw with :meth:`fsfreeze_thaw` on the same or a later session."""
        return int(await self.execute("guest-fsfreeze-freeze", timeout=timeout))

    async def fsfreeze_thaw(self, timeout: float | None = None) -> int:
        return int(await self.execute("guest-fsfreeze-thaw", timeout=timeout))

    async def fsfreeze_status(self) -> str:
        return str(await self.execute("guest-fsfreeze-status"))


async def wait_qga(socket_path: str, lock_path: Path, name: str, timeout: float,
                   attempt: float = DEFAULT.agent_attempt) -> float:
    """Wait until the guest agent answers a sync; return the seconds it took.

    Each try may take *attempt* seconds, all of them *timeout*."""
    t0 = time.monotonic()

    async def loop() -> None:
        while True:
            qga = GuestAgent(socket_path, lock_path, name, timeout=attempt)
            try:
                async with qga:
                    await qga.ping()
                    return
            except (GuestError, VmforkTimeout):
                await asyncio.sleep(0.2)
    await deadline(loop(), timeout, f"the guest agent (QGA) of {name}")
    return time.monotonic() - t0


def _sync_id(line: bytearray) -> object:
    """The ``return`` value of a sync answer, or None if *line* is not one."""
    try:
        answer = json.loads(line)
    except ValueError:
        return None
    return answer.get("return") if isinstance(answer, dict) else None
