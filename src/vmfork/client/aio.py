"""The asyncio flavour of vmfork's REST client: :class:`AsyncClient` and its
remote handles :class:`AsyncRemoteVM`, :class:`AsyncRemoteClone` and
:class:`AsyncRemoteTemplate`.

They have the names, arguments and results of the in-process API
(:class:`vmfork.AsyncHost`, :class:`vmfork.AsyncVM`,
:class:`vmfork.AsyncTemplate`): each method is one request to vmforkd
(:mod:`vmfork.service`), and its answer is rebuilt into the same
:mod:`vmfork.results` dataclass (``from_dict``). An error answer
``{"error": {"code", "message"}}`` is raised as the :class:`VmforkError`
subclass of its code (:func:`vmfork.errors.error_from`); when no daemon
answers at all, :class:`~vmfork.errors.DaemonUnreachable`. A handle is a
name and its client, like the in-process ones: it holds no state of the VM.

What only makes sense on the daemon's host is not offered remotely: the
console socket, exporting or importing snapshot files by host path,
building images, :meth:`~vmfork.AsyncTemplate.keep_pool` (the daemon keeps
its pools: :meth:`AsyncRemoteTemplate.pool` sets the target).
"""

from __future__ import annotations

import base64
import contextlib
import json
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, overload
from urllib.parse import quote

import httpx

from vmfork.errors import (
    DaemonUnreachable,
    InvalidInput,
    NotFound,
    VmforkError,
    VmforkTimeout,
    error_from,
)
from vmfork.records import TemplateManifest
from vmfork.results import (
    CloneResult,
    ExecExit,
    ExecResult,
    ForkReport,
    OutputChunk,
    PoolStatus,
    RestoreResult,
    Result,
    SaveResult,
    TemplateStatus,
    UpdateReport,
    VMStatus,
)

#: Seconds to wait for a connection to the daemon.
CONNECT_SECONDS = 10.0
#: Seconds to wait for an answer by default: the daemon's own deadlines end
#: each operation first (a boot under TCG, a template build take minutes).
ANSWER_SECONDS = 900.0
#: Seconds an answer of ``exec`` may take beyond the command's own timeout.
EXEC_MARGIN = 60.0
#: The daemon's socket in a vmfork home.
SOCKET_NAME = "vmforkd.sock"
#: The host name of requests on a UNIX socket (it is not resolved).
_UNIX_BASE = "http://vmforkd"


def _path(*parts: str) -> str:
    return "/v1/" + "/".join(quote(p, safe="") for p in parts)


def read_token_file(path: Path | str) -> str:
    """The bearer token in the file *path* (its first line)."""
    try:
        token = Path(path).read_text().strip()
    except OSError as exc:
        raise InvalidInput(f"cannot read token file {str(path)!r}: {exc.strerror}") from None
    if not token or any(c.isspace() for c in token):
        raise InvalidInput(f"token file {str(path)!r} holds no usable token")
    return token


def exec_result(d: dict[str, Any]) -> ExecResult:
    """The :class:`ExecResult` of an exec answer: ``stdout_base64`` and
    ``stderr_base64``, where the daemon sends them (output that is not
    UTF-8), give back the exact bytes, decoded as the in-process API does."""
    text = {}
    for key in ("stdout", "stderr"):
        raw = d.get(f"{key}_base64")
        text[key] = (base64.b64decode(raw).decode(errors="surrogateescape")
                     if isinstance(raw, str) else str(d.get(key, "")))
    return ExecResult(int(d["exit_code"]), text["stdout"], text["stderr"],
                      float(d.get("seconds", 0.0)))


def _template_parts(d: Any) -> tuple[TemplateStatus | None, TemplateManifest | None]:
    """The status and the manifest in a template answer: either one of them,
    or both as ``{"status": {...}, "manifest": {...}}``."""
    if not isinstance(d, dict):
        return None, None
    status = manifest = None
    if isinstance(d.get("manifest"), dict):
        manifest = TemplateManifest.from_dict(d["manifest"])
    elif "source_vm" in d:
        manifest = TemplateManifest.from_dict(d)
    if isinstance(d.get("status"), dict):
        status = TemplateStatus.from_dict(d["status"])
    elif "state_kib" in d:
        status = TemplateStatus.from_dict(d)
    return status, manifest


