"""A guest command whose output arrives while it runs.

Owns :class:`ExecStream`. Neither guest agent streams (each answers with a
command's output when the command has ended), so a streamed command runs in
the background in the guest, in a directory of its own
(``/run/vmfork-stream/XXXXXXXX``, under ``/tmp`` where ``/run`` cannot be
written): its stdout and stderr go to the files ``out`` and ``err``, its
exit status to ``rc`` when it ends. It runs in a session of its own
(``setsid``), so that it can be ended with every process it started.

The host polls: each poll is one ordinary guest command, through the agent
the VM's commands use, that answers with the exit status if there is one
yet, then what ``out`` and ``err`` gained since the last poll, at most
:data:`CHUNK` bytes of each. The poll that finds the status and takes the
last of the output removes the directory. Polls come :data:`POLL_FIRST` s
apart while output arrives, twice as far apart each time none did, up to
:data:`POLL_MAX`. Between polls the agent is free: other commands on the VM
run meanwhile.

Bounded: the host holds at most one poll's output at a time (``CHUNK`` per
stream) until its caller takes it; output the command writes faster than
the polls take it waits in the guest's files (guest memory, the guest's
own). A stream ends when the command does (:class:`~vmfork.results.ExecExit`
comes last); after *timeout* s (the command's session is killed and its
directory removed, then :class:`~vmfork.errors.VmforkTimeout`); or when the
caller closes it first (:meth:`ExecStream.close`, also on leaving ``async
with``: killed and removed the same way). A host that dies without closing
leaves the command running, as a plain exec that is given up on does, and
its directory behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shlex
import time
from collections.abc import AsyncIterator
from types import TracebackType

from vmfork import idle
from vmfork.agents import choose_agent, guest_exec
from vmfork.errors import GuestError, StateError, VmforkError, VmforkTimeout
from vmfork.records import VMRecord
from vmfork.results import ExecExit, ExecResult, OutputChunk
from vmfork.store import Store
from vmfork.tasks import run_to_end
from vmfork.timeouts import DEFAULT, Timeouts, check_seconds
from vmfork.vm import get_live

log = logging.getLogger("vmfork.exec_stream")

#: Most bytes of each stream one poll takes.
CHUNK = 256 << 10
#: Seconds between polls: while output arrives, and at most.
POLL_FIRST = 0.05
POLL_MAX = 0.5

#: Starts $1 in the background (see the module docstring); prints its directory.
_START = (
    'b=/run/vmfork-stream; { mkdir -p "$b" && [ -w "$b" ]; } 2>/dev/null || '
    '{ b=/tmp/vmfork-stream; mkdir -p "$b"; } || exit 125; '
    'd=$(mktemp -d "$b/XXXXXXXX") || exit 125; '
    's=; command -v setsid >/dev/null && s=setsid; '
    '( ( cd /root 2>/dev/null; exec $s /bin/sh -c "$1" ) </dev/null >"$d/out" 2>"$d/err" & '
    'echo $! >"$d/pid"; wait $!; echo $? >"$d/rc.new"; mv "$d/rc.new" "$d/rc" ) '
    '</dev/null >/dev/null 2>&1 & '
    'echo $! >"$d/waiter"; echo "$d"')
#: One poll of directory $1: the status (or -) on a line, then stdout from
#: offset $2, stderr from offset $3 on stderr, at most $4 bytes of each.
_POLL = (
    '[ -d "$1" ] || { echo "its files in the guest are gone" >&2; exit 107; }; '
    'r=$(cat "$1/rc" 2>/dev/null) || r=-; echo "$r"; '
    'tail -c +$(($2 + 1)) "$1/out" | head -c "$4"; '
    'tail -c +$(($3 + 1)) "$1/err" | head -c "$4" >&2; '
    '[ "$r" = - ] || [ $(($(wc -c <"$1/out") - $2)) -ge "$4" ] || '
    '[ $(($(wc -c <"$1/err") - $3)) -ge "$4" ] || rm -rf "$1"')
#: Kills the command of directory $1 with its session, and the shell that
#: waits for it first (it would write the status into the directory while it
#: is removed); removes the directory.
_KILL = ('{ kill -9 "$(cat "$1/waiter")"; p=$(cat "$1/pid") && '
         '{ kill -9 -"$p" || kill -9 "$p"; }; } 2>/dev/null; rm -rf "$1"')


def _script(script: str, *args: str | int) -> str:
    return f"set -- {shlex.join(str(a) for a in args)}; {script}"


class ExecStream:
    """A shell command running in a guest, its output read while it runs.

    Use as ``async with vm.exec_stream(cmd) as s: async for ev in s: ...``:
    the events are :class:`OutputChunk` and, last, an
    :class:`~vmfork.results.ExecExit`. :meth:`start` (entering) starts the
    command and raises at once what keeps it from starting.
    """

    def __init__(self, store: Store, name: str, command: str, *, timeout: float | None = None,
                 timeouts: Timeouts = DEFAULT, agent: str = "auto") -> None:
        self.store = store
        self.name = name
        self.command = command
        self.timeout = timeouts.exec if timeout is None else check_seconds(timeout,
                                                                           "exec timeout")
        self.timeouts = timeouts
        self.agent = agent
        self._rec: VMRecord | None = None
        self._dir: str | None = None
        self._t0 = 0.0
        #: True once the command's directory is gone (it ended and was read,
        #: or it was killed).
        self._done = False

    async def __aenter__(self) -> ExecStream:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    async def _run(self, command: str) -> ExecResult:
        # Each poll is a use: it wakes a VM paused for idling in between.
        async with idle.in_use(self.store, self.name, self.timeouts) as rec:
            return await guest_exec(self.store, rec, command, self.timeouts.exec,
                                    self.timeouts, self.agent)

    async def start(self) -> None:
        """Start the command in the guest."""
        if self._rec is not None:
            raise StateError(f"{self.name}: this stream has started already")
        rec = get_live(self.store, self.name)
        if rec.state == "paused" and rec.info.idle_since is None:
            raise StateError(f"{self.name} is paused; resume it first")
        self.agent = await choose_agent(self.store, rec, self.agent, self.timeouts)
        self._rec = rec
        self._t0 = time.monotonic()
        r = await self._run(_script(_START, self.command))
        where = r.stdout.strip()
        if r.exit_code != 0 or not where.startswith("/"):
            self._done = True
            detail = " ".join(r.stderr.split())[:300] or f"exit status {r.exit_code}"
            raise GuestError(f"{self.name}: cannot start a streamed command: {detail}")
        self._dir = where
        log.info("%s: streaming %r from %s", self.name, self.command[:60], where)

    def __aiter__(self) -> AsyncIterator[OutputChunk | ExecExit]:
        return self._events()

    async def _events(self) -> AsyncIterator[OutputChunk | ExecExit]:
        if self._dir is None or self._done:
            raise StateError(f"{self.name}: this stream is not running; start it first")
        out_at = err_at = 0
        pause = POLL_FIRST
        while True:
            left = self.timeout - (time.monotonic() - self._t0)
            if left <= 0:
                await self.close()
                raise VmforkTimeout(f"streamed command on {self.name}", self.timeout,
                                    self.command[:60])
            r = await self._run(_script(_POLL, self._dir, out_at, err_at, CHUNK))
            status, _, rest = r.stdout.partition("\n")
            if r.exit_code != 0 or not (status == "-" or status.isdigit()):
                detail = " ".join(r.stderr.split())[:300] or f"exit status {r.exit_code}"
                self._done = r.exit_code == 107
                raise GuestError(f"{self.name}: streamed command: {detail}")
            out = rest.encode(errors="surrogateescape")
            err = r.stderr.encode(errors="surrogateescape")
            out_at += len(out)
            err_at += len(err)
            if out:
                yield OutputChunk("stdout", out)
            if err:
                yield OutputChunk("stderr", err)
            if status != "-" and len(out) < CHUNK and len(err) < CHUNK:
                self._done = True
                yield ExecExit(int(status), time.monotonic() - self._t0)
                return
            pause = POLL_FIRST if out or err else min(pause * 2, POLL_MAX)
            await asyncio.sleep(min(pause, max(left, 0.0)))

    async def close(self) -> None:
        """Kill the command if it still runs and remove its files (idempotent)."""
        if self._dir is None or self._done:
            return
        self._done = True
        with contextlib.suppress(VmforkError):
            await run_to_end(self._run(_script(_KILL, self._dir)))
        log.info("%s: streamed command %r ended early", self.name, self.command[:60])


__all__ = ["CHUNK", "ExecStream", "OutputChunk"]
