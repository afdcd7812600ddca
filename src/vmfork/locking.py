"""File locks with a deadline.

Owns the one way vmfork waits for another vmfork process: ``flock`` on a
lock file, retried without blocking until a deadline, so a wedged holder
turns into a clear error instead of a hang. Used for the per-VM catalog
lock and for the guest agent channels (one client at a time), exclusive;
shared for a VM's use (:mod:`vmfork.idle`).
"""

from __future__ import annotations

import contextlib
import fcntl
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import IO

from vmfork.errors import StateError
from vmfork.private import opener

#: Seconds between two attempts to take a held lock.
RETRY = 0.01


def _open(path: Path) -> IO[str]:
    return open(path, "w", opener=opener)


def _try(f: IO[str], end: float, busy: str, shared: bool = False) -> bool:
    """One attempt: True if *f* is now locked; False to retry; StateError
    (and *f* closed) once the deadline *end* has passed."""
    try:
        fcntl.flock(f, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        if time.monotonic() < end:
            return False
        f.close()
        raise StateError(busy) from None
    except BaseException:
        f.close()
        raise


def acquire(path: Path, timeout: float | None, busy: str, shared: bool = False) -> IO[str]:
    """Open *path* and lock it exclusively (*shared*: shared with other
    shared holders); return the open file (closing it releases the lock).
    Waits up to *timeout* seconds (0: not at all); then raises
    :class:`StateError` with the message *busy*."""
    f, end = _open(path), time.monotonic() + (timeout or 0.0)
    while not _try(f, end, busy, shared):
        time.sleep(RETRY)
    return f


async def acquire_async(path: Path, timeout: float | None, busy: str,
                        shared: bool = False) -> IO[str]:
    """:func:`acquire` without blocking the event loop while waiting."""
    import asyncio  # here: the synchronous callers (listing VMs) need no event loop

    f, end = _open(path), time.monotonic() + (timeout or 0.0)
    while not _try(f, end, busy, shared):
        await asyncio.sleep(RETRY)
    return f


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