class AsyncClient:
    """vmforkd at *socket_or_url*: a UNIX socket path (``unix:PATH`` too), or
    ``http://HOST:PORT`` / ``https://HOST:PORT``; None is the daemon of
    ``$VMFORK_HOME`` (``$VMFORK_HOME/vmforkd.sock``).

    *token* (or the first line of *token_file*) is sent as
    ``Authorization: Bearer``; TCP daemons need one. *timeout* bounds the
    wait for each answer (``exec`` waits for its own timeout more); *verify*
    is httpx's TLS verification (a CA bundle path, or False).

    Use ``async with vmfork.AsyncClient(path) as host:``; :meth:`close`
    closes the connections. The methods are those of
    :class:`vmfork.AsyncHost`; VMs and templates belong to the daemon's home.
    """

    def __init__(self, socket_or_url: Path | str | None = None, token: str | None = None, *,
                 token_file: Path | str | None = None, timeout: float = ANSWER_SECONDS,
                 verify: str | bool = True) -> None:
        if token is not None and token_file is not None:
            raise InvalidInput("give token or token_file, not both")
        if token_file is not None:
            token = read_token_file(token_file)
        address = str(socket_or_url) if socket_or_url is not None else None
        if address is None:
            from vmfork.store import default_home
            address = str(default_home() / SOCKET_NAME)
        if address.startswith(("http://", "https://")):
            self.address = address.rstrip("/")
        else:
            self.address = address.removeprefix("unix:")
        self.timeout = timeout
        self._token = token
        self._verify = verify
        self._http = self.connection()

    def connection(self, timeout: float | None = None) -> httpx.AsyncClient:
        """A new httpx client of the daemon (its address, TLS verification and
        token), on connections of its own: for raw requests whose status and
        headers the caller reads itself (``vmfork bench api`` fires concurrent
        requests, each on its own connection). The caller closes it."""
        if self.address.startswith(("http://", "https://")):
            transport = httpx.AsyncHTTPTransport(verify=self._verify)
            base_url = self.address
        else:
            transport = httpx.AsyncHTTPTransport(uds=self.address)
            base_url = _UNIX_BASE
        headers = {"Authorization": f"Bearer {self._token}"} if self._token else {}
        return httpx.AsyncClient(
            transport=transport, base_url=base_url, headers=headers,
            timeout=httpx.Timeout(timeout or self.timeout, connect=CONNECT_SECONDS))

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.address}>"

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the connections to the daemon (its VMs keep running)."""
        await self._http.aclose()

    # -- requests ---------------------------------------------------------------
    @contextlib.contextmanager
    def _transport_errors(self, method: str, path: str, seconds: float) -> Iterator[None]:
        """httpx's transport failures as vmfork errors."""
        what = f"{method} {path}"
        try:
            yield
        except httpx.ConnectTimeout as exc:
            raise DaemonUnreachable(f"no vmforkd answers on {self.address}: connecting "
                                    f"timed out after {CONNECT_SECONDS:g} s") from exc
        except httpx.TimeoutException as exc:
            raise VmforkTimeout(f"vmforkd's answer to {what}", seconds) from exc
        except httpx.ConnectError as exc:
            raise DaemonUnreachable(f"no vmforkd answers on {self.address} (start it with "
                                    f"vmfork serve): {exc}") from exc
        except httpx.TransportError as exc:
            raise DaemonUnreachable(f"vmforkd on {self.address} ended the connection before "
                                    f"it answered {what} (did it stop?): {exc}") from exc

    @staticmethod
    def _error(r: httpx.Response) -> VmforkError:
        """The error that the error answer *r* names."""
        try:
            e = r.json()["error"]
            code, message = str(e["code"]), str(e["message"])
        except (ValueError, KeyError, TypeError):
            return VmforkError(f"vmforkd answered {r.status_code} {r.reason_phrase}: "
                               f"{' '.join(r.text.split())[:200]}")
        return error_from(code, message)

    async def _request(self, method: str, path: str, *, json: Any = None,
                       params: dict[str, str] | None = None, content: bytes | None = None,
                       timeout: float | None = None) -> httpx.Response:
        seconds = max(self.timeout, timeout or 0.0)
        with self._transport_errors(method, path, seconds):
            r = await self._http.request(
                method, path, json=json, params=params, content=content,
                timeout=httpx.Timeout(seconds, connect=CONNECT_SECONDS))
        if r.status_code >= 400:
            raise self._error(r)
        return r

    async def _json(self, method: str, path: str, **kw: Any) -> Any:
        r = await self._request(method, path, **kw)
        try:
            return r.json()
        except ValueError:
            raise VmforkError(f"vmforkd answered {method} {path} with no JSON: "
                              f"{' '.join(r.text.split())[:200]}") from None

    @contextlib.asynccontextmanager
    async def _stream(self, method: str, path: str, *, json: Any = None,
                      params: dict[str, str] | None = None,
                      timeout: float | None = None) -> AsyncIterator[httpx.Response]:
        """An answer to read as it arrives (errors as :meth:`_request`)."""
        seconds = max(self.timeout, timeout or 0.0)
        with self._transport_errors(method, path, seconds):
            async with self._http.stream(
                    method, path, json=json, params=params,
                    timeout=httpx.Timeout(seconds, connect=CONNECT_SECONDS)) as r:
                if r.status_code >= 400:
                    await r.aread()
                    raise self._error(r)
                yield r

    async def health(self) -> dict[str, Any]:
        """``GET /v1/health``: answers as soon as the daemon serves."""
        d: dict[str, Any] = await self._json("GET", _path("health"))
        return d

    # -- VMs --------------------------------------------------------------------
    async def run(self, name: str, *, image: str | None = None, memory: str | int = "256M",
                  cpus: int = 1, kernel: str | None = None, initrd: str | None = None,
                  append: str | None = None, disks: Sequence[str] = (),
                  net: str | bool | None = None, ports: Sequence[tuple[int, int]] = (),
                  persistent: bool = False, accel: str = "auto",
                  ready: str = "auto", idle_pause: float | None = None) -> AsyncRemoteVM:
        """Start VM *name* on the daemon's host and return once its guest is
        ready (see :meth:`vmfork.AsyncHost.run`; paths are the daemon's)."""
        if isinstance(net, bool):
            net = "user" if net else "none"
        body = {"name": name, "image": image, "memory": memory, "cpus": cpus,
                "kernel": kernel, "initrd": initrd, "append": append, "disks": list(disks),
                "net": net, "ports": [list(p) for p in ports], "persistent": persistent,
                "accel": accel, "ready": ready, "idle_pause": idle_pause}
        status = VMStatus.from_dict(await self._json("POST", _path("vms"), json=body))
        return AsyncRemoteVM(self, name, status)

    async def set_idle_pause(self, name: str, seconds: float | None) -> str:
        """See :meth:`vmfork.AsyncHost.set_idle_pause`."""
        body = {"seconds": seconds}
        try:
            await self._json("PUT", _path("vms", name, "idle_pause"), json=body)
            return "vm"
        except NotFound:
            await self._json("PUT", _path("templates", name, "idle_pause"), json=body)
            return "template"

    async def vm(self, name: str) -> AsyncRemoteVM:
        """The VM *name* (NotFound if there is none)."""
        await self._json("GET", _path("vms", name))
        return AsyncRemoteVM(self, name)

    async def vms(self) -> list[AsyncRemoteVM]:
        """Every VM of the daemon's home, oldest first."""
        return [AsyncRemoteVM(self, s.name) for s in await self.ls()]

    async def ls(self) -> list[VMStatus]:
        """Every VM's status (``vmfork ls``)."""
        return [VMStatus.from_dict(d) for d in await self._json("GET", _path("vms"))]

    # -- templates --------------------------------------------------------------
    async def template(self, name: str) -> AsyncRemoteTemplate:
        """The template *name* (NotFound if there is none)."""
        await self._json("GET", _path("templates", name))
        return AsyncRemoteTemplate(self, name)

    async def templates(self) -> list[AsyncRemoteTemplate]:
        """Every template of the daemon's home, oldest first."""
        return [AsyncRemoteTemplate(self, d["name"])
                for d in await self._json("GET", _path("templates"))]

    async def create_template(self, name: str, *, image: str = "demo",
                              memory: str | int = "512M", prepare: str | None = None,
                              accel: str = "auto",
                              on_clone: str | None = None) -> AsyncRemoteTemplate:
        """Boot *image*, run *prepare* in the guest, and freeze it into template
        *name* (see :meth:`vmfork.AsyncHost.create_template`)."""
        body: dict[str, Any] = {"name": name, "image": image, "memory": memory,
                                "prepare": prepare}
        if accel != "auto":
            body["accel"] = accel
        if on_clone is not None:
            body["on_clone"] = on_clone
        answer = await self._json("POST", _path("templates"), json=body)
        return AsyncRemoteTemplate(self, name, _template_parts(answer)[1])


