"""The surfaces of a live fork: ``vmfork fork``, ``VM.fork`` in-process,
``POST /v1/vms/{name}/fork`` on a real vmforkd and ``RemoteVM.fork`` of its
client. Bad input is refused the same way everywhere before anything is
done (exit status 2, 400 ``invalid``, InvalidInput); one real fork through
the CLI and one through the daemon check that the children run with the
parent's data and an identity of their own, the parent runs on, and the
report survives its JSON. What a fork does inside is tests/test_fork*.py's."""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path

import httpx
import pytest

import vmfork
from vmfork.api.aio import fork_children
from vmfork.client.aio import AsyncRemoteVM
from vmfork.results import ForkChild, ForkReport

from .conftest import VMFORK, Env
from .daemon import Daemon, daemon  # noqa: F401
from .test_service_templates import EventReader, metric_value, poll


def vmfork_cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([VMFORK, *args], capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL,
                          env={"VMFORK_HOME": str(tmp_path / "home"), "PATH": "/usr/bin:/bin"})


# -- bad input, no VM needed ---------------------------------------------------------
@pytest.mark.parametrize(("args", "words"), [
    (("fork",), "Missing argument 'VM'"),
    (("fork", "p", "a", "-n", "2"), "1 name for 2 children"),
    (("fork", "p", "a", "b", "c", "--count", "2"), "3 names for 2 children"),
    (("fork", "p", "-n", "0"), "invalid fork count 0: must be 1-64"),
    (("fork", "p", "-n", "65"), "invalid fork count 65: must be 1-64"),
    (("fork", "p", "-n", "zwei"), "'zwei' is not a valid integer"),
    (("fork", "p", "bad/name"), "invalid VM name 'bad/name'"),
    (("fork", "p", "x", "x"), "child names given more than once: x"),
    (("fork", "Bad Name"), "invalid VM name 'Bad Name'"),
])
def test_fork_cli_refuses_bad_input(tmp_path: Path, args: tuple[str, ...], words: str) -> None:
    p = vmfork_cli(tmp_path, *args)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vmfork: error: "), p.stderr
    assert words in lines[0]
    assert p.stdout == ""


def test_fork_cli_of_an_unknown_vm(tmp_path: Path) -> None:
    p = vmfork_cli(tmp_path, "fork", "nosuchvm", "-n", "2")
    assert (p.returncode, p.stderr.strip()) == (1, "vmfork: error: no VM named 'nosuchvm'")
    assert "fork" in vmfork_cli(tmp_path, "--help").stdout


def test_fork_children_of_a_request() -> None:
    assert fork_children() == (1, None)
    assert fork_children(3) == (3, None)
    assert fork_children(names=["a", "b"]) == (2, ["a", "b"])
    assert fork_children(2, ("a", "b")) == (2, ["a", "b"])
    for count, names in ((0, None), (65, None), (None, []), (1, ["a", "b"]),
                         (None, ["a", "a"]), (None, ["_ok", "no/slash"]),
                         (None, [f"c{i}" for i in range(65)])):
        with pytest.raises(vmfork.InvalidInput):
            fork_children(count, names)


def test_in_process_fork_refuses_bad_input_before_looking(tmp_path: Path) -> None:
    with vmfork.open(tmp_path / "home", tmp_path / "mem") as host:
        vm = vmfork.VM(host, vmfork.AsyncVM(host._async, "nope"))
        with pytest.raises(vmfork.InvalidInput, match="fork count 0"):
            vm.fork(0)
        with pytest.raises(vmfork.InvalidInput, match="2 names for 1 child:"):
            vm.fork(1, names=["a", "b"])
        with pytest.raises(vmfork.NotFound, match="no VM named 'nope'"):
            vm.fork(names=["a"])


def error_of(r: httpx.Response) -> tuple[int, str]:
    return r.status_code, r.json()["error"]["code"]


def test_fork_route_refuses_bad_bodies(env: Env, daemon: Daemon) -> None:  # noqa: F811
    for body in ({"count": 0}, {"count": 65}, {"count": "two"}, {"names": []},
                 {"names": ["bad/name"]}, {"names": ["x" * 64]}, {"names": ["ok", 3]},
                 {"names": [f"c{i}" for i in range(65)]},
                 {"count": 2, "names": ["x"]}, {"names": ["x", "x"]},
                 {"on_clone": "x" * 65537}, {"surprise": 1}, ["not", "an", "object"]):
        r = daemon.post("/v1/vms/nope/fork", json=body)
        assert error_of(r) == (400, "invalid"), (body, r.text)
    r = daemon.post("/v1/vms/nope/fork", json={"count": 2, "names": ["x"]})
    assert "1 name for 2 children" in r.json()["error"]["message"]
    for body in (None, {}, {"count": 2}, {"names": ["k1"], "on_clone": "true"}):
        assert error_of(daemon.post("/v1/vms/nope/fork", json=body)) == (404, "not_found")
    assert error_of(daemon.post("/v1/vms/Bad%20Name/fork", json={})) == (400, "invalid")
    assert error_of(daemon.get("/v1/vms/nope/fork")) == (405, "method_not_allowed")

    # The client gets the same error classes.
    async def remote() -> None:
        async with vmfork.AsyncClient(daemon.socket) as host:
            vm = AsyncRemoteVM(host, "nope")
            with pytest.raises(vmfork.InvalidInput, match="count"):
                await vm.fork(0)
            with pytest.raises(vmfork.InvalidInput, match="1 name for 3 children"):
                await vm.fork(3, names=["a"])
            with pytest.raises(vmfork.NotFound, match="no VM named 'nope'"):
                await vm.fork()
    asyncio.run(remote())


