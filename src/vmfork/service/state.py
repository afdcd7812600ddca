"""What every route of the daemon shares: the host and the daemon's settings.

Owns :class:`ServiceState`, made once when the daemon starts and reached by
the routes through ``request.app.state.vmfork`` (:func:`state_of`).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from fastapi import Request

from vmfork.api.aio import AsyncHost
from vmfork.service.gate import StartGate


@dataclass
class ServiceState:
    """The daemon's host and settings."""

    host: AsyncHost
    #: The bearer token every request must carry (None: no token; only on
    #: the UNIX socket, whose mode keeps others out).
    token: str | None = None
    #: The slots every QEMU start takes (run, restore, update, clone).
    starts: StartGate = field(default_factory=StartGate)
    #: Extra parts (events, operations, pools, metrics) by name, set by the
    #: modules that own them.
    parts: dict[str, object] = field(default_factory=dict)
    #: Set when the daemon starts to stop (SIGTERM, SIGINT), before it waits
    #: for the requests in flight: open event streams end, background loops
    #: stop taking new work.
    stopping: asyncio.Event = field(default_factory=asyncio.Event)


def state_of(request: Request) -> ServiceState:
    """The daemon's state, for a route."""
    st = request.app.state.vmfork
    assert isinstance(st, ServiceState)
    return st


__all__ = ["ServiceState", "state_of"]
