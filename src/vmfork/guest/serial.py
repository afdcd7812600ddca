"""Talking to the guest: the serial agent of the demo guest.

Owns the request framing: a request is ``NONCE BASE64(CMD)\\n``; the answer is
``NONCE BEGIN``, base64 of the output, ``NONCE END STATUS SIZE``. Lines that carry
another nonce (answers to requests given up on earlier) are skipped. Calls on
one VM are serialised by a file lock, because the agent socket takes one
client at a time.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from vmfork import locking
from vmfork.errors import GuestError, InvalidInput
from vmfork.qemu.machine import deadline

MAX_COMMAND = 3000
#: How often to ask the agent to resend an answer that arrived incomplete.
RESENDS = 3


class CutShort(GuestError):
    """An answer lost bytes between guest and host; it can be asked for again."""


@dataclass(frozen=True)
class ExecResult:
    """Output (stdout and stderr interleaved) and exit status of a guest command."""

    status: int
    output: bytes
    seconds: float

    @property
    def text(self) -> str:
        return self.output.decode(errors="replace")


class SerialAgent:
    """Client of the agent listening on a VM's agent socket."""

    def __init__(self, socket_path: str, lock_path: Path, name: str = "guest",
                 connect_timeout: float = 10.0) -> None:
        self.socket_path = socket_path
        self.lock_path = lock_path
        self.name = name
        self.connect_timeout = connect_timeout

    async def exec(self, command: str, timeout: float = 60.0) -> ExecResult:
        """Run *command* with ``sh`` in the guest; return its output and status."""
        payload = base64.b64encode(command.encode())
        if len(payload) > MAX_COMMAND:
            raise InvalidInput(f"guest command too long ({len(command)} bytes)")
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
                    asyncio.open_unix_connection(self.socket_path, limit=1 << 24),
                    self.connect_timeout, f"the guest agent of {self.name}")
            except OSError as exc:
                raise GuestError(f"{self.name}: cannot reach the guest agent ({exc.strerror})") \
                    from exc
            try:
                writer.write(nonce + b" " + payload + b"\n")
                await writer.drain()
                for attempt in range(RESENDS + 1):
                    try:
                        status, out = await deadline(
                            self._answer(reader, nonce), timeout,
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
        return ExecResult(status, out, time.monotonic() - t0)

    async def _answer(self, reader: asyncio.StreamReader, nonce: bytes) -> tuple[int, bytes]:
        chunks: list[bytes] = []
        inside = False
        while True:
            line = await reader.readline()
            if not line:
                raise GuestError(f"{self.name}: the guest agent closed the connection")
            line = line.strip()
            if line == nonce + b" BEGIN":
                inside, chunks = True, []
            elif line.startswith(nonce + b" END "):
                fields = line.split()
                try:
                    status = int(fields[2])
                    size = int(fields[3]) if len(fields) > 3 else -1
                except (ValueError, IndexError) as exc:
                    raise GuestError(f"{self.name}: garbled answer from the agent") from exc
                try:
                    out = base64.b64decode(b"".join(chunks), validate=True)
                except (ValueError, binascii.Error) as exc:
                    raise CutShort(f"{self.name}: the command's output arrived garbled") \
                        from exc
                if size >= 0 and len(out) != size:
                    # QEMU's virtconsole drops data when its socket is full.
                    raise CutShort(f"{self.name}: the command's output was cut short in "
                                   f"transit ({len(out)} of {size} bytes arrived)")
                return status, out
            elif inside:
                chunks.append(line)

