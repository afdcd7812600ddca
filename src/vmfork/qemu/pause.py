"""How long a guest was paused, by QEMU's own event timestamps, and a resume
that checks the guest runs.

Owns :func:`event_time`, :func:`pause_ms` (the pause of a guest moved from one
QEMU to another: its last ``STOP`` in one to its last ``RESUME`` in the
other, on the host clock QEMU stamps events with) and :func:`resume_running`
(``cont``, with the ``RESUME`` event recorded, and StateError unless the
guest then runs). Used by live update, fork and their benchmarks.
"""

from __future__ import annotations

from typing import Any

from qemu.qmp import EventListener

from vmfork.errors import StateError
from vmfork.qemu.machine import Machine


def event_time(ev: Any) -> float | None:
    """A QMP event's timestamp in seconds (QEMU's host clock), None if absent."""
    try:
        ts = ev["timestamp"]
        return float(ts["seconds"]) + float(ts["microseconds"]) / 1e6
    except (KeyError, TypeError, ValueError):
        return None


def pause_ms(stops: EventListener, resumes: EventListener) -> float | None:
    """Milliseconds from the last ``STOP`` event *stops* heard to the last
    ``RESUME`` event *resumes* heard; None if either is missing."""
    t_stop = [t for t in map(event_time, stops.history) if t is not None]
    t_resume = [t for t in map(event_time, resumes.history) if t is not None]
    if not t_stop or not t_resume:
        return None
    return round((t_resume[-1] - t_stop[-1]) * 1000, 3)


async def resume_running(m: Machine, resumes: EventListener, what: str) -> None:
    """Resume the guest in *m*, *resumes* hearing its ``RESUME`` event;
    StateError naming *what* (e.g. "the new QEMU") unless it then runs."""
    with m.events.listen(resumes):
        await m.resume()
        status = await m.status()
    if status != "running":
        raise StateError(f"{m.name}: the guest does not run in {what} (state {status!r})")


__all__ = ["event_time", "pause_ms", "resume_running"]
