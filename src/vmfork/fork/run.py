"""``fork()``: the order of one live fork (stub; being written)."""

from __future__ import annotations

from vmfork.results import ForkReport
from vmfork.store import Store
from vmfork.timeouts import DEFAULT, Timeouts


async def fork(store: Store, name: str, names: list[str] | None = None,
               count: int | None = None, on_clone: str | None = None,
               timeouts: Timeouts = DEFAULT) -> ForkReport:
    """Fork running VM *name* into children *names* (or *count* children
    named ``NAME-k``, lowest free *k* first; default 1). Each child starts
    from the parent's RAM, devices and disks at one instant, then gets its
    own identity like a clone and runs *on_clone* (a shell command). The
    parent keeps its identity; it is paused once, for
    ``ForkReport.parent_pause_ms``."""
    raise NotImplementedError