# -- real forks ----------------------------------------------------------------------
def check_report(report: ForkReport, parent: str, children: list[str]) -> None:
    assert report.name == parent
    assert [c.name for c in report.children] == children
    assert all(isinstance(c, ForkChild) and c.pid > 0 for c in report.children)
    assert report.parent_pause_ms > 0 and report.parent_pid > 0
    assert len({report.parent_pid, *(c.pid for c in report.children)}) == len(children) + 1
    assert ForkReport.from_dict(report.to_dict()) == report
    assert ForkReport.from_dict(json.loads(json.dumps(report.to_dict()))) == report


@pytest.mark.qemu
def test_fork_through_the_cli(env: Env) -> None:
    env.cli("run", "p", "--demo", "--memory", "256M", "--accel", "tcg", check=True)
    env.exec("p", "echo before > /root/x")
    parent_host = env.exec("p", "hostname").strip()

    p = env.cli("fork", "p", "-n", "2", "--json", check=True)
    d = json.loads(p.stdout)
    report = ForkReport.from_dict(d)
    assert report.to_dict() == d
    check_report(report, "p", ["p-1", "p-2"])

    listed = {s["name"]: s for s in json.loads(env.cli("ls", "--json", check=True).stdout)}
    assert {n: listed[n]["state"] for n in ("p", "p-1", "p-2")} == dict.fromkeys(
        ("p", "p-1", "p-2"), "running")
    assert listed["p"]["pid"] == report.parent_pid
    assert [listed[c.name]["pid"] for c in report.children] == [c.pid for c in
                                                                 report.children]
    hosts = {parent_host}
    for child in ("p-1", "p-2"):
        assert env.exec(child, "cat /root/x") == "before\n"
        hosts.add(env.exec(child, "hostname").strip())
    assert len(hosts) == 3, hosts  # each child its own; the parent's unchanged
    assert env.exec("p", "hostname").strip() == parent_host
    env.exec("p-1", "echo mine > /root/x")
    assert env.exec("p", "cat /root/x") == env.exec("p-2", "cat /root/x") == "before\n"

    # The text output: the parent's line, then one line per child.
    p = env.cli("fork", "p", "solo", check=True)
    lines = p.stdout.splitlines()
    assert lines[0].startswith("p: forked into 1 child — paused "), p.stdout
    assert "captured" in lines[0] and "base copied" in lines[0]
    assert lines[1].startswith("solo: running (pid "), p.stdout
    assert env.exec("solo", "cat /root/x") == "before\n"
    for name in ("solo", "p-2", "p-1", "p"):
        env.cli("stop", name, check=True)
    assert json.loads(env.cli("ls", "--json", check=True).stdout) == []


@pytest.mark.qemu
def test_fork_through_the_daemon_and_its_client(env: Env, daemon: Daemon) -> None:  # noqa: F811
    reader = EventReader(daemon)
    try:
        with vmfork.Client(daemon.socket) as host:
            vm = host.run("p", image="demo", memory="256M", accel="tcg")
            vm.exec("echo before > /root/x")
            parent_host = vm.exec("hostname").stdout

            report = vm.fork(names=["k1", "k2"], on_clone="echo hooked > /root/hook")
            assert isinstance(report, ForkReport)
            check_report(report, "p", ["k1", "k2"])
            assert [c.hook_status for c in report.children] == [0, 0]

            statuses = {s.name: s for s in host.ls()}
            assert {n: s.state for n, s in statuses.items()} == dict.fromkeys(
                ("p", "k1", "k2"), "running")
            assert statuses["p"].pid == report.parent_pid
            for c in report.children:
                child = host.vm(c.name)
                assert child.status().pid == c.pid
                assert child.exec("cat /root/x /root/hook").stdout == "before\nhooked\n"
                assert child.exec("hostname").stdout != parent_host
            assert vm.exec("hostname").stdout == parent_host
            assert vm.exec("cat /root/x; test -e /root/hook || echo no hook").stdout == (
                "before\nno hook\n")

            # The answer is the report's JSON; the event and the metrics saw it.
            metrics = daemon.get("/metrics").text
            assert metric_value(metrics, "vmfork_fork_children_total") == 2
            assert metric_value(metrics, "vmfork_fork_parent_pause_seconds_count") == 1
            assert metric_value(
                metrics, 'vmfork_operations_total{op="fork",result="done"}') == 1
            forked = poll("the forked event",
                          lambda: [e for e in reader.events if e["kind"] == "forked"])
            assert [(e["vm"], e["children"], e["pid"]) for e in forked] == [
                ("p", ["k1", "k2"], report.parent_pid)]

            # Without names: the next free p-k, as the CLI picks them.
            one = vm.fork()
            assert [c.name for c in one.children] == ["p-1"]
            for name in ("p-1", "k2", "k1", "p"):
                host.vm(name).stop()
            assert host.ls() == []
    finally:
        reader.close()
