"""Exclusive file locks with a deadline.

Owns the one way vmfork waits for another vmfork process: ``flock`` on a
lock file, retried without blocking until a deadline, so a wedged holder
turns into a clear error instead of a hang. Used for the per-VM catalog
lock and for the guest agent channels (one client at a time).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import IO

from .errors import StateError

#: Seconds between two attempts to take a held lock.
RETRY = 0.01


def acquire(path: Path, timeout: float | None, busy: str) -> IO[str]:
    """Open *path* and lock it exclusively; return the open file (closing it
    releases the lock). Waits up to *timeout* seconds (0: not at all); then
    raises :class:`StateError` with the message *busy*."""
    f = open(path, "w")  # noqa: SIM115 - returned to the caller, who closes it
    end = time.monotonic() + (timeout or 0.0)
    while True:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return f
        except BlockingIOError:
            if time.monotonic() >= end:
                f.close()
                raise StateError(busy) from None
            time.sleep(RETRY)
        except BaseException:
            f.close()
            raise


async def acquire_async(path: Path, timeout: float | None, busy: str) -> IO[str]:
    """:func:`acquire` without blocking the event loop while waiting."""
    f = open(path, "w")  # noqa: SIM115 - returned to the caller, who closes it
    end = time.monotonic() + (timeout or 0.0)
    while True:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return f
        except BlockingIOError:
            if time.monotonic() >= end:
                f.close()
                raise StateError(busy) from None
            await asyncio.sleep(RETRY)
        except BaseException:
            f.close()
            raise


@contextlib.contextmanager
def held(path: Path, timeout: float | None, busy: str) -> Iterator[None]:
    """``with held(path, timeout, busy):`` — the lock for the block."""
    f = acquire(path, timeout, busy)
    try:
        yield
    finally:
        f.close()


@contextlib.asynccontextmanager
async def held_async(path: Path, timeout: float | None, busy: str) -> AsyncIterator[None]:
    """``async with held_async(path, timeout, busy):`` — the lock for the block."""
    f = await acquire_async(path, timeout, busy)
    try:
        yield
    finally:
        f.close()