def stream_event(d: dict[str, Any]) -> OutputChunk | ExecExit:
    """One NDJSON line of a streamed command as the in-process API gives it."""
    if "error" in d:
        err = d["error"]
        raise error_from(str(err.get("code", "error")), str(err.get("message", "")))
    for key in ("stdout", "stderr"):
        if key in d:
            raw = (base64.b64decode(d[f"{key}_base64"]) if f"{key}_base64" in d
                   else str(d[key]).encode())
            return OutputChunk(key, raw)
    return ExecExit(int(d["exit_code"]), float(d.get("seconds", 0.0)))


class RemoteStream:
    """A command streamed by the daemon (``async with`` it, then ``async for``
    its events); leaving early closes the answer, which ends the command."""

    def __init__(self, answer: contextlib.AbstractAsyncContextManager[httpx.Response]) -> None:
        self._answer = answer
        self._response: httpx.Response | None = None

    async def start(self) -> None:
        self._response = await self._answer.__aenter__()

    async def close(self) -> None:
        if self._response is not None:
            self._response = None
            await self._answer.__aexit__(None, None, None)

    async def __aenter__(self) -> RemoteStream:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    async def __aiter__(self) -> AsyncIterator[OutputChunk | ExecExit]:
        if self._response is None:
            await self.start()
        assert self._response is not None
        async for line in self._response.aiter_lines():
            if line.strip():
                yield stream_event(json.loads(line))


