"""Idle auto-pause (:mod:`vmfork.idle`): an unused VM is paused by the
watcher (``vmfork idle --keep``, or the daemon) and its next use resumes it
with the right clock; a use in progress is never paused under it."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time
from collections.abc import Iterator

import pytest

from vmfork import vm
from vmfork.cli.idle import parse_policy
from vmfork.errors import InvalidInput

from .conftest import VMFORK, Env, run
from .daemon import Daemon, daemon  # noqa: F401
from .test_admission import http_get, owner_of_listening_port
from .test_snapshot import kill9_at
from .test_update_forwards import serve


def listed(env: Env, name: str) -> dict[str, object]:
    rows = json.loads(env.cli("ls", "--json", check=True).stdout)
    row: dict[str, object] = next(r for r in rows if r["name"] == name)
    return row


def wait_for(what: str, cond: object, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.2)


@pytest.fixture
def watcher(env: Env) -> Iterator[subprocess.Popen[str]]:
    p = subprocess.Popen([VMFORK, "idle", "--keep"], env=env.environ, text=True,
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    yield p
    if p.poll() is None:
        p.kill()
        p.wait()


@pytest.mark.qemu
def test_idle_vm_is_paused_and_its_next_exec_resumes_it_with_the_right_clock(
        env: Env, watcher: subprocess.Popen[str]) -> None:
    env.cli("run", "a", "--demo", "--accel", "tcg", "--idle-pause", "2", check=True)
    assert listed(env, "a")["idle_pause"] == 2.0
    # A command that runs for longer than the policy is a use throughout.
    r = env.cli("exec", "a", "sleep 4; echo done", check=True)
    assert r.stdout == "done\n"
    wait_for("the idle pause", lambda: listed(env, "a")["idle"])
    assert run(vm.status(env.store(), "a")) == "paused"  # QEMU's own state
    row = listed(env, "a")
    assert row["state"] == "paused"
    assert "paused (idle)" in env.cli("ls", check=True).stdout
    time.sleep(8)  # the guest clock stands still meanwhile
    t0 = time.time()
    r = env.cli("exec", "a", "date +%s", check=True)
    # Unset, the guest clock would be behind by the >= 8 s it was paused.
    assert t0 - 1.5 <= int(r.stdout) <= time.time() + 1.5, (t0, r.stdout, time.time())
    assert not listed(env, "a")["idle"]
    # The watcher pauses it again; a file read wakes it too.
    wait_for("the second idle pause", lambda: listed(env, "a")["idle"])
    r = env.cli("cp", "a:/etc/machine-id", "-", check=True)
    assert len(r.stdout.strip()) == 32
    assert not listed(env, "a")["idle"]
    # A pause the user asked for is the user's: a use does not undo it.
    env.cli("pause", "a", check=True)
    r = env.cli("exec", "a", "true")
    assert r.returncode == 1 and "paused; resume it first" in r.stderr
    env.cli("resume", "a", check=True)
    env.cli("idle", "a", "off", check=True)
    assert listed(env, "a")["idle_pause"] is None
    watcher.send_signal(signal.SIGTERM)
    assert watcher.wait(timeout=30) == 0, watcher.stderr.read() if watcher.stderr else ""


@pytest.mark.qemu
def test_connection_to_a_forwarded_port_wakes_an_idle_vm(
        env: Env, watcher: subprocess.Popen[str]) -> None:
    port = serve(env, "w")
    url = f"http://127.0.0.1:{port}/"
    env.cli("idle", "w", "2", check=True)
    # A connection open through the forward is a use: no pause under it.
    with socket.create_connection(("127.0.0.1", port), timeout=10):
        time.sleep(6)
        assert not listed(env, "w")["idle"]
    wait_for("the idle pause", lambda: listed(env, "w")["idle"])
    # Meanwhile the watcher holds the port, and a connection wakes the VM
    # and gets the guest's answer.
    wait_for("the watcher on the port", lambda: owner_of_listening_port(port) == watcher.pid)
    assert http_get(url).strip() == "w"
    row = listed(env, "w")
    assert (row["state"], row["idle"]) == ("running", False)
    qemu = env.store().get_vm("w").pid
    wait_for("QEMU on the port again", lambda: owner_of_listening_port(port) == qemu)
    assert http_get(url).strip() == "w"
    # A watcher killed while the VM is paused leaves the port to nobody; the
    # VM's next use gives it back to QEMU.
    wait_for("the idle pause", lambda: listed(env, "w")["idle"])
    wait_for("the watcher on the port", lambda: owner_of_listening_port(port) == watcher.pid)
    watcher.kill()
    watcher.wait()
    assert owner_of_listening_port(port) is None
    env.cli("exec", "w", "true", check=True)
    assert owner_of_listening_port(port) == qemu
    assert http_get(url).strip() == "w"


@pytest.mark.qemu
@pytest.mark.parametrize("step", ["idle.recorded", "idle.paused"])
def test_watcher_killed_while_it_pauses_a_vm(env: Env, step: str) -> None:
    """Killed with the pause recorded (QEMU still running) or with QEMU
    paused and its forwards still in place: the next use wakes the VM, and
    its forwarded port answers."""
    port = serve(env, "k")
    env.cli("idle", "k", "1", check=True)
    kill9_at(env, step, "idle", "--keep")
    assert listed(env, "k")["idle"]
    assert env.cli("exec", "k", "echo up", check=True).stdout == "up\n"
    row = listed(env, "k")
    assert (row["state"], row["idle"]) == ("running", False)
    assert run(vm.status(env.store(), "k")) == "running"
    assert owner_of_listening_port(port) == env.store().get_vm("k").pid
    assert http_get(f"http://127.0.0.1:{port}/").strip() == "k"


@pytest.mark.qemu
def test_daemon_pauses_idle_clones_of_a_template_and_the_api_wakes_them(
        env: Env, daemon: Daemon) -> None:  # noqa: F811
    env.cli("template", "create", "t", "--demo", "--memory", "256M", "--accel", "tcg",
            "--idle-pause", "2", check=True)
    r = daemon.post("/v1/templates/t/clones", json={"count": 1, "max_starting": 0})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid", r.text
    r = daemon.post("/v1/templates/t/clones", json={"count": 1, "max_starting": 1})
    assert r.status_code == 201, r.text
    name = r.json()["clones"][0]["name"]
    assert daemon.get(f"/v1/vms/{name}").json()["idle_pause"] == 2.0
    wait_for("the idle pause", lambda: daemon.get(f"/v1/vms/{name}").json()["idle"])
    r = daemon.post(f"/v1/vms/{name}/exec", json={"command": "echo awake"})
    assert r.status_code == 200 and r.json()["stdout"] == "awake\n", r.text
    st = daemon.get(f"/v1/vms/{name}").json()
    assert (st["state"], st["idle"]) == ("running", False)
    r = daemon.http.put(f"/v1/vms/{name}/idle_pause", json={"seconds": 0})
    assert r.status_code == 200 and r.json()["idle_pause"] is None
    r = daemon.http.put("/v1/templates/t/idle_pause", json={"seconds": 0.5})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid"
    r = daemon.http.put("/v1/vms/none/idle_pause", json={"seconds": 5})
    assert r.status_code == 404
    assert daemon.http.delete(f"/v1/vms/{name}").status_code == 200
    assert daemon.http.delete("/v1/templates/t").status_code == 200


def test_idle_policy_input() -> None:
    assert parse_policy("off") is None and parse_policy("0") is None
    assert parse_policy("2.5") == 2.5
    for bad in ("-1", "nan", "inf", "soon"):
        with pytest.raises(InvalidInput, match="invalid idle pause"):
            parse_policy(bad)
    assert vm.check_idle_pause(None) is None and vm.check_idle_pause(0) is None
    for worse in (0.5, -3, True, "10"):
        with pytest.raises(InvalidInput, match="idle pause"):
            vm.check_idle_pause(worse)


def test_idle_cli_refuses_bad_input(env: Env) -> None:
    for args in (["idle", "nobody", "10"], ["idle", "x", "soon"], ["idle", "x"],
                 ["idle", "x", "--keep"], ["run", "a", "--demo", "--idle-pause", "0.2"]):
        p = env.cli(*args)
        assert p.returncode in (1, 2) and len(p.stderr.strip().splitlines()) == 1, (args, p)
    assert env.cli("idle", "nobody", "10").returncode == 1  # not found
    assert env.cli("idle", "x", "soon").returncode == 2
