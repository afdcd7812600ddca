"""``/v1/vms``: the daemon's VM routes.

Owns the request bodies of the VM routes and their answers, which are the
``to_dict()`` of the public API's results (:mod:`vmfork.results`): list, show,
run (answers once the guest is ready), stop, exec, pause, resume, update,
save, restore. A command's output is text (UTF-8; bytes that are not UTF-8
become U+FFFD) plus, only when that lost something, the exact bytes in
base64 (``stdout_base64``, ``stderr_base64``).

Also:

* ``POST /v1/vms/{name}/exec/stream``: the command's output while it runs
  (:mod:`vmfork.exec_stream`), as NDJSON (``application/x-ndjson``), one
  object a line: ``{"stdout": TEXT}`` or ``{"stderr": TEXT}`` (with
  ``stdout_base64``/``stderr_base64`` as above; a UTF-8 character split
  between two pieces of output is sent whole), then ``{"exit_code": N,
  "seconds": S}``, or ``{"error": {"code": ..., "message": ...}}`` if the
  stream fails after it started (a timeout: ``timeout``; the command is
  killed). What keeps the command from starting is an error answer as for
  any route. A client that goes away ends the command.
* ``PUT /v1/vms/{name}/files?path=P&mode=0644`` (the body is the file's
  bytes, ``application/octet-stream``) and ``GET`` of the same (answers the
  bytes): binary files into and out of the guest through its agent
  (:mod:`vmfork.guest_files`), at most :data:`~vmfork.guest_files.MAX_FILE`
  bytes (16 MiB; more: 413 ``too_large``, a body refused before it is read
  whole). A missing file or directory is 404, a directory 400.

Routes that start a QEMU process (run, update, restore) take a start slot
of the daemon first (:mod:`vmfork.service.gate`): 429 ``busy`` with
``Retry-After`` when there is none.
"""

from __future__ import annotations

import base64
import codecs
import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from vmfork.errors import TooLarge, VmforkError, http_error
from vmfork.guest_files import MAX_FILE
from vmfork.guest_files import MAX_PATH as MAX_GUEST_PATH
from vmfork.results import ExecResult, OutputChunk
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
    idle_pause: float | None = Field(None, ge=0, description="pause it after this many "
                                     "seconds without use (exec, files, console); its next "
                                     "use resumes it. 0 or null: never")


class IdlePauseRequest(Body):
    seconds: float | None = Field(description="seconds without use before vmfork pauses it "
                                  "(its next use resumes it); 0 or null: never", ge=0)


class ExecRequest(Body):
    command: str = Field(max_length=65536)
    timeout: float | None = Field(default=None, gt=0)
    agent: str = "auto"


class UpdateRequest(Body):
    qemu: str | None = None
    mode: str = "auto"
    timeout: float | None = Field(default=None, gt=0)


def output_fields(key: str, raw: bytes) -> dict[str, str]:
    """*raw* output under *key* as text, with its bytes in base64 under
    ``KEY_base64`` when the text lost any (see the module docstring)."""
    text = raw.decode(errors="replace")
    if text.encode() == raw:
        return {key: text}
    return {key: text, f"{key}_base64": base64.b64encode(raw).decode()}


def exec_answer(r: ExecResult) -> dict[str, Any]:
    """The JSON answer of a command (see the module docstring)."""
    d: dict[str, Any] = {"exit_code": r.exit_code, "seconds": r.seconds}
    for key, text in (("stdout", r.stdout), ("stderr", r.stderr)):
        d.update(output_fields(key, text.encode(errors="surrogateescape")))
    return d


@router.get("")
async def list_vms(request: Request) -> list[dict[str, Any]]:
    """Every VM of the home, oldest first (as ``vmfork ls --json``)."""
    return [s.to_dict() for s in await state_of(request).host.ls()]


@router.post("", status_code=201)
async def run_vm(request: Request, body: RunRequest) -> dict[str, Any]:
    """Start a VM; answers once its guest is ready."""
    st = state_of(request)
    async with st.starts.slot(f"run {body.name}"):
        vm = await st.host.run(body.name, image=body.image, memory=body.memory, cpus=body.cpus,
                               kernel=body.kernel, initrd=body.initrd, append=body.append,
                               disks=body.disks, net=body.net,
                               ports=[(h, g) for h, g in body.ports],
                               persistent=body.persistent, accel=body.accel, ready=body.ready,
                               idle_pause=body.idle_pause)
    events.publish(st, "started", vm=body.name)
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


