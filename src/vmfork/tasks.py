"""asyncio helpers for work that must not be cut short by a cancellation.

Owns the two patterns every operation uses when a command is interrupted
(SIGINT, SIGTERM: the CLI cancels the running coroutine): :func:`run_to_end`
lets a step (a cleanup, a commit, a thread writing a file) finish before the
cancellation goes on, since undoing a half-done step is worse than waiting
for it (each of its waits has a deadline of its own); :func:`cancel_all`
cancels helper tasks and reaps them, so that none is left running or with an
exception nobody retrieved.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeVar

T = TypeVar("T")


async def run_to_end(aw: Awaitable[T]) -> T:
    """Await *aw* to its end even if the caller is cancelled meanwhile, once
    or more; then the cancellation goes on.

    ``asyncio.shield`` alone is not enough: a second cancellation of the
    caller ends the caller while the shielded work runs on unowned, and the
    event loop's shutdown then cancels it half-way."""
    task = asyncio.ensure_future(aw)
    cancelled = False
    while not task.done():
        try:
            await asyncio.wait({task})
        except asyncio.CancelledError:
            cancelled = True
    if cancelled and (task.cancelled() or task.exception() is None):
        raise asyncio.CancelledError
    return task.result()


async def finish_in_thread(fn: Callable[..., T], *args: Any) -> T:
    """Run *fn* in a thread (:func:`run_to_end`: a thread cannot be stopped,
    and the caller's cleanup must not race with it)."""
    return await run_to_end(asyncio.to_thread(fn, *args))


async def cancel_all(tasks: Iterable[asyncio.Future[Any]]) -> None:
    """Cancel *tasks* and wait until each has ended, whatever it raised."""
    tasks = list(tasks)
    for t in tasks:
        t.cancel()
    for t in tasks:
        with contextlib.suppress(BaseException):
            await t


__all__ = ["cancel_all", "finish_in_thread", "run_to_end"]
