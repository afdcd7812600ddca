"""The daemon's events: an in-process bus and ``GET /v1/events``.

Owns :class:`EventBus`, :func:`publish` (what the routes and the background
loops call when something happened: ``publish(state, "started", vm="a")``)
and the server-sent events stream (``text/event-stream``). Each event is
``{"id": N, "kind": ..., "time": UNIX seconds, ...data}``; its SSE frame
carries ``id:``, ``event: KIND`` and the JSON as ``data:``.

Kinds: ``started``, ``stopped``, ``died`` (a VM's QEMU is gone), ``paused``,
``resumed``, ``cloned``, ``forked``, ``updated``, ``saved``, ``restored``,
``template_created``, ``template_removed``, ``pool_refilled``,
``pool_member_died``, ``pool_failed``, ``operation_done``,
``operation_failed``.

Every subscriber has a bounded queue (:data:`QUEUE_LIMIT` events): a
subscriber that does not keep up loses its oldest events, and the next frame
it gets is a ``dropped`` event saying how many (``{"dropped": N}``), so a
slow reader never makes the daemon grow. Events are not stored: a subscriber
sees what happens while it is connected. The stream ends when the daemon
stops; a comment line every :data:`KEEPALIVE` seconds keeps idle
connections open through proxies.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import json
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from vmfork.errors import ResourceError
from vmfork.service.state import ServiceState, state_of

router = APIRouter(tags=["events"])

#: Events one subscriber may have waiting before its oldest are dropped.
QUEUE_LIMIT = 1000
#: Seconds between two keep-alive comments of an idle stream.
KEEPALIVE = 15.0
#: Most subscribers at once; more are refused (503, try again later).
MAX_SUBSCRIBERS = 64


@dataclass(frozen=True)
class Event:
    """One thing that happened."""

    id: int
    kind: str
    time: float
    data: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "kind": self.kind, "time": round(self.time, 3), **self.data}

    def frame(self) -> str:
        """The event as one server-sent events frame."""
        return f"id: {self.id}\nevent: {self.kind}\ndata: {json.dumps(self.to_dict())}\n\n"


@dataclass(eq=False)
class Subscriber:
    """One reader's queue: bounded, oldest dropped first."""

    limit: int = QUEUE_LIMIT
    queue: collections.deque[Event] = field(default_factory=collections.deque)
    dropped: int = 0
    ready: asyncio.Event = field(default_factory=asyncio.Event)

    def put(self, event: Event) -> None:
        if len(self.queue) >= self.limit:
            self.queue.popleft()
            self.dropped += 1
        self.queue.append(event)
        self.ready.set()

    def take(self) -> tuple[int, list[Event]]:
        """How many events were dropped since the last take, and those waiting."""
        dropped, self.dropped = self.dropped, 0
        events = list(self.queue)
        self.queue.clear()
        self.ready.clear()
        return dropped, events


class EventBus:
    """Publish to every current subscriber; never blocks the publisher."""

    def __init__(self) -> None:
        self._ids = itertools.count(1)
        self._subscribers: set[Subscriber] = set()
        self.closed = asyncio.Event()

    def publish(self, kind: str, data: dict[str, Any]) -> Event:
        event = Event(next(self._ids), kind, time.time(), data)
        for sub in self._subscribers:
            sub.put(event)
        return event

    def check_room(self) -> None:
        """ResourceError if the bus has its most subscribers already."""
        if len(self._subscribers) >= MAX_SUBSCRIBERS:
            raise ResourceError(f"too many event subscribers ({MAX_SUBSCRIBERS}); "
                                "try again later")

    @contextlib.contextmanager
    def subscribe(self, limit: int = QUEUE_LIMIT) -> Iterator[Subscriber]:
        self.check_room()
        sub = Subscriber(limit)
        self._subscribers.add(sub)
        try:
            yield sub
        finally:
            self._subscribers.discard(sub)

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    def close(self) -> None:
        """End every stream (the daemon is stopping)."""
        self.closed.set()


def bus_of(state: ServiceState) -> EventBus:
    """The daemon's event bus (made on first use)."""
    bus = state.parts.get("events")
    if not isinstance(bus, EventBus):
        bus = state.parts["events"] = EventBus()
    return bus


def publish(state: ServiceState, kind: str, **data: Any) -> None:
    """Tell every subscriber that *kind* happened (``data``: JSON values)."""
    bus_of(state).publish(kind, data)


async def _stream(bus: EventBus, stopping: asyncio.Event) -> AsyncIterator[str]:
    """The frames of one subscriber, from a first comment line (sent once it
    is subscribed: a client that has read it sees every later event) until
    the daemon stops."""
    with bus.subscribe() as sub:
        yield ": subscribed\n\n"
        while not (bus.closed.is_set() or stopping.is_set()):
            waits = [asyncio.ensure_future(e.wait()) for e in (sub.ready, bus.closed, stopping)]
            try:
                done, _ = await asyncio.wait(waits, timeout=KEEPALIVE,
                                             return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waits:
                    w.cancel()
            dropped, events = sub.take()
            if dropped:
                yield f"event: dropped\ndata: {json.dumps({'dropped': dropped})}\n\n"
            for e in events:
                yield e.frame()
            if not done:
                yield ": keepalive\n\n"


@router.get("/v1/events", response_class=StreamingResponse,
            responses={200: {"content": {"text/event-stream": {}}}})
async def events(request: Request) -> StreamingResponse:
    """Server-sent events: what happens to VMs, templates, pools and
    operations from now on (see the module docstring for the kinds)."""
    state = state_of(request)
    bus = bus_of(state)
    bus.check_room()
    return StreamingResponse(_stream(bus, state.stopping), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


__all__ = ["KEEPALIVE", "QUEUE_LIMIT", "Event", "EventBus", "Subscriber", "bus_of", "publish",
           "router"]