class AsyncRemoteVM:
    """A handle on one VM of the daemon: its name and its client.
    :attr:`result` is the result of the call that returned the handle (the
    run's :class:`VMStatus`; None from :meth:`AsyncClient.vm`)."""

    def __init__(self, host: AsyncClient, name: str, result: Result | None = None) -> None:
        self.host = host
        self.name = name
        self.result = result

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"

    async def __aenter__(self) -> AsyncRemoteVM:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        """Leaving ``async with`` stops the VM (it may be gone already)."""
        with contextlib.suppress(NotFound):
            await self.stop()

    def _path(self, *parts: str) -> str:
        return _path("vms", self.name, *parts)

    async def status(self) -> VMStatus:
        """The VM as the daemon's catalog and host see it now."""
        return VMStatus.from_dict(await self.host._json("GET", self._path()))

    def _exec_body(self, command: str, timeout: float | None, agent: str) -> dict[str, Any]:
        body: dict[str, Any] = {"command": command}
        if timeout is not None:
            body["timeout"] = timeout
        if agent != "auto":
            body["agent"] = agent
        return body

    async def exec(self, command: str, *, timeout: float | None = None,
                   agent: str = "auto") -> ExecResult:
        """Run the shell *command* in the guest; stdout, stderr, exit code
        (see :meth:`vmfork.AsyncVM.exec`)."""
        wait = None if timeout is None else timeout + EXEC_MARGIN
        d = await self.host._json("POST", self._path("exec"),
                                  json=self._exec_body(command, timeout, agent), timeout=wait)
        return exec_result(d)

    def exec_stream(self, command: str, *, timeout: float | None = None,
                    agent: str = "auto") -> RemoteStream:
        """The shell *command*, to run in the guest with its output read while
        it runs (``POST /v1/vms/NAME/exec/stream``), as in-process:
        ``async with vm.exec_stream(cmd) as s: async for ev in s`` gives
        :class:`~vmfork.results.OutputChunk` events and, last, an
        :class:`~vmfork.results.ExecExit`."""
        wait = None if timeout is None else timeout + EXEC_MARGIN
        return RemoteStream(self.host._stream("POST", self._path("exec", "stream"),
                                              json=self._exec_body(command, timeout, agent),
                                              timeout=wait))

    async def pause(self) -> None:
        await self.host._json("POST", self._path("pause"))

    async def resume(self) -> None:
        await self.host._json("POST", self._path("resume"))

    async def stop(self, *, force: bool = False) -> None:
        """End the VM's QEMU and remove the VM with its files."""
        await self.host._json("DELETE", self._path(),
                              params={"force": "true"} if force else None)

    async def update(self, *, qemu: str | None = None, mode: str = "auto",
                     timeout: float | None = None) -> UpdateReport:
        """Move the running guest into a new QEMU process (rolls back on failure)."""
        body: dict[str, Any] = {"qemu": qemu, "mode": mode, "timeout": timeout}
        wait = None if timeout is None else timeout + EXEC_MARGIN
        return UpdateReport.from_dict(await self.host._json("POST", self._path("update"),
                                                            json=body, timeout=wait))

    async def fork(self, count: int | None = None, *, names: Sequence[str] | None = None,
                   on_clone: str | None = None) -> ForkReport:
        """Branch this running VM into *count* children (or one per name of
        *names*) that start from its state at one instant; it keeps running
        (``POST /v1/vms/NAME/fork``; see :meth:`vmfork.AsyncVM.fork`). The
        children are VMs of the daemon: ``host.vm(child.name)``."""
        body: dict[str, Any] = {}
        if count is not None:
            body["count"] = count
        if names is not None:
            body["names"] = list(names)
        if on_clone is not None:
            body["on_clone"] = on_clone
        return ForkReport.from_dict(await self.host._json("POST", self._path("fork"),
                                                          json=body))

    async def save(self) -> SaveResult:
        """Write the device state of a persistent VM; its QEMU ends."""
        return SaveResult.from_dict(await self.host._json("POST", self._path("save")))

    async def restore(self) -> RestoreResult:
        """Start a saved VM again from its memory file and device state."""
        return RestoreResult.from_dict(await self.host._json("POST", self._path("restore")))

    async def read_file(self, path: str) -> bytes:
        """The bytes of the guest file *path* (through the guest agent)."""
        r = await self.host._request("GET", self._path("files"), params={"path": path})
        return r.content

    async def write_file(self, path: str, data: bytes) -> None:
        """Write *data* to the guest file *path* (through the guest agent)."""
        await self.host._request("PUT", self._path("files"), params={"path": path},
                                 content=bytes(data))

    async def make_template(self, name: str, *,
                            on_clone: str | None = None) -> AsyncRemoteTemplate:
        """Freeze this VM into template *name*; the VM ends."""
        body: dict[str, Any] = {"name": name, "from_vm": self.name}
        if on_clone is not None:
            body["on_clone"] = on_clone
        answer = await self.host._json("POST", _path("templates"), json=body)
        return AsyncRemoteTemplate(self.host, name, _template_parts(answer)[1])


