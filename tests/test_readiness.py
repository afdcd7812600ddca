"""When ``vmfork run`` calls a guest ready (``--ready``), which agent then runs
its commands, and ``--net user|none``: on the demo guest, whose boot marker
and serial agent can be told apart from other signs."""

from __future__ import annotations

import asyncio
import json

import pytest

from vmfork import agents, vm
from vmfork.errors import VmforkTimeout
from vmfork.timeouts import Timeouts

from .conftest import Env, run

pytestmark = pytest.mark.qemu


def listed(env: Env) -> dict[str, dict[str, object]]:
    return {r["name"]: r for r in json.loads(env.cli("ls", "--json", check=True).stdout)}


def test_auto_is_ready_at_the_marker_and_knows_the_agent(env: Env) -> None:
    p = env.cli("run", "a", "--demo", "--accel", "tcg", "--json", check=True)
    st = json.loads(p.stdout)
    assert (st["ready"], st["agent"]) == ("auto", "serial")
    assert "VMFORK-READY" in (env.home / "run" / "a" / "console.log").read_text()
    assert env.cli("exec", "a", "echo hi", check=True).stdout == "hi\n"


def test_console_regex_and_an_agent_found_on_first_use(env: Env) -> None:
    # The demo guest prints this line after its marker, once its agent runs.
    p = env.cli("run", "a", "--demo", "--accel", "tcg", "--ready",
                "console:Please press Enter", "--json", check=True)
    st = json.loads(p.stdout)
    assert (st["ready"], st["agent"]) == ("console:Please press Enter", None)
    assert env.cli("exec", "a", "echo hi", check=True).stdout == "hi\n"
    assert listed(env)["a"]["agent"] == "serial"  # found by asking, then kept


def test_console_regex_that_never_matches_times_out_and_leaves_nothing(env: Env) -> None:
    opts = vm.RunOptions(name="a", demo=True, accel="tcg", ready="console:no such line")
    with pytest.raises(VmforkTimeout, match="a to boot"):
        run(vm.run(env.store(), opts, Timeouts(boot=15.0)))
    assert not env.store().has_vm("a")


def test_none_returns_once_qemu_runs(env: Env) -> None:
    p = env.cli("run", "a", "--demo", "--accel", "tcg", "--ready", "none", "--json",
                check=True)
    st = json.loads(p.stdout)
    assert (st["state"], st["ready"], st["agent"]) == ("running", "none", None)
    # Nothing was waited for: the console has no marker yet at that point,
    # or only just; the guest comes up on its own.
    for _ in range(60):
        p = env.cli("exec", "a", "echo up")
        if p.returncode == 0:
            break
        assert "has no agent" in p.stderr, p.stderr
    assert p.stdout == "up\n"


def test_tcp_waits_until_the_guest_port_accepts(env: Env) -> None:
    """The guest refuses port 80 until a server starts there (QEMU accepts
    on the host side and closes): run is ready only after that."""
    s = env.store()

    async def scenario() -> list[list[int]]:
        opts = vm.RunOptions(name="a", demo=True, accel="tcg", ready="tcp:80")
        task = asyncio.create_task(vm.run(s, opts))
        for _ in range(1200):
            if s.has_vm("a") and s.get_vm("a").pid:
                break
            await asyncio.sleep(0.1)
        rec = s.get_vm("a")
        assert rec.state == "starting" and rec.spec.net is not None
        # Once the guest's agent answers, the guest is up: still not ready.
        r = await agents.agent_for(s, rec).exec("echo up", timeout=120)
        assert r.stdout == "up\n"
        await asyncio.sleep(3)
        assert not task.done()
        await agents.agent_for(s, rec).exec("mkdir -p /www && httpd -h /www -p 80")
        st = await asyncio.wait_for(task, 60)
        return [list(p) for p in st.ports]
    forwards = run(scenario())
    assert [g for _h, g in forwards] == [80]  # a forward to port 80 was added
    assert listed(env)["a"]["ready"] == "tcp:80"


@pytest.mark.parametrize(("net", "nics"), [((), "lo\n"), (("--net",), "eth0\nlo\n"),
                                           (("--net", "user"), "eth0\nlo\n"),
                                           (("--net", "none"), "lo\n")])
def test_net_user_and_none(env: Env, net: tuple[str, ...], nics: str) -> None:
    env.cli("run", "a", "--demo", "--accel", "tcg", *net, check=True)
    assert env.cli("exec", "a", "ls /sys/class/net", check=True).stdout == nics


@pytest.mark.parametrize(("args", "needle"), [
    (("--ready", "sometime"), "invalid readiness 'sometime'"),
    (("--ready", "tcp:http"), "the port must be a number"),
    (("--ready", "console:("), "bad regular expression"),
    (("--net", "bridge"), "'bridge' is not one of"),
    (("--net", "none", "--port", "8080:80"), "use --net user, not --net none"),
    (("--net", "none", "--ready", "tcp:22"), "use --net user, not --net none"),
])
def test_bad_readiness_and_network_are_refused(env: Env, args: tuple[str, ...],
                                               needle: str) -> None:
    p = env.cli("run", "a", "--demo", "--accel", "tcg", *args)
    assert p.returncode == 2, p.stderr
    assert needle in p.stderr and p.stderr.count("\n") == 1, p.stderr
    assert not env.store().has_vm("a")
