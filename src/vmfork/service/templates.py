"""``/v1/templates``: templates, their clones and their pools.

Owns the request bodies and answers of the template routes, on the public
async API (:class:`~vmfork.api.aio.AsyncHost`,
:class:`~vmfork.api.aio.AsyncTemplate`):

* ``POST /v1/templates`` ``{"name", "from_vm"}`` (freeze a running VM; it
  ends) or ``{"name", "image": "demo", "prepare"?, "memory"?}`` (boot the
  image, run *prepare*, freeze it): 201 with the template;
* ``GET /v1/templates``: every template's status (``ready``, or
  ``creating``/``removing`` while a command works on it);
* ``GET /v1/templates/{name}``: its status, with ``manifest`` once ready;
* ``DELETE /v1/templates/{name}?force=true``: remove it (``force`` stops its
  clones and pool members first);
* ``POST /v1/templates/{name}/clones`` ``{"count"?, "names"?, "on_clone"?,
  "use_pool"?, "all_or_nothing"?}``: 201 with ``{"template", "clones":
  [CloneResult...]}`` once every clone runs with its own identity (and its
  hook has run); if some failed, the error ``partial`` (500) names them and
  the others run (unless ``all_or_nothing``);
  without names, concurrent requests get different ``TEMPLATE-k``
  (:class:`CloneNames`); ``GET`` of the same lists the clones' statuses;
* ``GET /v1/templates/{name}/pool``, ``PUT`` ``{"size", "warm"?}``: the
  pool's status (plus ``kept``: the daemon keeps it); PUT sets the target,
  answers once the pool has been filled once (as ``vmfork pool T N``), and
  from then on the daemon keeps it (:mod:`vmfork.service.pools`).

Each change is an event (:mod:`vmfork.service.events`); clone and creation
times go to the metrics (:mod:`vmfork.service.metrics`).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from vmfork.api.aio import AsyncTemplate
from vmfork.errors import InvalidInput, NotFound, PartialClone, VmforkError
from vmfork.names import check_name
from vmfork.results import CloneResult, PoolStatus
from vmfork.service import events, pools
from vmfork.service.metrics import clone_source, metrics_of
from vmfork.service.state import ServiceState, state_of
from vmfork.service.vms import IdlePauseRequest
from vmfork.templates import clone

router = APIRouter(prefix="/v1/templates", tags=["templates"])


class Body(BaseModel):
    """A request body: unknown keys are refused."""

    model_config = ConfigDict(extra="forbid")


class TemplateRequest(Body):
    name: str = Field(max_length=200)
    from_vm: str | None = Field(None, max_length=200,
                                description="a running VM to freeze (it ends)")
    image: str | None = Field(None, description="demo: boot it, run prepare, freeze it")
    prepare: str | None = Field(None, max_length=65536)
    memory: str | int = "512M"
    accel: str = "auto"
    on_clone: str | None = Field(None, max_length=65536,
                                 description="the default hook run in each clone")
    idle_pause: float | None = Field(None, ge=0, description="its clones pause after this many "
                                     "seconds without use (exec, files, console); a clone's next "
                                     "use resumes it. 0 or null: never")


class CloneRequest(Body):
    count: int | None = Field(None, description="how many (default: len(names), or 1)")
    names: list[str] | None = Field(None, max_length=64)
    on_clone: str | None = Field(None, max_length=65536,
                                 description="replaces the template's hook ('' runs none)")
    use_pool: bool = True
    max_starting: int | None = Field(None, ge=1, le=64, description="clones being started at "
                                     "once (default 4)")
    all_or_nothing: bool = Field(False, description="one clone failing removes them all; "
                                 "else the others run on and the answer is an error "
                                 "'partial' naming the failures")


class PoolRequest(Body):
    size: int
    warm: bool | None = Field(None, description="warm members (None keeps the kind)")


class CloneNames:
    """Names for clones of concurrent requests that gave none: the lowest free
    ``TEMPLATE-k`` (as the library picks them), leaving out those that
    requests in flight have picked and not yet put in the catalog."""

    def __init__(self) -> None:
        self.pending: set[str] = set()

    @contextlib.contextmanager
    def picked(self, state: ServiceState, template: str, count: int) -> Iterator[list[str]]:
        free = clone.next_clone_names(state.host.store, template,
                                      clone.check_count(count) + len(self.pending))
        names = [n for n in free if n not in self.pending][:count]
        self.pending.update(names)
        try:
            yield names
        finally:
            self.pending.difference_update(names)


def clone_names_of(state: ServiceState) -> CloneNames:
    names = state.parts.get("clone_names")
    if not isinstance(names, CloneNames):
        names = state.parts["clone_names"] = CloneNames()
    return names


def _template(state: ServiceState, name: str) -> AsyncTemplate:
    """A handle on template *name* (which may not exist)."""
    return AsyncTemplate(state.host, check_name(name, "template"))


async def template_answer(tpl: AsyncTemplate) -> dict[str, Any]:
    """A template's status, with its manifest once it is ready."""
    d = (await tpl.status()).to_dict()
    if d["status"] == "ready":
        d["manifest"] = (await tpl.inspect()).to_dict()
        d["idle_pause"] = tpl.host.store.template_idle_pause(tpl.name)
    return d