class AsyncRemoteClone(AsyncRemoteVM):
    """A VM just cloned from a template; :attr:`result` has its timings."""

    result: CloneResult

    def __init__(self, host: AsyncClient, result: CloneResult) -> None:
        super().__init__(host, result.name, result)


class AsyncRemoteTemplate:
    """A handle on one template of the daemon: its name and its client.
    :attr:`result` is the manifest when the call that returned the handle
    made the template (and the daemon sent it)."""

    def __init__(self, host: AsyncClient, name: str,
                 result: TemplateManifest | None = None) -> None:
        self.host = host
        self.name = name
        self.result = result

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"

    def _path(self, *parts: str) -> str:
        return _path("templates", self.name, *parts)

    async def inspect(self) -> TemplateManifest:
        """The template's manifest."""
        manifest = _template_parts(await self.host._json("GET", self._path()))[1]
        if manifest is None:
            raise VmforkError(f"vmforkd sent no manifest of template {self.name!r}")
        return manifest

    async def status(self) -> TemplateStatus:
        """The template as ``vmfork template ls`` shows it."""
        status = _template_parts(await self.host._json("GET", self._path()))[0]
        if status is None:
            listed = [d for d in await self.host._json("GET", _path("templates"))
                      if d.get("name") == self.name]
            if not listed:
                raise NotFound(f"no template named {self.name!r}")
            status = TemplateStatus.from_dict(listed[0])
        return status

    async def clones(self) -> list[AsyncRemoteVM]:
        """The VMs cloned from this template that exist now."""
        await self.host._json("GET", self._path())
        return [AsyncRemoteVM(self.host, s.name) for s in await self.host.ls()
                if s.template == self.name]

    @overload
    async def clone(self, count: None = None, *, name: str | None = None,
                    names: Sequence[str] | None = None, use_pool: bool = True,
                    on_clone: str | None = None, all_or_nothing: bool = False,
                    max_starting: int | None = None) -> AsyncRemoteClone: ...

    @overload
    async def clone(self, count: int, *, name: str | None = None,
                    names: Sequence[str] | None = None, use_pool: bool = True,
                    on_clone: str | None = None, all_or_nothing: bool = False,
                    max_starting: int | None = None) -> list[AsyncRemoteClone]: ...

    async def clone(self, count: int | None = None, *, name: str | None = None,
                    names: Sequence[str] | None = None, use_pool: bool = True,
                    on_clone: str | None = None, all_or_nothing: bool = False,
                    max_starting: int | None = None) -> AsyncRemoteClone | list[AsyncRemoteClone]:
        """Start clones of this template (see :meth:`vmfork.AsyncTemplate.clone`):
        one clone without *count*, else a list of *count*; *name* names them
        (``NAME-1``.. with *count*), or *names* one by one."""
        n = 1 if count is None else count
        if names is not None and name:
            raise InvalidInput("give either name or names, not both")
        body: dict[str, Any] = {"count": n}
        if names is not None:
            body["names"] = list(names)
        elif name:
            body["names"] = [name] if count is None else [f"{name}-{i}" for i in range(1, n + 1)]
        if on_clone is not None:
            body["on_clone"] = on_clone
        if not use_pool:
            body["use_pool"] = False
        if all_or_nothing:
            body["all_or_nothing"] = True
        if max_starting is not None:
            body["max_starting"] = max_starting
        answer = await self.host._json("POST", self._path("clones"), json=body)
        if isinstance(answer, dict):
            answer = answer.get("clones", [])
        clones = [AsyncRemoteClone(self.host, CloneResult.from_dict(d)) for d in answer]
        return clones[0] if count is None else clones

    async def pool(self, size: int | None = None, *, warm: bool | None = None) -> PoolStatus:
        """Set the pool's target (*size*, *warm*; None keeps each), which the
        daemon keeps filled; return its status. Without arguments: only the
        status."""
        status = PoolStatus.from_dict(await self.host._json("GET", self._path("pool")))
        if size is None and warm is None:
            return status
        body = {"size": status.target if size is None else size,
                "warm": status.warm if warm is None else warm}
        return PoolStatus.from_dict(await self.host._json("PUT", self._path("pool"),
                                                          json=body))

    async def remove(self, *, force: bool = False) -> None:
        """Remove the template and its files (refused while clones or pool
        members use it; *force* stops them first)."""
        await self.host._json("DELETE", self._path(),
                              params={"force": "true"} if force else None)


__all__ = ["AsyncClient", "AsyncRemoteClone", "AsyncRemoteTemplate", "AsyncRemoteVM",
           "exec_result", "read_token_file"]
