"""vmforkd, a real daemon process on a temporary socket, with real QEMU."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from vmfork.guest_files import MAX_FILE

from .conftest import Env, qemu_processes
from .daemon import Daemon, daemon, start_daemon, stop_daemon  # noqa: F401

pytestmark = pytest.mark.qemu


def test_serves_a_private_socket_and_errors_as_json(env: Env, daemon: Daemon) -> None:  # noqa: F811
    assert stat.S_IMODE(daemon.socket.stat().st_mode) == 0o600
    assert daemon.get("/v1/vms").json() == []
    r = daemon.get("/v1/vms/nope")
    assert (r.status_code, r.json()) == (404, {"error": {"code": "not_found",
                                                         "message": "no VM named 'nope'"}})
    r = daemon.post("/v1/vms", json={"name": "a", "memory": "1P"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid"
    r = daemon.post("/v1/vms", json={"name": "a", "surprise": 1})
    assert r.status_code == 400 and "surprise" in r.json()["error"]["message"]


def test_run_exec_and_stop_a_vm(env: Env, daemon: Daemon) -> None:  # noqa: F811
    r = daemon.post("/v1/vms", json={"name": "a", "image": "demo", "accel": "tcg"})
    assert r.status_code == 201, r.text
    assert r.json()["state"] == "running"
    r = daemon.post("/v1/vms/a/exec", json={"command": "echo out; echo err >&2; exit 3"})
    assert r.json()["exit_code"] == 3
    assert (r.json()["stdout"], r.json()["stderr"]) == ("out\n", "err\n")
    # The CLI sees the daemon's VM, and the daemon the CLI's changes.
    assert json.loads(env.cli("ls", "--json", check=True).stdout)[0]["name"] == "a"
    env.cli("pause", "a", check=True)
    assert daemon.get("/v1/vms/a").json()["state"] == "paused"
    assert daemon.post("/v1/vms/a/resume").json()["state"] == "running"
    assert daemon.http.delete("/v1/vms/a").json() == {"name": "a", "state": "stopped"}
    assert daemon.get("/v1/vms").json() == []


# -- helpers ----------------------------------------------------------------------
def run_demo(d: Daemon, name: str, **extra: object) -> dict[str, Any]:
    r = d.post("/v1/vms", json={"name": name, "image": "demo", "accel": "tcg", **extra})
    assert r.status_code == 201, r.text
    body: dict[str, Any] = r.json()
    return body


def error_of(r: httpx.Response) -> tuple[int, str]:
    return r.status_code, r.json()["error"]["code"]


def guest(d: Daemon, name: str, command: str) -> str:
    r = d.post(f"/v1/vms/{name}/exec", json={"command": command})
    assert r.status_code == 200 and r.json()["exit_code"] == 0, r.text
    out: str = r.json()["stdout"]
    return out


# -- routes and their errors --------------------------------------------------------
def test_vm_routes_refuse_bad_requests(env: Env, daemon: Daemon) -> None:  # noqa: F811
    assert error_of(daemon.get("/v1/vms/Bad%20Name")) == (400, "invalid")
    assert error_of(daemon.post("/v1/vms", json=["not", "an", "object"])) == (400, "invalid")
    assert error_of(daemon.http.post("/v1/vms", content=b"{not json",
                                     headers={"content-type": "application/json"})) == (
        400, "invalid")
    assert error_of(daemon.post("/v1/vms/nope/exec", json={"command": "true"})) == (
        404, "not_found")
    assert error_of(daemon.post("/v1/vms/nope/exec", json={"command": "true", "timeout": -1})) \
        == (400, "invalid")
    for route in ("pause", "resume", "update", "save", "restore", "exec/stream"):
        body = {"command": "true"} if route == "exec/stream" else None
        assert error_of(daemon.post(f"/v1/vms/nope/{route}", json=body)) == (404, "not_found")
    assert error_of(daemon.get("/v1/vms/nope/files", params={"path": "/x"})) == (
        404, "not_found")
    assert error_of(daemon.http.delete("/v1/vms/nope")) == (404, "not_found")
    assert error_of(daemon.get("/v1/nothing-here")) == (404, "not_found")
    assert error_of(daemon.http.patch("/v1/vms")) == (405, "method_not_allowed")

    run_demo(daemon, "a")
    assert error_of(daemon.post("/v1/vms", json={"name": "a", "image": "demo",
                                                 "accel": "tcg"})) == (409, "exists")
    assert error_of(daemon.post("/v1/vms/a/resume")) == (409, "conflict")
    assert daemon.post("/v1/vms/a/pause").json()["state"] == "paused"
    assert error_of(daemon.post("/v1/vms/a/pause")) == (409, "conflict")
    assert error_of(daemon.post("/v1/vms/a/exec", json={"command": "true"})) == (
        409, "conflict")
    assert error_of(daemon.get("/v1/vms/a/files", params={"path": "/etc/hostname"})) == (
        409, "conflict")
    assert daemon.post("/v1/vms/a/resume").json()["state"] == "running"
    # save needs a persistent VM.
    assert daemon.post("/v1/vms/a/save").status_code in (400, 409)
    r = daemon.post("/v1/vms/a/update", json={"mode": "warp"})
    assert error_of(r) == (400, "invalid"), r.text
    assert daemon.http.delete("/v1/vms/a").status_code == 200


# -- files --------------------------------------------------------------------------
def check_files_both_ways(d: Daemon, name: str) -> None:
    """Binary files (every byte value, and random bytes) up and down, md5
    checked on the host and in the guest; the errors of the files routes."""
    data = bytes(range(256)) * 4096 + os.urandom(1 << 20) + bytes(range(255, -1, -1))
    md5 = hashlib.md5(data).hexdigest()
    r = d.http.put(f"/v1/vms/{name}/files", params={"path": "/root/blob.bin", "mode": "0600"},
                   content=data)
    assert r.status_code == 200, r.text
    assert (r.json()["path"], r.json()["size"]) == ("/root/blob.bin", len(data))
    assert guest(d, name, "md5sum /root/blob.bin").split()[0] == md5
    assert guest(d, name, "stat -c %a /root/blob.bin").strip() == "600"
    r = d.get(f"/v1/vms/{name}/files", params={"path": "/root/blob.bin"})
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/octet-stream"
    assert hashlib.md5(r.content).hexdigest() == md5
    # Replaced whole; empty files; no temporary file left beside it.
    assert d.http.put(f"/v1/vms/{name}/files", params={"path": "/root/blob.bin"},
                      content=b"").status_code == 200
    assert d.get(f"/v1/vms/{name}/files", params={"path": "/root/blob.bin"}).content == b""
    assert guest(d, name, "ls -a /root | grep -c vmfork || true").strip() == "0"
    # A file the guest wrote comes out byte for byte.
    guest(d, name, "printf '\\000\\377\\n\\r' > /root/g.bin")
    assert d.get(f"/v1/vms/{name}/files", params={"path": "/root/g.bin"}).content == \
        b"\x00\xff\n\r"

    files = f"/v1/vms/{name}/files"
    assert error_of(d.get(files, params={"path": "/root/none"})) == (404, "not_found")
    assert error_of(d.get(files, params={"path": "/root"})) == (400, "invalid")
    assert error_of(d.get(files, params={"path": "relative"})) == (400, "invalid")
    assert error_of(d.get(files)) == (400, "invalid")
    assert error_of(d.http.put(files, params={"path": "/no/such/dir/f"}, content=b"x")) == (
        404, "not_found")
    assert error_of(d.http.put(files, params={"path": "/root"}, content=b"x")) == (
        400, "invalid")
    assert error_of(d.http.put(files, params={"path": "/root/x", "mode": "999"},
                               content=b"x")) == (400, "invalid")
    r = d.http.put(files, params={"path": "/root/big"}, content=b"\0" * (MAX_FILE + 1))
    assert error_of(r) == (413, "too_large")
    guest(d, name, f"head -c {MAX_FILE + 1} /dev/zero > /root/big")
    r = d.get(files, params={"path": "/root/big"})
    assert error_of(r) == (413, "too_large")
    assert str(MAX_FILE + 1) in r.json()["error"]["message"]
    guest(d, name, "rm /root/big")


def test_files_up_and_down_through_the_serial_agent(env: Env, daemon: Daemon) -> None:  # noqa: F811
    assert run_demo(daemon, "a")["agent"] == "serial"
    check_files_both_ways(daemon, "a")


# -- streaming exec -------------------------------------------------------------------
def ndjson(r: httpx.Response) -> Iterator[dict[str, Any]]:
    for line in r.iter_lines():
        if line:
            yield json.loads(line)


def test_streamed_exec_delivers_output_while_the_command_runs(env: Env, daemon: Daemon) -> None:  # noqa: F811
    run_demo(daemon, "a")
    # 'second' can only be written after the client has read 'first' and
    # answered by creating /run/go through another request.
    command = ("echo first; echo warn >&2; i=0; "
               "while [ ! -e /run/go ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done; "
               "echo second; printf '\\377'; echo; exit 7")
    events: list[dict[str, Any]] = []
    with daemon.http.stream("POST", "/v1/vms/a/exec/stream",
                            json={"command": command, "timeout": 120}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("application/x-ndjson")
        lines = ndjson(r)
        for ev in lines:
            events.append(ev)
            if ev == {"stdout": "first\n"}:
                break
        assert "second" not in json.dumps(events)
        guest(daemon, "a", "touch /run/go")
        events.extend(lines)
    out = "".join(e.get("stdout", "") for e in events)
    assert out == "first\nsecond\n\ufffd\n"
    assert any("stdout_base64" in e for e in events)
    assert "".join(e.get("stderr", "") for e in events) == "warn\n"
    assert events[-1]["exit_code"] == 7 and events[-1]["seconds"] > 0
    assert guest(daemon, "a", "ls /run/vmfork-stream | wc -l").strip() == "0"

    # Past its timeout the command is killed, with everything it started.
    with daemon.http.stream("POST", "/v1/vms/a/exec/stream",
                            json={"command": "echo up; sleep 300 & sleep 301", "timeout": 2}) as r:
        events = list(ndjson(r))
    assert events[0] == {"stdout": "up\n"}
    assert events[-1]["error"]["code"] == "timeout"
    assert guest(daemon, "a", "ps | grep -c '[s]leep 30[01]$' || true").strip() == "0"
    assert guest(daemon, "a", "ls /run/vmfork-stream | wc -l").strip() == "0"

    # A client that leaves early ends the command too.
    with daemon.http.stream("POST", "/v1/vms/a/exec/stream",
                            json={"command": "echo up; exec sleep 302"}) as r:
        assert next(ndjson(r)) == {"stdout": "up\n"}
    end = time.monotonic() + 60
    while guest(daemon, "a", "ps | grep -c '[s]leep 302$' || true").strip() != "0":
        assert time.monotonic() < end, "the abandoned command still runs"
        time.sleep(0.2)
    daemon.http.delete("/v1/vms/a")


# -- admission ----------------------------------------------------------------------
def test_starts_beyond_the_limit_are_refused_whole(env: Env) -> None:
    d = start_daemon(env, "--max-starts", "2", "--start-queue", "0")
    try:
        names = [f"s{i}" for i in range(5)]

        def start(name: str) -> httpx.Response:
            with httpx.Client(transport=httpx.HTTPTransport(uds=str(d.socket)),
                              base_url="http://vmforkd", timeout=600) as c:
                return c.post("/v1/vms", json={"name": name, "image": "demo", "accel": "tcg"})
        with ThreadPoolExecutor(len(names)) as pool:
            answers = dict(zip(names, pool.map(start, names), strict=True))
        started = {n for n, r in answers.items() if r.status_code == 201}
        refused = {n for n, r in answers.items() if r.status_code == 429}
        assert started | refused == set(names), {n: r.text for n, r in answers.items()}
        assert refused and len(started) >= 2
        for n in refused:
            assert answers[n].headers["retry-after"].isdigit()
            assert answers[n].json()["error"]["code"] == "busy"
        # Nothing of a refused start exists; every started VM answers.
        assert {v["name"] for v in d.get("/v1/vms").json()} == started
        assert len(qemu_processes(str(env.home))) == len(started)
        for n in started:
            assert guest(d, n, "echo ok") == "ok\n"
        # Once the starts are done, a start is taken again.
        run_demo(d, "late")
        for n in [*started, "late"]:
            assert d.http.delete(f"/v1/vms/{n}").status_code == 200
    finally:
        assert stop_daemon(d) == 0
