"""The public API, used as a user would: only ``import vmfork``.

Real QEMU and the demo guest; the ``env`` fixture gives each test its own
home and fails it if a QEMU process, socket or memory file is left."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import vmfork

from .conftest import Env, qemu_processes

README = Path(__file__).parent.parent / "README.md"


def readme_example() -> str:
    text = README.read_text()
    section = text.split("## Python API", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "no Python example in the README's Python API section"
    return match.group(1)


@pytest.mark.qemu
def test_readme_example_runs_as_written(env: Env) -> None:
    p = subprocess.run([sys.executable, "-c", readme_example()], env=env.environ,
                       capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert p.returncode == 0, p.stderr
    names, tpls = p.stdout.splitlines()[1].split("] [")
    assert "base-1" in names and "base-3" in names and "base" in tpls
    with vmfork.open() as host:
        assert host.vms() == [] and host.templates() == []


@pytest.mark.qemu
def test_sync_api(env: Env) -> None:
    with vmfork.open() as host:
        assert host.home == env.home
        vm = host.run("a", image="demo", memory="256M", accel="tcg")
        r = vm.exec("echo out; echo err >&2; exit 3")
        assert (r.exit_code, r.stdout, r.stderr) == (3, "out\n", "err\n")
        assert json.loads(json.dumps(r.to_dict()))["stderr"] == "err\n"
        vm.exec("echo data > /root/x")
        vm.pause()
        assert vm.status().state == "paused"
        vm.resume()
        st = vm.status()
        assert (st.name, st.state, st.memory_mib, st.accel) == ("a", "running", 256, "tcg")
        tpl = vm.make_template("t")
        assert isinstance(tpl, vmfork.Template) and tpl.name == "t"
        with pytest.raises(vmfork.NotFound):
            host.vm("a")  # the VM became the template
        with tpl.clone() as c:
            assert c.name == "t-1" and c.result.running > 0
            assert c.exec("cat /root/x").stdout == "data\n"
            pid = c.status().pid
            assert pid is not None and [p.pid for p in qemu_processes(str(env.home))] == [pid]
        assert host.vms() == [] and qemu_processes(str(env.home)) == []
        clones = tpl.clone(count=2, name="c")
        assert [c.name for c in clones] == ["c-1", "c-2"]
        clones[0].exec("echo mine > /root/x")
        assert clones[1].exec("cat /root/x").stdout == "data\n"
        assert [v.name for v in host.vms()] == ["c-1", "c-2"]
        assert [s.name for s in host.ls()] == ["c-1", "c-2"]
        assert host.vm("c-2").status().template == "t"
        assert [t.name for t in host.templates()] == ["t"]
        with pytest.raises(vmfork.StateError):
            tpl.remove()  # clones use it
        for c in clones:
            c.stop()
        with pytest.raises(vmfork.NotFound):
            clones[0].status()
        tpl.remove()
        with pytest.raises(vmfork.NotFound):
            host.template("t")


def test_sync_api_errors(env: Env) -> None:
    with vmfork.open() as host:
        with pytest.raises(vmfork.NotFound, match="no VM named 'nope'"):
            host.vm("nope")
        with pytest.raises(vmfork.NotFound):
            host.template("nope")
        with pytest.raises(vmfork.InvalidInput):
            host.run("bad/name")
        with pytest.raises(vmfork.InvalidInput):
            host.run("x", memory="lots")
    with pytest.raises(vmfork.StateError, match="closed"):
        host.vms()


@pytest.mark.qemu
def test_async_api(env: Env) -> None:
    async def scenario() -> None:
        async with vmfork.open_async() as host:
            vm = await host.run("a", image="demo", accel="tcg")
            assert isinstance(vm, vmfork.AsyncVM)
            r = await vm.exec("echo out; echo err >&2; exit 5")
            assert (r.exit_code, r.stdout, r.stderr) == (5, "out\n", "err\n")
            await vm.exec("echo data > /root/x")
            tpl = await vm.make_template("t")
            async with await tpl.clone() as c:
                assert (await c.exec("cat /root/x")).stdout == "data\n"
                assert (await c.status()).state == "running"
            assert await host.vms() == []
            clones = await tpl.clone(count=2)
            assert [c.name for c in clones] == ["t-1", "t-2"]
            results = await asyncio.gather(*(c.exec("hostname") for c in clones))
            assert [x.stdout.strip() for x in results] == ["t-1", "t-2"]
            with pytest.raises(vmfork.NotFound):
                await host.vm("a")
            for c in clones:
                await c.stop()
            await tpl.remove()
            assert await host.templates() == []
    asyncio.run(scenario())


@pytest.mark.qemu
def test_sync_call_interrupted_by_ctrl_c_cancels_and_cleans_up(env: Env) -> None:
    """Ctrl-C while a synchronous call waits: the operation (on the host's loop
    thread) is cancelled and its cleanup runs before KeyboardInterrupt goes on;
    the VM's agent is free for the next call."""
    with vmfork.open() as host:
        vm = host.run("a", image="demo", accel="tcg")
        main = threading.main_thread().ident
        assert main is not None
        timer = threading.Timer(1.5, signal.pthread_kill, (main, signal.SIGINT))
        timer.start()
        try:
            t0 = time.monotonic()
            with pytest.raises(KeyboardInterrupt):
                vm.exec("sleep 5")
            assert time.monotonic() - t0 < 5
        finally:
            timer.cancel()
        assert vm.exec("echo again", timeout=60).stdout == "again\n"
        vm.stop()