@router.put("/{name}/idle_pause")
async def set_vm_idle_pause(request: Request, name: str, body: IdlePauseRequest
                            ) -> dict[str, Any]:
    """Pause the VM after ``seconds`` without use; its next use resumes it."""
    host = state_of(request).host
    vm = await host.vm(name)
    await host.set_idle_pause(name, body.seconds)
    return (await vm.status()).to_dict()


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
    st = state_of(request)
    vm = await st.host.vm(name)
    async with st.starts.slot(f"update {name}"):
        report = await vm.update(qemu=b.qemu, mode=b.mode, timeout=b.timeout)
    events.publish(st, "updated", vm=name, mode=report.mode, pid=report.new_pid)
    return report.to_dict()


@router.post("/{name}/save")
async def save_vm(request: Request, name: str) -> dict[str, Any]:
    result = await (await state_of(request).host.vm(name)).save()
    events.publish(state_of(request), "saved", vm=name)
    return result.to_dict()


@router.post("/{name}/restore")
async def restore_vm(request: Request, name: str) -> dict[str, Any]:
    """Start a saved VM again."""
    st = state_of(request)
    vm = await st.host.vm(name)
    async with st.starts.slot(f"restore {name}"):
        result = await vm.restore()
    events.publish(st, "restored", vm=name, pid=result.pid)
    return result.to_dict()


class _Text:
    """One output stream of a streamed command, as NDJSON pieces: UTF-8 is
    decoded across the boundaries of its chunks."""

    def __init__(self, key: str) -> None:
        self.key = key
        self._decoder = codecs.getincrementaldecoder("utf-8")("surrogateescape")

    def piece(self, data: bytes, final: bool = False) -> dict[str, str] | None:
        text = self._decoder.decode(data, final)
        return output_fields(self.key, text.encode(errors="surrogateescape")) if text else None


def _line(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


@router.post("/{name}/exec/stream", response_class=StreamingResponse,
             responses={200: {"description": "NDJSON: output pieces, then the exit",
                              "content": {"application/x-ndjson": {}}}})
async def exec_stream_in_vm(request: Request, name: str, body: ExecRequest) -> StreamingResponse:
    """Run a shell command in the guest; its output as it comes (NDJSON)."""
    vm = await state_of(request).host.vm(name)
    stream = vm.exec_stream(body.command, timeout=body.timeout, agent=body.agent)
    await stream.start()

    async def lines() -> AsyncIterator[bytes]:
        texts = {"stdout": _Text("stdout"), "stderr": _Text("stderr")}
        try:
            async for event in stream:
                if isinstance(event, OutputChunk):
                    piece = texts[event.stream].piece(event.data)
                    if piece:
                        yield _line(piece)
                    continue
                for t in texts.values():
                    piece = t.piece(b"", final=True)
                    if piece:
                        yield _line(piece)
                yield _line(event.to_dict())
        except VmforkError as exc:
            code, _status = http_error(exc)
            yield _line({"error": {"code": code, "message": " ".join(str(exc).split())}})
        finally:
            await stream.close()
    return StreamingResponse(lines(), media_type="application/x-ndjson")


@router.get("/{name}/files", response_class=Response,
            responses={200: {"description": "The file's bytes",
                             "content": {"application/octet-stream": {
                                 "schema": {"type": "string", "format": "binary"}}}}})
async def get_file(request: Request, name: str,
                   path: str = Query(max_length=MAX_GUEST_PATH,
                                     description="Absolute path in the guest"),
                   agent: str = "auto") -> Response:
    """The bytes of a file in the guest (at most 16 MiB)."""
    vm = await state_of(request).host.vm(name)
    data = await vm.read_file(path, agent=agent)
    return Response(data, media_type="application/octet-stream")


async def _body(request: Request, what: str) -> bytes:
    """The request's body, refused with TooLarge over MAX_FILE bytes (by its
    Content-Length before any of it is read)."""
    too_large = TooLarge(f"{what}: more than {MAX_FILE} bytes (a file transfer moves at "
                         "most 16 MiB)")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > MAX_FILE:
        raise too_large
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > MAX_FILE:
            raise too_large
    return bytes(data)


@router.put("/{name}/files", openapi_extra={"requestBody": {
    "required": True, "content": {"application/octet-stream": {
        "schema": {"type": "string", "format": "binary"}}}}})
async def put_file(request: Request, name: str,
                   path: str = Query(max_length=MAX_GUEST_PATH,
                                     description="Absolute path in the guest"),
                   mode: str = Query("0644", pattern="^0?[0-7]{3,4}$",
                                     description="Permissions, octal"),
                   agent: str = "auto") -> dict[str, Any]:
    """Write the body's bytes to a file in the guest (at most 16 MiB), whole."""
    vm = await state_of(request).host.vm(name)
    data = await _body(request, path)
    return (await vm.write_file(path, data, mode=int(mode, 8), agent=agent)).to_dict()


__all__ = ["ExecRequest", "RunRequest", "UpdateRequest", "exec_answer", "output_fields",
           "router"]
