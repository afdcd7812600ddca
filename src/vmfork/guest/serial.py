"""Talking to the guest: vmfork's serial agent (demo and Debian guests).

Owns the request framing of the agent (:file:`images/guestfs/agent`). A
request is ``NONCE BASE64(CMD)\\n``; the answer is::

    NONCE BEGIN
    base64 of the command's stdout (any number of lines)
    NONCE ERR
    base64 of its stderr (none if it wrote nothing there)
    NONCE END STATUS OUTSIZE ERRSIZE

QEMU's virtconsole drops data when its socket is full (it cannot make the
guest wait), so the agent paces a long answer: after each segment of base64
(44 KB, less than a socket's buffer) but the last it writes ``NONCE MORE``
and waits for ``NONCE !more``, which the host sends once it has read the
segment. OUTSIZE and ERRSIZE count the bytes of stdout and stderr, so the
host can still tell an answer that lost bytes on the way (an agent from
before the pacing, in the RAM of a saved template, does not pace). Such an
answer is asked for again (``NONCE !resend``, with a new nonce; the command
is not run again) up to :data:`RESENDS` times. Lines that carry another
nonce (answers to requests given up on earlier) are skipped.

An agent from before stderr had its own section may still run in the RAM of
a saved template. Its answer has no ERR section and ends ``NONCE END STATUS
SIZE`` (or, older still, ``NONCE END STATUS``); stdout and stderr come
interleaved in the one section, and are read as stdout.

Calls on one VM are serialised by a file lock, because the agent socket
takes one client at a time.

A request may be followed by data for the command (*follow* of
:meth:`SerialAgent.exec`, how :mod:`vmfork.guest_files` moves a file into the
guest fast): one line of base64 text, which the command reads itself from
the agent's console (``head -c LEN /proc/$PPID/fd/0``: the agent runs the
command as its child and reads requests byte by byte, so the data is still
there; the console is raw, so the line has no length limit). Whatever of it
a command leaves unread the agent skips as a line that is no request. A
command that reads data gives up by itself after a deadline (a host killed
while it sent the data leaves the command waiting for the rest, and the
agent with it).

A guest may be hostile: no line may be longer than
:data:`~vmfork.guest.limits.MAX_LINE` and one answer may carry at most
:data:`~vmfork.guest.limits.MAX_ANSWER` bytes of output. vmfork holds no
more than that (plus one read buffer): past either cap it stops reading,
closes the connection and raises :class:`~vmfork.guest.limits.TooMuchOutput`.
What the guest still sends goes nowhere (QEMU drops a console's output while
no client is connected), and a later command skips it, as it skips any
answer to another nonce.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from vmfork import locking
from vmfork.errors import GuestError, InvalidInput
from vmfork.guest.limits import MAX_ANSWER, MAX_ANSWER_B64, MAX_LINE, TooMuchOutput
from vmfork.qemu.machine import deadline
from vmfork.results import ExecResult
from vmfork.timeouts import DEFAULT

MAX_COMMAND = 3000
#: What may follow a request (:meth:`SerialAgent.exec`): base64, one line.
_BASE64 = re.compile(rb"[A-Za-z0-9+/]*={0,2}")
#: How often to ask the agent to resend an answer that arrived incomplete.
RESENDS = 3


class CutShort(GuestError):
    """An answer lost bytes between guest and host; it can be asked for again."""


@dataclass(frozen=True)
class Answer:
    """One answer of the agent, as sent: exit code, stdout, stderr."""

    exit_code: int
    stdout: bytes
    stderr: bytes


class AnswerReader:
    """Reads the answer carrying *nonce* out of the agent's lines.

    Feed it the lines as they come (:meth:`feed`); it returns the
    :class:`Answer` at the answer's END line, raises :class:`CutShort` if
    that answer lost bytes, :class:`GuestError` if its END line is garbled.
    Base64 lines never hold a space, so a line with ``NONCE `` in it is a
    marker (or the echo of our request) and any other line is data.
    """

    def __init__(self, nonce: bytes, name: str = "guest") -> None:
        self.nonce = nonce
        self.name = name
        self._out = bytearray()
        self._err = bytearray()
        #: Where base64 lines go: None outside our answer.
        self._section: bytearray | None = None
        #: The agent waits for ``NONCE !more`` before it sends on (set by
        #: :meth:`feed` at a MORE marker; the caller answers and clears it).
        self.wants_more = False

    def feed(self, line: bytes) -> Answer | None:
        """Take one line; raises :class:`TooMuchOutput` as soon as the
        answer's base64 grows over what :data:`MAX_ANSWER` bytes need."""
        line = line.strip()
        # A marker may come glued to the end of a partial line: the tty
        # echoes a request that arrives before the agent turned echo off.
        at = line.rfind(self.nonce + b" ")
        if at < 0:
            if self._section is not None:
                self._section += line
                if len(self._out) + len(self._err) > MAX_ANSWER_B64:
                    self._out, self._err = bytearray(), bytearray()
                    raise TooMuchOutput(self.name, "guest answer", MAX_ANSWER)
            return None
        marker = line[at + len(self.nonce) + 1:]
        if marker == b"BEGIN":
            self._out, self._err = bytearray(), bytearray()
            self._section = self._out
        elif marker == b"ERR":
            self._section = self._err
        elif marker == b"MORE":
            self.wants_more = True
        elif marker.startswith(b"END "):
            # Also without BEGIN or ERR (lost in transit): the sizes tell
            # whether anything of the output went missing with them.
            return self._end(marker.split()[1:])
        return None

    def _end(self, fields: list[bytes]) -> Answer:
        try:
            status = int(fields[0])
            sizes = [int(f) for f in fields[1:3]]
        except (ValueError, IndexError) as exc:
            raise GuestError(f"{self.name}: garbled answer from the agent") from exc
        if sum(sizes) > MAX_ANSWER:
            raise TooMuchOutput(self.name, "guest answer", MAX_ANSWER)
        out = self._decode(self._out, "output")
        err = self._decode(self._err, "error output")
        got = [len(out), len(err)][:len(sizes)]
        if got != sizes:
            raise CutShort(f"{self.name}: the command's output was cut short in transit "
                           f"({sum(got)} of {sum(sizes)} bytes arrived)")
        return Answer(status, out, err)

    def _decode(self, text: bytearray, what: str) -> bytes:
        try:
            return base64.b64decode(text, validate=True)
        except (ValueError, binascii.Error) as exc:
            raise CutShort(f"{self.name}: the command's {what} arrived garbled") from exc