def pool_answer(state: ServiceState, status: PoolStatus) -> dict[str, Any]:
    d = status.to_dict()
    d["kept"] = status.template in pools.keepers_of(state).templates
    return d


@router.get("")
async def list_templates(request: Request) -> list[dict[str, Any]]:
    """Every template, oldest first."""
    answer = []
    for tpl in await state_of(request).host.templates():
        try:
            answer.append((await tpl.status()).to_dict())
        except NotFound:  # removed meanwhile
            continue
    return answer


@router.post("", status_code=201)
async def create_template(request: Request, body: TemplateRequest) -> dict[str, Any]:
    """Make a template from a running VM (``from_vm``) or from a guest image."""
    state = state_of(request)
    host = state.host
    if (body.from_vm is None) == (body.image is None):
        raise InvalidInput("give either from_vm (a running VM) or image (demo)")
    if body.from_vm is not None and body.prepare is not None:
        raise InvalidInput("prepare goes with image; run it in the VM before from_vm")
    t0 = time.monotonic()
    metrics = metrics_of(state)
    try:
        if body.from_vm is not None:
            source = await host.vm(body.from_vm)
            tpl = await source.make_template(body.name, on_clone=body.on_clone)
        else:
            tpl = await host.create_template(body.name, image=body.image or "demo",
                                             memory=body.memory,
                                             prepare=body.prepare, accel=body.accel,
                                             on_clone=body.on_clone)
        if body.idle_pause:
            await host.set_idle_pause(body.name, body.idle_pause)
    except VmforkError:
        metrics.observe_operation("template_create", "failed", time.monotonic() - t0)
        raise
    metrics.observe_operation("template_create", "done", time.monotonic() - t0)
    if body.from_vm is not None:
        events.publish(state, "stopped", vm=body.from_vm, reason="template",
                       template=body.name)
    events.publish(state, "template_created", template=body.name,
                   source="vm" if body.from_vm else "image")
    return await template_answer(tpl)


@router.get("/{name}")
async def show_template(request: Request, name: str) -> dict[str, Any]:
    """One template: its status, and its manifest once it is ready."""
    return await template_answer(_template(state_of(request), name))


@router.delete("/{name}")
async def remove_template(request: Request, name: str, force: bool = False) -> dict[str, Any]:
    """Remove the template and its files; refused while clones or pool
    members use it unless *force* (which stops them first)."""
    state = state_of(request)
    tpl = _template(state, name)
    await tpl.status()  # NotFound before the keeper is touched
    clones = [c.name for c in await tpl.clones()] if force else []
    async with pools.keepers_of(state).stopped(name):
        await tpl.remove(force=force)
    for c in clones:
        events.publish(state, "stopped", vm=c, reason="template removed")
    metrics_of(state).forget_template(name)
    events.publish(state, "template_removed", template=name)
    return {"name": name, "status": "removed"}


