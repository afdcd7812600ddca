"""vmforkd, a real daemon process on a temporary socket, with real QEMU."""

from __future__ import annotations

import json
import stat

import pytest

from .conftest import Env
from .daemon import Daemon, daemon  # noqa: F401

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
