"""Named points between the steps of vmfork's multi-step operations, where
tests stop vmfork in order to kill it there.

Owns :func:`checkpoint` and :data:`STALL_ENV`. An operation that changes
state in several steps (run, clone, pool refill, template create and remove,
update, save, restore, export, import) awaits ``checkpoint("op.step")``
between them. With ``VMFORK_TEST_STALL`` naming a step, vmfork logs
``stalling at op.step`` and sleeps there, so that a test can send SIGKILL or
SIGTERM at a known point and check that the next command finishes or undoes
what was in flight. Unset (always, outside tests) a checkpoint costs one
environment lookup. Tests may also replace :func:`checkpoint` in a module to
act at a step (e.g. kill QEMU there).
"""

from __future__ import annotations

import asyncio
import logging
import os

log = logging.getLogger("vmfork.checkpoint")

#: Environment variable naming the step at which vmfork stalls.
STALL_ENV = "VMFORK_TEST_STALL"
#: How long a stall lasts: a test kills vmfork long before; a variable left
#: set by mistake still ends.
STALL_SECONDS = 3600.0


async def checkpoint(step: str) -> None:
    """Mark *step* of an operation; stall there if ``STALL_ENV`` names it."""
    if os.environ.get(STALL_ENV) == step:
        log.warning("stalling at %s (%s is set)", step, STALL_ENV)
        await asyncio.sleep(STALL_SECONDS)


__all__ = ["STALL_ENV", "STALL_SECONDS", "checkpoint"]
