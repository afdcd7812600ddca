"""``/v1/vms``: the daemon's VM routes.

Owns the request bodies of the VM routes and their answers, which are the
``to_dict()`` of the public API's results (:mod:`vmfork.results`): list, show,
run (answers once the guest is ready), stop, exec, pause, resume, update,
save, restore. A command's output is text (UTF-8; bytes that are not UTF-8
become U+FFFD) plus, only when that lost something, the exact bytes in
base64 (``stdout_base64``, ``stderr_base64``).
"""

from __future__ import annotations

import base64
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from vmfork.results import ExecResult
from vmfork.service import events
from vmfork.service.state import state_of

router = APIRouter(prefix="/v1/vms", tags=["vms"])


class Body(BaseModel):
    """A request body: unknown keys are refused."""

    model_config = ConfigDict(extra="forbid")


class RunRequest(Body):
    name: str = Field(max_length=200)
    image: str | None = Field(None, description="demo or debian")
    memory: str | int = "256M"
    cpus: int = 1
    kernel: str | None = None
    initrd: str | None = None
    append: str | None = None
    disks: list[str] = Field(default_factory=list, max_length=16)
    net: str | None = Field(None, description="user or none")
    ports: list[tuple[int, int]] = Field(default_factory=list, max_length=64)
    persistent: bool = False
    accel: str = "auto"
    ready: str = "auto"


class ExecRequest(Body):
    command: str = Field(max_length=65536)
    timeout: float | None = None
    agent: str = "auto"


class UpdateRequest(Body):
    qemu: str | None = None
    mode: str = "auto"
    timeout: float | None = None


def exec_answer(r: ExecResult) -> dict[str, Any]:
    """The JSON answer of a command (see the module docstring)."""
    d: dict[str, Any] = {"exit_code": r.exit_code, "seconds": r.seconds}
    for key, text in (("stdout", r.stdout), ("stderr", r.stderr)):
        raw = text.encode(errors="surrogateescape")
        d[key] = raw.decode(errors="replace")
        if d[key].encode() != raw:
            d[f"{key}_base64"] = base64.b64encode(raw).decode()
    return d


@router.get("")
async def list_vms(request: Request) -> list[dict[str, Any]]:
    """Every VM of the home, oldest first (as ``vmfork ls --json``)."""
    return [s.to_dict() for s in await state_of(request).host.ls()]


@router.post("", status_code=201)
async def run_vm(request: Request, body: RunRequest) -> dict[str, Any]:
    """Start a VM; answers once its guest is ready."""
    host = state_of(request).host
    vm = await host.run(body.name, image=body.image, memory=body.memory, cpus=body.cpus,
                        kernel=body.kernel, initrd=body.initrd, append=body.append,
                        disks=body.disks, net=body.net, ports=[(h, g) for h, g in body.ports],
                        persistent=body.persistent, accel=body.accel, ready=body.ready)
    events.publish(state_of(request), "started", vm=body.name)
    return (await vm.status()).to_dict()


@router.get("/{name}")
async def show_vm(request: Request, name: str) -> dict[str, Any]:
    """One VM's status."""
    return (await (await state_of(request).host.vm(name)).status()).to_dict()


@router.delete("/{name}")
async def stop_vm(request: Request, name: str, force: bool = False) -> dict[str, Any]:
    """Stop the VM and remove it with its files."""
    await (await state_of(request).host.vm(name)).stop(force=force)
    events.publish(state_of(request), "stopped", vm=name)
    return {"name": name, "state": "stopped"}


@router.post("/{name}/exec")
async def exec_in_vm(request: Request, name: str, body: ExecRequest) -> dict[str, Any]:
    """Run a shell command in the guest; its exit code, stdout and stderr."""
    vm = await state_of(request).host.vm(name)
    return exec_answer(await vm.exec(body.command, timeout=body.timeout, agent=body.agent))


@router.post("/{name}/pause")
async def pause_vm(request: Request, name: str) -> dict[str, Any]:
    vm = await state_of(request).host.vm(name)
    await vm.pause()
    events.publish(state_of(request), "paused", vm=name)
    return (await vm.status()).to_dict()


@router.post("/{name}/resume")
async def resume_vm(request: Request, name: str) -> dict[str, Any]:
    vm = await state_of(request).host.vm(name)
    await vm.resume()
    events.publish(state_of(request), "resumed", vm=name)
    return (await vm.status()).to_dict()


@router.post("/{name}/update")
async def update_vm(request: Request, name: str,
                    body: UpdateRequest | None = None) -> dict[str, Any]:
    """Move the guest into a new QEMU process (live update)."""
    b = body or UpdateRequest()
    vm = await state_of(request).host.vm(name)
    report = await vm.update(qemu=b.qemu, mode=b.mode, timeout=b.timeout)
    events.publish(state_of(request), "updated", vm=name, mode=report.mode,
                   pid=report.new_pid)
    return report.to_dict()


@router.post("/{name}/save")
async def save_vm(request: Request, name: str) -> dict[str, Any]:
    result = await (await state_of(request).host.vm(name)).save()
    events.publish(state_of(request), "saved", vm=name)
    return result.to_dict()


@router.post("/{name}/restore")
async def restore_vm(request: Request, name: str) -> dict[str, Any]:
    result = await (await state_of(request).host.vm(name)).restore()
    events.publish(state_of(request), "restored", vm=name, pid=result.pid)
    return result.to_dict()


__all__ = ["ExecRequest", "RunRequest", "UpdateRequest", "exec_answer", "router"]
