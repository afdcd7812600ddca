"""Long work as operations: ``202 Accepted`` now, the result later.

Owns :class:`Operations` (the daemon's operations, in memory) and the routes
that start or show one: ``POST /v1/vms/{name}/export`` ``{"file": ...}``,
``POST /v1/snapshots/import`` ``{"file", "name", "as_template"?, ...}``,
``POST /v1/templates/pull`` ``{"url", "name"?, "lazy"?, "token_file"?}``,
``POST /v1/images/{name}`` (build ``demo`` or ``debian``), ``GET
/v1/operations`` and ``GET /v1/operations/{id}``.

An operation is ``{"id", "kind", "state": "running"|"done"|"failed",
"progress": {"seconds": ..., ...}, "result"|"error", "target"}``; its
``result`` is the ``to_dict()`` of what the library returned, its ``error``
the same ``{"code", "message"}`` as an error answer. Export adds
``progress.bytes_written`` (the snapshot file so far). A 202 answer carries
``Location: /v1/operations/{id}``.

Operations live in the daemon's memory only: a restart forgets them (the
work itself is settled as the library settles an interrupted command: an
export's temporary file is removed, an import's half-made VM or template
undone by the next command). Finished operations are kept, newest first, up
to :data:`KEEP_FINISHED`; at most :data:`MAX_RUNNING` run at once (more are
refused with 503 and ``Retry-After``). Paths in requests are the daemon's:
they must be absolute.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from vmfork.api.aio import IMAGES
from vmfork.errors import InvalidInput, NotFound, ResourceError, VmforkError, http_error
from vmfork.lazy.source import base_url, read_token_file
from vmfork.names import check_name
from vmfork.service import events
from vmfork.service.state import ServiceState, state_of
from vmfork.snapshots.export import TEMP_SUFFIX
from vmfork.tasks import cancel_all

log = logging.getLogger("vmfork.service.operations")

router = APIRouter(tags=["operations"])

#: Finished operations remembered (the oldest are forgotten first).
KEEP_FINISHED = 200
#: Operations running at once; more are refused for now.
MAX_RUNNING = 8


class HasDict(Protocol):
    def to_dict(self) -> dict[str, Any]: ...


@dataclass
class Operation:
    """One piece of long work the daemon runs for a client."""

    id: str
    kind: str
    target: str
    started: float = field(default_factory=time.time)
    t0: float = field(default_factory=time.monotonic)
    state: str = "running"
    seconds: float | None = None
    result: dict[str, Any] | None = None
    error: dict[str, str] | None = None
    #: Extra progress, read when the operation is shown.
    probe: Callable[[], dict[str, Any]] | None = None

    def progress(self) -> dict[str, Any]:
        p: dict[str, Any] = {"seconds": round(self.seconds if self.seconds is not None
                                              else time.monotonic() - self.t0, 3)}
        if self.probe is not None and self.state == "running":
            with contextlib.suppress(OSError):
                p.update(self.probe())
        return p

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"id": self.id, "kind": self.kind, "target": self.target,
                             "state": self.state, "started": round(self.started, 3),
                             "progress": self.progress()}
        if self.result is not None:
            d["result"] = self.result
        if self.error is not None:
            d["error"] = self.error
        return d


#: Called when an operation ends: its kind, "done" or "failed", and seconds.
Observer = Callable[[str, str, float], None]


class Operations:
    """The daemon's operations: started as tasks, kept in memory."""

    def __init__(self, state: ServiceState) -> None:
        self.state = state
        self._ops: dict[str, Operation] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self.observers: list[Observer] = []

    def start(self, kind: str, target: str,
              work: Callable[[], Awaitable[HasDict]],
              probe: Callable[[], dict[str, Any]] | None = None) -> Operation:
        """Run *work* as a new operation; ResourceError if too many run."""
        if len(self._tasks) >= MAX_RUNNING:
            raise ResourceError(f"{MAX_RUNNING} operations are running; try again later")
        op = Operation(id=secrets.token_hex(8), kind=kind, target=target, probe=probe)
        self._ops[op.id] = op
        task = asyncio.create_task(self._run(op, work), name=f"operation {kind} {op.id}")
        task.add_done_callback(lambda t: self._ended(op, t))
        self._tasks[op.id] = task
        self._forget_old()
        return op

    @staticmethod
    async def _run(op: Operation, work: Callable[[], Awaitable[HasDict]]) -> None:
        try:
            op.result = (await work()).to_dict()
            op.state = "done"
        except VmforkError as exc:
            code, _ = http_error(exc)
            op.error = {"code": code, "message": " ".join(str(exc).split())[:1000]}
            op.state = "failed"
        except Exception as exc:
            log.exception("operation %s %s failed", op.kind, op.id)
            op.error = {"code": "error", "message": f"unexpected {type(exc).__name__}: {exc}"}
            op.state = "failed"

    def _ended(self, op: Operation, task: asyncio.Task[None]) -> None:
        """Record the end of *op*'s task (a task cancelled before it ran
        included: the daemon stopped); once."""
        if op.seconds is not None:
            return
        if task.cancelled():
            op.error = {"code": "cancelled", "message": "the daemon stopped"}
            op.state = "failed"
        op.seconds = time.monotonic() - op.t0
        self._tasks.pop(op.id, None)
        for observe in self.observers:
            observe(op.kind, op.state, op.seconds)
        events.publish(self.state, f"operation_{op.state}", operation=op.id, op=op.kind,
                       target=op.target)

    def _forget_old(self) -> None:
        finished = [o for o in self._ops.values() if o.state != "running"]
        for o in finished[:max(0, len(finished) - KEEP_FINISHED)]:
            del self._ops[o.id]

    def get(self, op_id: str) -> Operation:
        try:
            return self._ops[op_id]
        except KeyError:
            raise NotFound(f"no operation {op_id!r} (the daemon forgets operations when "
                           "it restarts)") from None

    def list(self) -> list[Operation]:
        """Every operation remembered, newest first."""
        return sorted(self._ops.values(), key=lambda o: o.started, reverse=True)

    async def cancel_all(self) -> None:
        """Cancel the running operations and wait until each has undone its
        work and is recorded failed."""
        running = [(self._ops[i], t) for i, t in self._tasks.items()]
        await cancel_all([t for _, t in running])
        for op, task in running:
            self._ended(op, task)


