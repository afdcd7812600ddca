"""vmforkd, a real daemon process on a temporary socket, with real QEMU."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import signal
import ssl
import stat
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from vmfork import checkpoints, ports
from vmfork.guest_files import MAX_FILE
from vmfork.images.debian import DiskImage
from vmfork.service.openapi import COPY

from .conftest import VMFORK, Env, qemu_processes
from .daemon import Daemon, daemon, start_daemon, stop_daemon  # noqa: F401
from .foreign_images import PLAIN_APPEND

REPO = Path(__file__).resolve().parent.parent

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
    # save needs a VM whose memory file is on disk.
    assert error_of(daemon.post("/v1/vms/a/save")) == (409, "conflict")
    r = daemon.post("/v1/vms/a/update", json={"mode": "warp"})
    assert error_of(r) == (400, "invalid"), r.text
    assert daemon.http.delete("/v1/vms/a").status_code == 200


def test_update_save_and_restore_through_the_api(env: Env, daemon: Daemon) -> None:  # noqa: F811
    old_pid = run_demo(daemon, "p", persistent=True)["pid"]
    guest(daemon, "p", "echo kept > /root/mark")
    r = daemon.post("/v1/vms/p/update")
    assert r.status_code == 200, r.text
    assert r.json()["new_pid"] != old_pid
    r = daemon.post("/v1/vms/p/save")
    assert r.status_code == 200, r.text
    assert daemon.get("/v1/vms/p").json()["state"] == "saved"
    assert error_of(daemon.post("/v1/vms/p/exec", json={"command": "true"})) == (
        409, "conflict")
    r = daemon.post("/v1/vms/p/restore")
    assert r.status_code == 200, r.text
    assert guest(daemon, "p", "cat /root/mark") == "kept\n"
    assert daemon.http.delete("/v1/vms/p").status_code == 200


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


def test_files_up_and_down_through_the_serial_agent(env: Env, daemon: Daemon,  # noqa: F811
                                                   tmp_path: Path) -> None:
    assert run_demo(daemon, "a")["agent"] == "serial"
    check_files_both_ways(daemon, "a")
    # The same through the CLI, beside the daemon: vmfork cp.
    local = tmp_path / "local.bin"
    data = os.urandom(300_000) + bytes(range(256))
    local.write_bytes(data)
    local.chmod(0o751)
    env.cli("cp", str(local), "a:/root/cp.bin", check=True)
    assert guest(daemon, "a", "stat -c %a /root/cp.bin").strip() == "751"
    assert daemon.get("/v1/vms/a/files", params={"path": "/root/cp.bin"}).content == data
    env.cli("cp", "a:/root/cp.bin", str(tmp_path / "back.bin"), check=True)
    assert (tmp_path / "back.bin").read_bytes() == data
    p = subprocess.run([VMFORK, "cp", "a:/root/cp.bin", "-"], env=env.environ,
                       capture_output=True, timeout=120, check=True)
    assert p.stdout == data
    p = subprocess.run([VMFORK, "cp", "-", "a:/root/stdin.txt", "--mode", "600"],
                       env=env.environ, input=b"from stdin\n", capture_output=True,
                       timeout=120, check=True)
    assert guest(daemon, "a", "cat /root/stdin.txt; stat -c %a /root/stdin.txt") == \
        "from stdin\n600\n"
    refused = env.cli("cp", str(local), str(tmp_path / "x"))
    assert refused.returncode == 2 and "VM:/PATH" in refused.stderr
    refused = env.cli("cp", "a:/root/none", str(tmp_path / "x"))
    assert refused.returncode == 1 and "no such file" in refused.stderr


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


@pytest.mark.slow
@pytest.mark.debian
def test_files_up_and_down_through_qemu_guest_agent(env: Env, plain_debian: DiskImage) -> None:
    d = start_daemon(env)
    try:
        img = plain_debian
        st = run_demo(d, "deb", image=None, kernel=img.kernel, initrd=str(img.initrd),
                      append=PLAIN_APPEND, disks=[img.disk], memory="1G")
        assert st["agent"] == "qga"
        check_files_both_ways(d, "deb")
        with d.http.stream("POST", "/v1/vms/deb/exec/stream",
                           json={"command": "echo a; sleep 1; echo b >&2"}) as r:
            events = list(ndjson(r))
        assert events[:-1] == [{"stdout": "a\n"}, {"stderr": "b\n"}]
        assert events[-1]["exit_code"] == 0
        assert d.http.delete("/v1/vms/deb").status_code == 200
    finally:
        assert stop_daemon(d) == 0


# -- the contract ---------------------------------------------------------------------
def test_served_openapi_is_the_committed_copy(env: Env, daemon: Daemon) -> None:  # noqa: F811
    served = daemon.get("/openapi.json").json()
    committed = json.loads((REPO / COPY).read_text())
    assert served == committed, f"{COPY} is stale: run 'make openapi' and commit it"
    assert {"/v1/vms", "/v1/vms/{name}/files", "/v1/vms/{name}/exec/stream"} <= set(
        served["paths"])


# -- TCP, token, TLS --------------------------------------------------------------------
def serve_tcp(env: Env, *args: str, scheme: str = "http",
              verify: ssl.SSLContext | bool = True) -> tuple[subprocess.Popen[bytes], str]:
    """``vmfork serve ARGS`` on a free loopback port; its process and base URL,
    once it answers."""
    port = ports.free_port()
    log = env.home / "vmforkd-tcp.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen([VMFORK, "serve", "--listen", f"127.0.0.1:{port}", *args],
                                env=env.environ, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=out)
    url = f"{scheme}://127.0.0.1:{port}"
    end = time.monotonic() + 30
    while True:
        assert proc.poll() is None, log.read_text()
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{url}/v1/health", verify=verify, timeout=5).status_code == 200:
                return proc, url
        assert time.monotonic() < end, log.read_text()
        time.sleep(0.05)


def end(proc: subprocess.Popen[bytes]) -> int:
    proc.send_signal(signal.SIGTERM)
    return proc.wait(60)


def test_tcp_needs_the_bearer_token(env: Env, tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret-token-of-some-length\n")
    token.chmod(0o600)
    proc, url = serve_tcp(env, "--token-file", str(token))
    try:
        r = httpx.get(f"{url}/v1/vms")
        assert (r.status_code, r.json()["error"]["code"]) == (401, "unauthorized")
        r = httpx.get(f"{url}/v1/vms", headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401
        r = httpx.get(f"{url}/v1/vms",
                      headers={"Authorization": "Bearer s3cret-token-of-some-length"})
        assert (r.status_code, r.json()) == (200, [])
    finally:
        assert end(proc) == 0


def test_tcp_refuses_to_serve_without_a_private_token(env: Env, tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret-token-of-some-length\n")
    token.chmod(0o640)
    for args in (["--token-file", str(token)], []):
        p = env.cli("serve", "--listen", f"127.0.0.1:{ports.free_port()}", *args, timeout=60)
        assert p.returncode == 2, p.stderr
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("vmfork: error: "), p.stderr
    assert "0640" in env.cli("serve", "--listen", "127.0.0.1:1", "--token-file",
                             str(token)).stderr


@pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl to make a certificate")
def test_tls(env: Env, tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    token = tmp_path / "token"
    token.write_text("s3cret-token-of-some-length\n")
    token.chmod(0o600)
    trust = ssl.create_default_context(cafile=str(cert))
    proc, url = serve_tcp(env, "--token-file", str(token), "--tls-cert", str(cert),
                          "--tls-key", str(key), scheme="https", verify=trust)
    try:
        r = httpx.get(f"{url}/v1/vms", verify=trust,
                      headers={"Authorization": "Bearer s3cret-token-of-some-length"})
        assert (r.status_code, r.json()) == (200, [])
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{url.replace('https', 'http')}/v1/health", timeout=10)
    finally:
        assert end(proc) == 0


# -- the daemon's life and the CLI beside it ------------------------------------------
def test_cli_and_daemon_work_on_one_home_at_once(env: Env, daemon: Daemon) -> None:  # noqa: F811
    run_demo(daemon, "a")
    with ThreadPoolExecutor(4) as pool:
        by_api = pool.submit(run_demo, daemon, "d1")
        by_cli = pool.submit(env.cli, "run", "c1", "--demo", "--accel", "tcg", check=True)
        execs_api = pool.submit(lambda: [guest(daemon, "a", f"echo {i}") for i in range(10)])
        execs_cli = pool.submit(lambda: [env.cli("exec", "a", f"echo {i}", check=True).stdout
                                         for i in range(10)])
        by_api.result()
        by_cli.result()
        assert execs_api.result() == execs_cli.result() == [f"{i}\n" for i in range(10)]
    names = {"a", "d1", "c1"}
    assert {v["name"] for v in daemon.get("/v1/vms").json()} == names
    assert {v["name"] for v in json.loads(env.cli("ls", "--json", check=True).stdout)} == names
    assert guest(daemon, "c1", "echo from-api") == "from-api\n"
    assert env.cli("exec", "d1", "echo from-cli", check=True).stdout == "from-cli\n"
    assert daemon.http.delete("/v1/vms/c1").status_code == 200
    env.cli("stop", "d1", check=True)
    assert [v["name"] for v in daemon.get("/v1/vms").json()] == ["a"]


def test_sigterm_ends_the_daemon_and_the_vms_run_on(env: Env) -> None:
    d = start_daemon(env)
    pid = run_demo(d, "a")["pid"]
    assert stop_daemon(d) == 0
    assert not d.socket.exists()
    assert psutil.pid_exists(pid)
    assert env.cli("exec", "a", "echo still here", check=True).stdout == "still here\n"


def test_kill9_of_the_daemon_during_an_update(env: Env) -> None:
    # The daemon stalls in the update with the port forward released by the
    # old QEMU and not yet taken by the new one, and is killed there.
    stall = dataclasses.replace(env, environ={**env.environ,
                                              checkpoints.STALL_ENV: "update.port-released"})
    d = start_daemon(stall)
    try:
        run_demo(d, "a", ports=[[ports.free_port(), 80]])
        with ThreadPoolExecutor(1) as pool:
            inflight = pool.submit(d.post, "/v1/vms/a/update", {"mode": "ignore-shared"})
            end_at = time.monotonic() + 120
            while "stalling at update.port-released" not in d.log.read_text():
                assert not inflight.done(), inflight.result().text
                assert time.monotonic() < end_at, d.log.read_text()
                time.sleep(0.05)
            assert env.store().get_vm("a").info.update is not None
            d.kill9()
            with pytest.raises(httpx.TransportError):
                inflight.result()
    finally:
        if d.proc.poll() is None:
            d.kill9()
        d.http.close()
    # The VM is not the daemon's: it runs on; the next command settles the
    # update, and one QEMU, the VM's own, is left.
    assert env.cli("exec", "a", "echo ok", check=True).stdout == "ok\n"
    rec = env.store().get_vm("a")
    assert rec.state == "running" and rec.info.update is None
    assert [p.pid for p in qemu_processes(str(env.home))] == [rec.pid]
    # A new daemon serves the VM as it is.
    d = start_daemon(env)
    try:
        assert d.get("/v1/vms/a").json()["state"] == "running"
        assert guest(d, "a", "echo again") == "again\n"
        assert d.http.delete("/v1/vms/a").status_code == 200
    finally:
        assert stop_daemon(d) == 0
