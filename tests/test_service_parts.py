"""The daemon's pure parts, without a daemon: the event bus and its stream,
operations, clone names picked for concurrent requests, metrics helpers."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from vmfork.api.aio import AsyncHost
from vmfork.errors import NotFound, ResourceError, StateError
from vmfork.results import CloneResult
from vmfork.service import events, operations
from vmfork.service.metrics import clone_source, smaps_rollup
from vmfork.service.state import ServiceState
from vmfork.service.templates import CloneNames


@pytest.fixture
def state(tmp_path: Path) -> ServiceState:
    return ServiceState(host=AsyncHost(tmp_path / "home"))


def test_a_slow_subscriber_loses_its_oldest_events_and_is_told() -> None:
    bus = events.EventBus()
    with bus.subscribe(limit=3) as slow, bus.subscribe() as fast:
        for i in range(5):
            bus.publish("started", {"vm": f"v{i}"})
        dropped, got = slow.take()
        assert dropped == 2 and [e.data["vm"] for e in got] == ["v2", "v3", "v4"]
        assert [e.id for e in fast.take()[1]] == [1, 2, 3, 4, 5]
        assert slow.take() == (0, [])
    assert bus.subscribers == 0


def test_the_stream_sends_frames_a_dropped_notice_and_ends_when_stopping() -> None:
    async def main() -> list[str]:
        bus = events.EventBus()
        stopping = asyncio.Event()
        stream = events._stream(bus, stopping)
        frames = [await anext(stream)]
        for i in range(events.QUEUE_LIMIT + 2):
            bus.publish("cloned", {"vm": f"c{i}"})
        frames.append(await anext(stream))  # the dropped notice
        frames.append(await anext(stream))  # the oldest event kept
        stopping.set()
        frames += [f async for f in stream]
        return frames

    frames = asyncio.run(main())
    assert frames[0] == ": subscribed\n\n"
    assert frames[1] == 'event: dropped\ndata: {"dropped": 2}\n\n'
    assert frames[2].startswith("id: 3\nevent: cloned\ndata: {")
    assert '"vm": "c2"' in frames[2]
    assert len(frames) == 3 + events.QUEUE_LIMIT - 1


def test_operations_end_done_or_failed_with_an_error_code(state: ServiceState) -> None:
    async def main() -> tuple[operations.Operation, operations.Operation]:
        ops = operations.Operations(state)
        seen: list[tuple[str, str]] = []
        ops.observers.append(lambda op, result, _s: seen.append((op, result)))

        async def ok() -> CloneResult:
            return CloneResult("c", 1, False, 0.1, 0.2, 0.3, 0.4)

        async def bad() -> CloneResult:
            raise StateError("a is busy")

        good = ops.start("export", "a", ok)
        failed = ops.start("export", "b", bad)
        assert good.to_dict()["state"] == "running"
        while ops.list()[0].state == "running" or ops.list()[1].state == "running":
            await asyncio.sleep(0.01)
        assert sorted(seen) == [("export", "done"), ("export", "failed")]
        with pytest.raises(NotFound):
            ops.get("nope")
        return good, failed

    good, failed = asyncio.run(main())
    assert good.to_dict()["result"]["name"] == "c"
    assert failed.to_dict()["error"] == {"code": "conflict", "message": "a is busy"}
    assert "seconds" in failed.to_dict()["progress"]


def test_operations_are_bounded(state: ServiceState) -> None:
    async def main() -> None:
        ops = operations.Operations(state)
        hold = asyncio.Event()

        async def wait() -> CloneResult:
            await hold.wait()
            return CloneResult("c", 1, False, 0.1, 0.2, 0.3, 0.4)

        for _ in range(operations.MAX_RUNNING):
            ops.start("image", "demo", wait)
        with pytest.raises(ResourceError):
            ops.start("image", "demo", wait)
        await ops.cancel_all()
        assert {o.state for o in ops.list()} == {"failed"}

    asyncio.run(main())


def test_concurrent_requests_get_different_clone_names(state: ServiceState) -> None:
    names = CloneNames()
    with names.picked(state, "t", 2) as a, names.picked(state, "t", 1) as b:
        assert (a, b) == (["t-1", "t-2"], ["t-3"])
    with names.picked(state, "t", 1) as c:
        assert c == ["t-1"]
    assert names.pending == set()


def test_clone_source_and_smaps_rollup() -> None:
    r = CloneResult("c", 1, True, 0.0, 0.1, 0.2, 0.3)
    assert (clone_source(r, True), clone_source(r, False)) == ("warm", "pool")
    fresh = CloneResult("c", 1, False, 0.1, 0.2, 0.3, 0.4)
    assert clone_source(fresh, True) == "fresh"
    mine = smaps_rollup(os.getpid())
    assert mine["Rss"] > 0 and mine["Anonymous"] > 0