def operations_of(state: ServiceState) -> Operations:
    """The daemon's operations (made on first use)."""
    ops = state.parts.get("operations")
    if not isinstance(ops, Operations):
        ops = state.parts["operations"] = Operations(state)
    return ops


def accepted(op: Operation) -> JSONResponse:
    """The 202 answer for a started operation."""
    return JSONResponse(op.to_dict(), status_code=202,
                        headers={"Location": f"/v1/operations/{op.id}"})


def absolute(path: str, what: str) -> Path:
    """*path* as the daemon's own: it must be absolute."""
    p = Path(path)
    if not p.is_absolute():
        raise InvalidInput(f"{what} {path!r} must be an absolute path (the daemon's "
                           "working directory is not yours)")
    return p


def _export_probe(dest: Path) -> Callable[[], dict[str, Any]]:
    """Bytes the export to *dest* has written so far (its temporary file)."""
    prefix = f".{dest.name}.{os.getpid()}-"

    def probe() -> dict[str, Any]:
        written = 0
        for p in dest.parent.iterdir():
            if p.name.startswith(prefix) and p.name.endswith(TEMP_SUFFIX):
                written += p.stat().st_blocks * 512
        return {"bytes_written": written}

    return probe


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ExportRequest(Body):
    file: str = Field(max_length=4096, description="absolute path of the new snapshot file")


class ImportRequest(Body):
    file: str = Field(max_length=4096, description="absolute path of a snapshot file")
    name: str = Field(max_length=200)
    as_template: bool = False
    persistent: bool = False


