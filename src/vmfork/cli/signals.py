"""How the ``vmfork`` command takes SIGINT, SIGTERM and SIGHUP.

Owns :class:`Interrupted`, :func:`install`, :func:`run` and :func:`redirect`.
All three signals mean "stop what you are doing, cleanly":

* While an operation runs (:func:`run`, the bridge from a command to the
  library), the first signal cancels it. The operation undoes or finishes its
  step (every operation treats cancellation as a failure and cleans up, each
  wait bounded by its own deadline), and then :class:`Interrupted` is raised
  in the main thread; the command group prints ``vmfork: interrupted
  (SIGTERM)`` and exits with 128 + the signal number.
* Outside an operation (parsing options, printing), the first signal raises
  :class:`Interrupted` at once: nothing is in flight.
* Every later signal is ignored, so that a second Ctrl-C or a ``kill`` sent
  twice cannot abort a cleanup half-way; a process that must go at once
  takes SIGKILL, which the next command recovers from.

A command that treats a signal as its normal end (``pool --keep``) asks for
it with :func:`redirect`. Kept light on imports (asyncio and logging are
loaded by :func:`run`), like every module ``vmfork ls`` loads.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from types import FrameType
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    import asyncio

T = TypeVar("T")
LOGGER = "vmfork.cli"

#: The signals that interrupt a vmfork command.
SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupted(KeyboardInterrupt):
    """The command was interrupted by signal *signum* (its cleanup has run)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


@dataclass
class _State:
    #: The first signal received, if any.
    signum: int | None = None
    #: What the first signal does while an operation runs (else it raises).
    target: Callable[[int], None] | None = None
    #: The first signal went to a :func:`redirect` target: it ends the
    #: command normally, not as an interruption.
    redirected: bool = False


_state = _State()


def _on_signal(signum: int, frame: FrameType | None) -> None:
    if _state.signum is not None:
        return  # the command is ending already: let its cleanup finish
    _state.signum = signum
    if _state.target is not None:
        _state.target(signum)
        return
    raise Interrupted(signum)


def install() -> None:
    """Take SIGINT, SIGTERM and SIGHUP in the main thread (see the module)."""
    for sig in SIGNALS:
        signal.signal(sig, _on_signal)


def ignore() -> None:
    """Ignore the signals from now on: for a command that is exiting (Python
    would restore their default action while it shuts down)."""
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def reset() -> None:
    """Forget a signal received (for a process that runs several commands: tests)."""
    _state.signum, _state.target, _state.redirected = None, None, False


def received() -> int | None:
    """The first signal received, unless a :func:`redirect` target took it."""
    return None if _state.redirected else _state.signum


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run *main* on a new event loop in the main thread. The first signal
    cancels it; once it has ended (its cleanup done), :class:`Interrupted`
    is raised instead of its result or its error."""
    import asyncio
    import logging

    log = logging.getLogger(LOGGER)
    with asyncio.Runner() as runner:
        loop = runner.get_loop()
        task = loop.create_task(main)

        def cancel(signum: int) -> None:
            log.debug("signal %d: cancelling the operation", signum)
            # From a signal handler: only the thread-safe entry into the loop.
            loop.call_soon_threadsafe(task.cancel)

        previous, _state.target = _state.target, cancel
        try:
            result = runner.run(_wait(task))
        except BaseException:
            if received() is None:
                raise
            log.debug("the operation ended with an error after a signal", exc_info=True)
        finally:
            _state.target = previous
    signum = received()
    if signum is not None:
        raise Interrupted(signum)
    return result


async def _wait(task: asyncio.Task[T]) -> T:
    return await task


@contextlib.contextmanager
def redirect(target: Callable[[], None]) -> Iterator[None]:
    """While the block runs (inside :func:`run`, on its loop), the first
    signal calls *target* on the loop instead of cancelling the operation,
    and the command ends normally."""
    import asyncio

    loop = asyncio.get_running_loop()

    def call(signum: int) -> None:
        _state.redirected = True
        loop.call_soon_threadsafe(target)

    previous, _state.target = _state.target, call
    try:
        yield
    finally:
        _state.target = previous


__all__ = ["SIGNALS", "Interrupted", "ignore", "install", "received", "redirect", "reset",
           "run"]
