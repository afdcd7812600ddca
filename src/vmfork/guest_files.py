"""Files into and out of a running guest, through its guest agent.

Owns :func:`read_file` and :func:`write_file` and their limit,
:data:`MAX_FILE`: 16 MiB, the most one guest answer may carry
(:data:`vmfork.guest.limits.MAX_ANSWER`), both ways. The bytes move
unchanged (binary-safe), through the agent that runs the VM's commands
(:func:`vmfork.agents.choose_agent`):

* **qemu-guest-agent**: ``guest-file-open``, ``-seek`` (a read learns the
  size first), ``-read``/``-write`` in chunks of :data:`CHUNK` bytes (base64
  in the JSON) and ``-close``;
* **vmfork's serial agent**: a read is one command (``cat``; the agent's
  answer carries stdout in base64); a write sends each chunk as base64 text
  right after a command that reads it from the agent's console
  (*follow* of :meth:`vmfork.guest.serial.SerialAgent.exec`), under a
  deadline in the guest too (``timeout``), so that a host killed half-way
  does not leave the agent waiting.

A write goes to a temporary file beside the target (``.NAME.vmfork-XXXXXXXX``),
which is checked for its size, given its mode and renamed over the target:
a reader in the guest sees the old file or the new one, never a part; a
write that fails removes its temporary file. Checking and renaming is a
shell command in the guest, through either agent (``sh``, ``wc``,
``chmod``, ``mv -T``: busybox and coreutils have them).

Paths are absolute guest paths. A file (for a read) or a directory (for a
write) that does not exist is :class:`~vmfork.errors.NotFound`; a read of
what is not a regular file, or a write onto a directory,
:class:`~vmfork.errors.InvalidInput`; more than :data:`MAX_FILE` bytes
:class:`~vmfork.errors.TooLarge`; anything else the agent reports
:class:`~vmfork.errors.GuestError`.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import logging
import posixpath
import secrets
import shlex
import time
from collections.abc import AsyncIterator
from typing import Any

from vmfork import idle
from vmfork.agents import agent_for, choose_agent, qga_for
from vmfork.errors import GuestError, InvalidInput, NotFound, StateError, TooLarge, VmforkError
from vmfork.guest.limits import MAX_ANSWER, TooMuchOutput, size_text
from vmfork.guest.qga import GuestAgent
from vmfork.guest.serial import SerialAgent
from vmfork.records import VMRecord
from vmfork.results import ExecResult, FileResult
from vmfork.store import Store
from vmfork.tasks import run_to_end
from vmfork.timeouts import DEFAULT, Timeouts

log = logging.getLogger("vmfork.files")

#: Most bytes one file transfer moves, either way.
MAX_FILE = MAX_ANSWER
#: Bytes per guest-file-read/-write, and per serial agent command of a write.
CHUNK = 1 << 20
#: Longest guest path accepted (Linux's PATH_MAX).
MAX_PATH = 4096
#: Seconds a serial agent command of a write gives the host to send its
#: chunk (base64 text) before it gives up: this, plus one per
#: :data:`SEND_RATE` bytes (the console moves ~2 MB/s under TCG).
SEND_GRACE = 20
SEND_RATE = 100_000
#: Exit statuses of vmfork's own guest commands here (a command's own
#: failure keeps its status and message).
_MISSING, _NOT_REGULAR, _TOO_LARGE, _CUT_SHORT = 103, 104, 105, 106

#: Checks a write's temporary file ($2) has its size ($4), gives it its mode
#: ($3) and renames it over the target ($1); removes it on failure.
_FINISH = (
    '[ "$(wc -c <"$2")" -eq "$4" ] || '
    '{ rm -f "$2"; echo "the file arrived cut short" >&2; exit 106; }; '
    '[ ! -d "$1" ] || { rm -f "$2"; echo "is a directory" >&2; exit 104; }; '
    'chmod "$3" "$2" && mv -f -T "$2" "$1" || { s=$?; rm -f "$2"; exit $s; }')
#: What is wrong with reading ($2 = r) or writing ($2 = w) path $1: exits
#: _MISSING or _NOT_REGULAR, or 0 if nothing is.
_DIAGNOSE = (
    'if [ "$2" = r ]; then [ -e "$1" ] || exit 103; [ -f "$1" ] || exit 104; '
    'else d=${1%/*}; [ -d "${d:-/}" ] || exit 103; [ ! -d "$1" ] || exit 104; fi')


def check_guest_path(path: str) -> str:
    """*path* if it can name a file in the guest: absolute, not ending in
    ``/``, no NUL, at most :data:`MAX_PATH` bytes; InvalidInput otherwise."""
    if not isinstance(path, str) or not path.startswith("/"):
        raise InvalidInput(f"invalid guest path {path!r}: give an absolute path")
    if "\0" in path or len(path.encode(errors="surrogateescape")) > MAX_PATH:
        raise InvalidInput("invalid guest path: a NUL byte, or longer than "
                           f"{MAX_PATH} bytes")
    if path.endswith("/"):
        raise InvalidInput(f"invalid guest path {path!r}: names a directory, not a file")
    return path


def _too_large(name: str, path: str, size: int | None = None) -> TooLarge:
    what = f"has {size} bytes" if size is not None else "is larger"
    return TooLarge(f"{name}: {path} {what} (a file transfer moves at most "
                    f"{size_text(MAX_FILE)})")


@contextlib.asynccontextmanager
async def _in_use(store: Store, name: str, timeouts: Timeouts) -> AsyncIterator[VMRecord]:
    """The live VM *name* in use (:func:`vmfork.idle.in_use`: woken if it
    was paused for idling); StateError if the user paused it."""
    async with idle.in_use(store, name, timeouts) as rec:
        if rec.state == "paused":
            raise StateError(f"{name} is paused; resume it first")
        yield rec


def _script(script: str, *args: str | int) -> str:
    """A shell command that runs *script* with *args* as ``$1``...``$N``."""
    return f"set -- {shlex.join(str(a) for a in args)}; {script}"


def _temp_path(path: str) -> str:
    head, base = posixpath.split(path)
    return posixpath.join(head, f".{base[:200]}.vmfork-{secrets.token_hex(4)}")


def _failure(name: str, path: str, r: ExecResult, what: str) -> VmforkError:
    """The error for a guest command of a transfer that exited non-zero."""
    detail = " ".join(r.stderr.split())[:300] or f"exit status {r.exit_code}"
    if r.exit_code == _MISSING:
        missing = "no such file" if what == "read" else "no such directory"
        return NotFound(f"{name}: {path}: {missing} in the guest")
    if r.exit_code == _NOT_REGULAR:
        reason = "not a regular file" if what == "read" else "a directory"
        return InvalidInput(f"{name}: {path} is {reason} in the guest")
    return GuestError(f"{name}: cannot {what} {path} in the guest: {detail}")


# -- reading ---------------------------------------------------------------------

async def read_file(store: Store, name: str, path: str, *, timeouts: Timeouts = DEFAULT,
                    agent: str = "auto") -> bytes:
    """The bytes of the regular file *path* in the guest of the running VM
    *name* (at most :data:`MAX_FILE`)."""
    path = check_guest_path(path)
    t0 = time.monotonic()
    async with _in_use(store, name, timeouts) as rec:
        if await choose_agent(store, rec, agent, timeouts) == "qga":
            async with qga_for(store, rec, timeouts) as g:
                data = await _qga_read(g, name, path, timeouts)
        else:
            data = await _serial_read(agent_for(store, rec, timeouts), name, path, timeouts)
    log.info("%s: read %s (%d bytes) in %.2f s", name, path, len(data), time.monotonic() - t0)
    return data


async def _serial_read(ag: SerialAgent, name: str, path: str, timeouts: Timeouts) -> bytes:
    script = ('[ -e "$1" ] || exit 103; [ -f "$1" ] || exit 104; '
              's=$(wc -c <"$1") || exit 1; [ "$s" -le "$2" ] || { echo "$s" >&2; exit 105; }; '
              'exec cat "$1"')
    try:
        r = await ag.exec(_script(script, path, MAX_FILE), timeouts.exec)
    except TooMuchOutput as exc:  # it grew while it was read
        raise _too_large(name, path) from exc
    if r.exit_code == _TOO_LARGE:
        size = r.stderr.strip()
        raise _too_large(name, path, int(size) if size.isdigit() else None)
    if r.exit_code != 0:
        raise _failure(name, path, r, "read")
    return r.stdout.encode(errors="surrogateescape")


async def _qga_read(g: GuestAgent, name: str, path: str, timeouts: Timeouts) -> bytes:
    try:
        handle = await g.execute("guest-file-open", {"path": path, "mode": "r"})
    except GuestError as exc:
        raise await _diagnosis(g, name, path, "read", timeouts, exc) from exc
    try:
        # The size first, so that a file over the limit is refused before
        # it moves (a file of /proc shows 0 and is read to its end).
        end = await g.execute("guest-file-seek", {"handle": handle, "offset": 0,
                                                  "whence": "end"})
        size = int(end["position"])
        if size > MAX_FILE:
            raise _too_large(name, path, size)
        await g.execute("guest-file-seek", {"handle": handle, "offset": 0, "whence": "set"})
        data = bytearray()
        while True:
            r = await g.execute("guest-file-read", {"handle": handle, "count": CHUNK})
            chunk = _unbase64(name, r.get("buf-b64", ""))
            data += chunk
            if len(data) > MAX_FILE:
                raise _too_large(name, path)
            if r.get("eof") or not chunk:
                return bytes(data)
    except TooLarge as exc:
        # A directory may seek to a huge "size".
        raise await _diagnosis(g, name, path, "read", timeouts, exc) from exc
    except GuestError as exc:
        raise await _diagnosis(g, name, path, "read", timeouts, exc) from exc
    finally:
        with contextlib.suppress(VmforkError):
            await run_to_end(g.execute("guest-file-close", {"handle": handle}))


def _unbase64(name: str, text: Any) -> bytes:
    try:
        if not isinstance(text, str):
            raise ValueError("buf-b64")
        return base64.b64decode(text, validate=True)
    except (ValueError, binascii.Error) as exc:
        raise GuestError(f"{name}: QGA sent a garbled file chunk") from exc


async def _diagnosis(g: GuestAgent, name: str, path: str, what: str, timeouts: Timeouts,
                     exc: VmforkError) -> VmforkError:
    """What the guest says is wrong with *path* (NotFound, InvalidInput), or
    *exc* if nothing is, or the guest cannot tell."""
    try:
        r = await g.exec(_script(_DIAGNOSE, path, what[0]), timeouts.exec)
    except VmforkError:
        return exc
    return exc if r.exit_code not in (_MISSING, _NOT_REGULAR) else _failure(name, path, r, what)


# -- writing ---------------------------------------------------------------------

async def write_file(store: Store, name: str, path: str, data: bytes, *, mode: int = 0o644,
                     timeouts: Timeouts = DEFAULT, agent: str = "auto") -> FileResult:
    """Write *data* (at most :data:`MAX_FILE` bytes) to *path* in the guest
    of the running VM *name* with permissions *mode*, replacing the file in
    one rename (see the module docstring). Its directory must exist."""
    path = check_guest_path(path)
    if not isinstance(mode, int) or not 0 <= mode <= 0o7777:
        raise InvalidInput(f"invalid file mode {mode!r}: 0 to 0o7777")
    if len(data) > MAX_FILE:
        raise _too_large(name, path, len(data))
    t0 = time.monotonic()
    async with _in_use(store, name, timeouts) as rec:
        used = await choose_agent(store, rec, agent, timeouts)
        tmp = _temp_path(path)
        if used == "qga":
            async with qga_for(store, rec, timeouts) as g:
                await _qga_write(g, name, path, tmp, bytes(data), mode, timeouts)
        else:
            await _serial_write(agent_for(store, rec, timeouts), name, path, tmp, bytes(data),
                                mode, timeouts)
    seconds = time.monotonic() - t0
    log.info("%s: wrote %s (%d bytes) in %.2f s", name, path, len(data), seconds)
    return FileResult(name, path, len(data), seconds, used)


async def _serial_write(ag: SerialAgent, name: str, path: str, tmp: str, data: bytes,
                        mode: int, timeouts: Timeouts) -> None:
    chunks = [data[i:i + CHUNK] for i in range(0, len(data), CHUNK)] or [b""]
    try:
        for i, chunk in enumerate(chunks):
            text = base64.b64encode(chunk)
            # The data is read into a scratch file on tmpfs before anything
            # can fail, so that none is left for the agent to skip.
            parts = ['b=/run/vmfork-put.$$; trap \'rm -f "$b"\' EXIT; '
                     'true >"$b" 2>/dev/null || b=/tmp/vmfork-put.$$']
            if text:
                parts.append(f'timeout {SEND_GRACE + len(text) // SEND_RATE} '
                             f'head -c {len(text)} /proc/$PPID/fd/0 >"$b"')
            if i == 0:
                parts.append('d=${1%/*}; [ -d "${d:-/}" ] || exit 103; [ ! -d "$1" ] || exit 104')
            redirect = ">" if i == 0 else ">>"
            parts.append(f'base64 -d <"$b" {redirect}"$2" || '
                         '{ rm -f "$2"; echo "the data arrived garbled" >&2; exit 106; }')
            if i == len(chunks) - 1:
                parts.append(_FINISH)
            command = _script("; ".join(parts), path, tmp, f"{mode:o}", len(data))
            r = await ag.exec(command, timeouts.exec, follow=text)
            if r.exit_code != 0:
                raise _failure(name, path, r, "write")
    except BaseException:
        with contextlib.suppress(VmforkError):
            await run_to_end(ag.exec(_script('rm -f "$1"', tmp), timeouts.exec))
        raise


async def _qga_write(g: GuestAgent, name: str, path: str, tmp: str, data: bytes, mode: int,
                     timeouts: Timeouts) -> None:
    try:
        handle = await g.execute("guest-file-open", {"path": tmp, "mode": "w"})
    except GuestError as exc:
        raise await _diagnosis(g, name, path, "write", timeouts, exc) from exc
    closed = False
    try:
        for i in range(0, len(data), CHUNK):
            chunk = data[i:i + CHUNK]
            r = await g.execute("guest-file-write",
                                {"handle": handle, "buf-b64": base64.b64encode(chunk).decode()})
            if int(r.get("count", -1)) != len(chunk):
                raise GuestError(f"{name}: QGA wrote {r.get('count')} of {len(chunk)} bytes "
                                 f"to {path}")
        closed = True
        await g.execute("guest-file-close", {"handle": handle})
        fin = await g.exec(_script(_FINISH, path, tmp, f"{mode:o}", len(data)), timeouts.exec)
        if fin.exit_code != 0:
            raise _failure(name, path, fin, "write")
    except BaseException:
        async def undo() -> None:
            if not closed:
                with contextlib.suppress(VmforkError):
                    await g.execute("guest-file-close", {"handle": handle})
            with contextlib.suppress(VmforkError):
                await g.exec(["rm", "-f", tmp], timeouts.exec)
        await run_to_end(undo())
        raise


__all__ = ["CHUNK", "MAX_FILE", "check_guest_path", "read_file", "write_file"]
