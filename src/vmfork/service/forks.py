"""``POST /v1/vms/{name}/fork``: branch a running VM into children.

Owns the request body of a fork (:class:`ForkRequest`) and its route, on
:meth:`vmfork.api.aio.AsyncVM.fork`. The body is ``{"count"?, "names"?,
"on_clone"?}`` (all optional: one child): *count* 1-64, *names* at most 64
valid VM names, one per child (a *count* that disagrees with them, or a name
given twice, is 400 ``invalid``). The answer (200) is the
:class:`~vmfork.results.ForkReport`'s ``to_dict()``, once every child runs
with its own identity (and its hook has run); the parent runs on.

Without names, concurrent requests get different ``NAME-k``, as concurrent
clone requests do (:class:`~vmfork.service.templates.CloneNames`). A fork
takes one start slot of the daemon (:mod:`vmfork.service.gate`: 429 ``busy``
with ``Retry-After`` when there is none), publishes a ``forked`` event
(:mod:`vmfork.service.events`) with the parent, its children and its pause,
and goes to the metrics (:mod:`vmfork.service.metrics`): the operation
``fork`` and the parent's pause.
"""

from __future__ import annotations

import contextlib
import time
from typing import Annotated, Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from vmfork.api.aio import fork_children
from vmfork.errors import VmforkError
from vmfork.names import MAX_NAME, NAME_RE
from vmfork.service import events
from vmfork.service.metrics import metrics_of
from vmfork.service.state import state_of
from vmfork.service.templates import clone_names_of
from vmfork.templates.clone import MAX_CLONES

router = APIRouter(prefix="/v1/vms", tags=["vms"])

#: A child's name in a request: a valid VM name.
ChildName = Annotated[str, Field(max_length=MAX_NAME, pattern=NAME_RE.pattern)]


class ForkRequest(BaseModel):
    """A fork's request body (unknown keys are refused)."""

    model_config = ConfigDict(extra="forbid")

    count: int | None = Field(default=None, ge=1, le=MAX_CLONES,
                              description="how many children (default: len(names), or 1)")
    names: list[ChildName] | None = Field(default=None, min_length=1, max_length=MAX_CLONES,
                                          description="one name per child (default NAME-k)")
    on_clone: str | None = Field(default=None, max_length=65536,
                                 description="shell command run in each child after its "
                                             "identity is set")


@router.post("/{name}/fork")
async def fork_vm(request: Request, name: str, body: ForkRequest | None = None) -> dict[str, Any]:
    """Branch the running VM into children that start from its state at one
    instant; answers when every child runs with its own identity. The VM
    runs on, paused once for ``parent_pause_ms``."""
    b = body or ForkRequest()
    state = state_of(request)
    count, names = fork_children(b.count, b.names)
    vm = await state.host.vm(name)
    metrics = metrics_of(state)
    t0 = time.monotonic()
    try:
        with contextlib.ExitStack() as stack:
            if names is None:
                names = stack.enter_context(
                    clone_names_of(state).picked(state, vm.name, count))
            async with state.starts.slot(f"fork {vm.name}"):
                report = await vm.fork(count, names=names, on_clone=b.on_clone)
    except VmforkError:
        metrics.observe_operation("fork", "failed", time.monotonic() - t0)
        raise
    metrics.observe_operation("fork", "done", time.monotonic() - t0)
    metrics.observe_fork(report)
    events.publish(state, "forked", vm=vm.name, children=[c.name for c in report.children],
                   pid=report.parent_pid, parent_pause_ms=round(report.parent_pause_ms, 3))
    return report.to_dict()


__all__ = ["ForkRequest", "router"]