class SerialAgent:
    """Client of the agent listening on a VM's agent socket."""

    def __init__(self, socket_path: str, lock_path: Path, name: str = "guest",
                 connect_timeout: float = DEFAULT.agent) -> None:
        self.socket_path = socket_path
        self.lock_path = lock_path
        self.name = name
        self.connect_timeout = connect_timeout

    async def exec(self, command: str, timeout: float = DEFAULT.exec,
                   follow: bytes = b"") -> ExecResult:
        """Run *command* with ``sh`` in the guest (in ``/root``, stdin empty);
        return its exit code, stdout and stderr. *follow*, base64 text, is
        sent right after the request, ended by a newline, for the command to
        read (see the module docstring)."""
        payload = base64.b64encode(command.encode())
        if len(payload) > MAX_COMMAND:
            raise InvalidInput(f"guest command too long ({len(command)} bytes)")
        if follow and not _BASE64.fullmatch(follow):
            raise InvalidInput("data for a guest command must be base64 text")
        t0 = time.monotonic()
        nonce = secrets.token_hex(6).encode()
        # Another command on this VM holds the channel for at most its own
        # deadline; wait about as long as ours.
        lockf = await locking.acquire_async(
            self.lock_path, timeout + self.connect_timeout,
            f"{self.name}: the guest agent is busy with another command")
        try:
            try:
                reader, writer = await deadline(
                    asyncio.open_unix_connection(self.socket_path, limit=MAX_LINE),
                    self.connect_timeout, f"the guest agent of {self.name}")
            except OSError as exc:
                raise GuestError(
                    f"{self.name}: cannot reach the guest agent ({exc.strerror})") from exc
            try:
                writer.write(nonce + b" " + payload + b"\n")
                if follow:
                    writer.write(follow + b"\n")
                # The guest takes data as fast as the command reads it.
                await deadline(writer.drain(), timeout, f"guest command on {self.name}",
                               command[:60])
                for attempt in range(RESENDS + 1):
                    try:
                        answer = await deadline(
                            self._answer(reader, writer, nonce), timeout,
                            f"guest command on {self.name}", command[:60])
                        break
                    except CutShort:
                        if attempt == RESENDS:
                            raise
                        # Ask for the same answer again; the command is not rerun.
                        nonce = secrets.token_hex(6).encode()
                        writer.write(nonce + b" !resend\n")
                        await writer.drain()
            finally:
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()
        finally:
            lockf.close()
        return ExecResult.from_bytes(answer.exit_code, answer.stdout, answer.stderr,
                                     time.monotonic() - t0)

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      nonce: bytes) -> Answer:
        parser = AnswerReader(nonce, self.name)
        while True:
            try:
                line = await reader.readline()
            except ValueError as exc:  # over the reader's limit, MAX_LINE
                raise TooMuchOutput(self.name, "a line from the guest agent",
                                    MAX_LINE) from exc
            except OSError as exc:  # QEMU ended (the console socket was reset)
                raise GuestError(f"{self.name}: the connection to the guest agent was "
                                 f"lost ({exc.strerror or type(exc).__name__})") from exc
            if not line:
                raise GuestError(f"{self.name}: the guest agent closed the connection")
            answer = parser.feed(line)
            if answer is not None:
                return answer
            if parser.wants_more:  # what came before is read: the socket has room
                parser.wants_more = False
                writer.write(nonce + b" !more\n")
                await writer.drain()