@router.get("/{name}/clones")
async def list_clones(request: Request, name: str) -> list[dict[str, Any]]:
    """The statuses of the template's clones that exist now."""
    tpl = _template(state_of(request), name)
    answer = []
    for c in await tpl.clones():
        try:
            answer.append((await c.status()).to_dict())
        except NotFound:  # stopped meanwhile
            continue
    return answer


@router.post("/{name}/clones", status_code=201)
async def clone_template(request: Request, name: str, body: CloneRequest) -> dict[str, Any]:
    """Start clones; answers when all run with their own identity."""
    state = state_of(request)
    tpl = await state.host.template(name)
    count = body.count or (len(body.names) if body.names else 1)
    warm = (await tpl.pool()).warm
    metrics = metrics_of(state)
    t0 = time.monotonic()
    try:
        with contextlib.ExitStack() as stack:
            names = body.names or stack.enter_context(
                clone_names_of(state).picked(state, tpl.name, count))
            # One slot of the daemon's start queue per request (the library
            # bounds the QEMU starts within a batch itself).
            async with state.starts.slot(f"clone {tpl.name}"):
                clones = await tpl.clone(count, names=names, use_pool=body.use_pool,
                                         on_clone=body.on_clone,
                                         all_or_nothing=body.all_or_nothing,
                                         max_starting=body.max_starting)
    except VmforkError as exc:
        metrics.observe_operation("clone", "failed", time.monotonic() - t0)
        if isinstance(exc, PartialClone):  # the clones that run are reported as such
            _started(state, tpl.name, exc.clones, warm)
        raise
    metrics.observe_operation("clone", "done", time.monotonic() - t0)
    results = [c.result for c in clones]
    _started(state, tpl.name, results, warm)
    return {"template": tpl.name, "clones": [r.to_dict() for r in results]}


def _started(state: ServiceState, template: str, results: list[CloneResult],
             warm: bool) -> None:
    """Metrics and events of clones that run."""
    metrics = metrics_of(state)
    if any(r.pooled for r in results):
        pools.keepers_of(state).wake(template)
    for r in results:
        metrics.observe_clone(template, r, warm)
        events.publish(state, "cloned", vm=r.name, template=template,
                       source=clone_source(r, warm), seconds=round(r.responsive, 4))


@router.get("/{name}/pool")
async def show_pool(request: Request, name: str) -> dict[str, Any]:
    """The pool's target, kind and members; ``kept``: the daemon keeps it."""
    state = state_of(request)
    return pool_answer(state, await (await state.host.template(name)).pool())


@router.put("/{name}/pool")
async def set_pool(request: Request, name: str, body: PoolRequest) -> dict[str, Any]:
    """Set the pool's target (``size``, ``warm``), fill it once, and keep it
    there from now on (size 0 drains it)."""
    state = state_of(request)
    tpl = await state.host.template(name)
    keepers = pools.keepers_of(state)
    if body.size == 0:
        await keepers.stop(tpl.name)
    status = await tpl.pool(body.size, warm=body.warm)
    if body.size > 0:
        keepers.ensure(tpl.name, retry=True)
    return pool_answer(state, status)


@router.put("/{name}/idle_pause")
async def set_template_idle_pause(request: Request, name: str, body: IdlePauseRequest
                                  ) -> dict[str, Any]:
    """Clones made from now on pause after ``seconds`` without use."""
    host = state_of(request).host
    tpl = await host.template(name)
    await host.set_idle_pause(tpl.name, body.seconds)
    return await template_answer(tpl)


__all__ = ["CloneRequest", "PoolRequest", "TemplateRequest", "router", "template_answer"]
