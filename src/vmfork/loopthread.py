"""An asyncio event loop on a thread of its own, for synchronous wrappers.

Owns :class:`LoopThread`, on which the synchronous flavours run their asyncio
implementation (:class:`vmfork.Host` over :class:`vmfork.AsyncHost`,
:class:`vmfork.Client` over :class:`vmfork.AsyncClient`): one implementation
of each operation, and the synchronous calls also work where the caller
already runs a loop (a notebook). If the caller is interrupted (Ctrl-C)
while it waits, the operation is cancelled and its cleanup runs before the
interrupt goes on.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Coroutine, Iterator
from typing import Any, Protocol, TypeVar

from vmfork.errors import StateError

T = TypeVar("T")
E = TypeVar("E", covariant=True)


class Stream(Protocol[E]):
    """An asynchronous stream that is started, iterated and closed (a
    streamed guest command, in-process or through the daemon)."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def __aiter__(self) -> AsyncIterator[E]: ...


class LoopThread:
    """An event loop running on a daemon thread; :meth:`run` waits for one
    coroutine on it. *what* names the owner in the error of a call after
    :meth:`close` ("this vmfork host is closed")."""

    def __init__(self, cleanup_seconds: float, what: str = "vmfork host") -> None:
        self.cleanup_seconds = cleanup_seconds
        self.what = what
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="vmfork-loop",
                                        daemon=True)
        self._thread.start()

    @property
    def is_open(self) -> bool:
        return self._thread.is_alive()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        if not self.is_open:
            coro.close()
            raise StateError(f"this {self.what} is closed")
        started, finished = threading.Event(), threading.Event()

        async def tracked() -> T:
            started.set()
            try:
                return await coro
            finally:
                finished.set()
        fut = asyncio.run_coroutine_threadsafe(tracked(), self._loop)
        try:
            return fut.result()
        except BaseException:
            # Interrupted while waiting (KeyboardInterrupt): cancel the
            # operation and give its cleanup time to run before going on.
            if not fut.done():
                fut.cancel()
                if started.is_set():
                    finished.wait(self.cleanup_seconds)
            raise

    def iterate(self, stream: Stream[T]) -> Iterator[T]:
        """The events of *stream*, one :meth:`run` each; leaving the loop
        early (or an error) closes the stream."""
        self.run(stream.start())
        events = aiter(stream)

        async def step() -> T | None:
            return await anext(events, None)
        try:
            while (event := self.run(step())) is not None:
                yield event
        finally:
            if self.is_open:
                self.run(stream.close())

    def close(self) -> None:
        if self.is_open:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            self._loop.close()


__all__ = ["LoopThread"]