class PullRequest(Body):
    url: str = Field(max_length=2048, description="a daemon's http(s)://HOST:PORT/v1/"
                     "templates/NAME, or the base URL of a published directory")
    name: str | None = Field(None, max_length=200,
                             description="the new template's name (default: its name there)")
    lazy: bool = Field(True, description="serve the memory through FUSE, fetched on first "
                       "read and in the background (false: fetch it all first)")
    token_file: str | None = Field(None, max_length=4096,
                                   description="absolute path of a file with the source's "
                                               "bearer token")


class ImageRequest(Body):
    rebuild: bool = False


@router.get("/v1/operations")
async def list_operations(request: Request) -> list[dict[str, Any]]:
    """The operations this daemon remembers, newest first."""
    return [o.to_dict() for o in operations_of(state_of(request)).list()]


@router.get("/v1/operations/{op_id}")
async def show_operation(request: Request, op_id: str) -> dict[str, Any]:
    """One operation: its state, progress, and result or error."""
    return operations_of(state_of(request)).get(op_id).to_dict()


@router.post("/v1/vms/{name}/export", status_code=202, response_model=None)
async def export_vm(request: Request, name: str, body: ExportRequest) -> JSONResponse:
    """Write the VM into one snapshot file (an operation)."""
    state = state_of(request)
    vm = await state.host.vm(name)
    dest = absolute(body.file, "file")
    op = operations_of(state).start("export", name, lambda: vm.export(dest),
                                    probe=_export_probe(dest))
    return accepted(op)


@router.post("/v1/snapshots/import", status_code=202, response_model=None)
async def import_snapshot(request: Request, body: ImportRequest) -> JSONResponse:
    """Start a VM, or make a template (``as_template``), from a snapshot file
    (an operation)."""
    state = state_of(request)
    host = state.host
    src = absolute(body.file, "file")
    name = check_name(body.name, "template" if body.as_template else "VM")

    async def work() -> HasDict:
        if body.as_template:
            tpl = await host.import_template(src, name, persistent=body.persistent)
            events.publish(state, "template_created", template=name, source="import")
            return await tpl.status()
        vm = await host.import_snapshot(src, name, persistent=body.persistent)
        events.publish(state, "started", vm=name, source="import")
        return vm.result if vm.result is not None else await vm.status()

    return accepted(operations_of(state).start("import", name, work))


@router.post("/v1/templates/pull", status_code=202, response_model=None)
async def pull_template(request: Request, body: PullRequest) -> JSONResponse:
    """Pull a template published by another daemon or in a directory behind
    an HTTP server (an operation; its result is the pull's)."""
    state = state_of(request)
    base_url(body.url)  # a bad URL or token file is refused now, not by the operation
    token_file = absolute(body.token_file, "token_file") if body.token_file else None
    if token_file is not None:
        read_token_file(token_file)
    name = check_name(body.name, "template") if body.name is not None else None

    async def work() -> HasDict:
        result = await state.host.pull_template(body.url, name, lazy=body.lazy,
                                                token_file=token_file)
        events.publish(state, "template_created", template=result.name, source="pull")
        return result

    return accepted(operations_of(state).start("pull", name or body.url, work))


@router.post("/v1/images/{name}", status_code=202, response_model=None)
async def build_image(request: Request, name: str,
                      body: ImageRequest | None = None) -> JSONResponse:
    """Build a named guest image (``demo``, ``debian``) once; cached (an
    operation)."""
    state = state_of(request)
    if name not in IMAGES:
        raise InvalidInput(f"unknown image {name!r}: use one of {', '.join(IMAGES)}")
    rebuild = body.rebuild if body else False
    op = operations_of(state).start("image", name,
                                    lambda: state.host.image(name, rebuild=rebuild))
    return accepted(op)


__all__ = ["KEEP_FINISHED", "MAX_RUNNING", "Operation", "Operations", "accepted",
           "operations_of", "router"]
