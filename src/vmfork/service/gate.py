"""Admission in the daemon: how many QEMU starts run at once.

Owns :class:`StartGate`, a semaphore with a bounded queue. Every route that
starts a QEMU process (run, restore, update; clones) takes a slot first:
at most ``limit`` starts run at once and ``queue`` more wait for a slot, in
order, each for at most ``wait`` seconds. A request beyond the queue, or
one whose wait runs out, is refused at once with :class:`~vmfork.errors.Busy`
(429 with ``Retry-After``) before anything of it is done, so a refused
request leaves nothing behind. The memory check of each start stays the
library's (:mod:`vmfork.admission`: :class:`~vmfork.errors.ResourceError`,
503).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from vmfork.errors import Busy, InvalidInput

#: Defaults of ``vmfork serve --max-starts/--start-queue``, and how long a
#: queued start waits for its slot.
MAX_STARTS = 4
START_QUEUE = 16
START_WAIT = 300.0


class StartGate:
    """At most *limit* starts at once, *queue* more waiting (see the module
    docstring)."""

    def __init__(self, limit: int = MAX_STARTS, queue: int = START_QUEUE,
                 wait: float = START_WAIT) -> None:
        if limit < 1 or queue < 0:
            raise InvalidInput(f"invalid start limits {limit}/{queue}: at least 1 start at "
                               "once, a queue of 0 or more")
        self.limit = limit
        self.queue = queue
        self.wait = wait
        self._slots = asyncio.Semaphore(limit)
        #: Starts that hold a slot, and those waiting for one.
        self.running = 0
        self.waiting = 0

    def _busy(self, what: str) -> Busy:
        return Busy(f"{what}: the daemon runs {self.running} QEMU starts and has "
                    f"{self.waiting} waiting, as many as it takes (--max-starts "
                    f"{self.limit}, --start-queue {self.queue}); retry later")

    @contextlib.asynccontextmanager
    async def slot(self, what: str) -> AsyncIterator[None]:
        """Hold a start slot for the block; Busy if none is to be had."""
        if self._slots.locked() and self.waiting >= self.queue:
            raise self._busy(what)
        self.waiting += 1
        try:
            async with asyncio.timeout(self.wait):
                await self._slots.acquire()
        except TimeoutError:
            raise self._busy(what) from None
        finally:
            self.waiting -= 1
        self.running += 1
        try:
            yield
        finally:
            self.running -= 1
            self._slots.release()


__all__ = ["MAX_STARTS", "START_QUEUE", "START_WAIT", "StartGate"]
