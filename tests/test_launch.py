"""The launch transaction (vmfork.launch): the pid is in the catalog as soon
as QEMU exists, and a launch that fails or is cancelled leaves nothing.

A stand-in "QEMU" that never answers QMP holds a launch in its handshake: a
vmfork killed there must leave a QEMU that the catalog knows."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vmfork import vm
from vmfork.errors import VmforkTimeout
from vmfork.proc import process_alive, process_start_time
from vmfork.timeouts import Timeouts

from .conftest import VMFORK, Env, qemu_processes, run


def silent_qemu(tmp: Path) -> str:
    """A 'QEMU' that runs (with QEMU's arguments on its command line, so the
    leak checks see it) but never speaks QMP."""
    path = tmp / "silent-qemu"
    path.write_text(f"#!/bin/sh\nexec {sys.executable} -c 'import time; time.sleep(300)' "
                    "\"$@\"\n")
    path.chmod(0o755)
    return str(path)


def wait_for(predicate: object, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def test_killed_run_leaves_a_qemu_that_stop_finds(env: Env, tmp_path: Path) -> None:
    qemu = silent_qemu(tmp_path)
    p = subprocess.Popen([VMFORK, "run", "a", "--demo", "--accel", "tcg", "--qemu", qemu],
                         env=env.environ, stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    s = env.store()
    wait_for(lambda: s.has_vm("a") and s.get_vm("a").pid is not None)
    rec = s.get_vm("a")
    assert rec.state == "starting" and process_alive(rec.pid, rec.pid_start)
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=10)
    assert process_alive(rec.pid, rec.pid_start)  # QEMU outlived its vmfork
    listed = json.loads(env.cli("ls", "--json", check=True).stdout)
    assert [(r["name"], r["pid"]) for r in listed] == [("a", rec.pid)]
    env.cli("stop", "a", check=True)
    assert not process_alive(rec.pid, rec.pid_start)
    assert not s.has_vm("a") and not (env.home / "run" / "a").exists()


def test_failed_launch_leaves_nothing(env: Env, tmp_path: Path) -> None:
    qemu = silent_qemu(tmp_path)
    s = env.store()
    opts = vm.RunOptions(name="a", demo=True, accel="tcg", qemu=qemu)
    with pytest.raises(VmforkTimeout, match="QMP of a"):
        run(vm.run(s, opts, Timeouts(start=1.0)))
    assert not s.has_vm("a") and qemu_processes(str(env.home)) == []
    assert not (env.home / "run" / "a").exists() and os.listdir(env.memory_dir) == []


def test_cancelled_launch_leaves_nothing(env: Env, tmp_path: Path) -> None:
    qemu = silent_qemu(tmp_path)
    s = env.store()
    opts = vm.RunOptions(name="a", demo=True, accel="tcg", qemu=qemu)

    async def cancel_during_handshake() -> None:
        task = asyncio.create_task(vm.run(s, opts))
        while not (s.has_vm("a") and s.get_vm("a").pid):
            await asyncio.sleep(0.02)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    run(cancel_during_handshake())
    assert not s.has_vm("a") and qemu_processes(str(env.home)) == []
    assert not (env.home / "run" / "a").exists() and os.listdir(env.memory_dir) == []


def test_a_pool_member_left_not_ready_is_ended_by_the_next_fill(env: Env,
                                                                 tmp_path: Path) -> None:
    """A filler killed mid-spawn leaves a member recorded but not ready: no
    clone takes it, and the next fill (which holds the pool's lock) ends it."""
    from vmfork.records import PoolMember
    from vmfork.templates import catalog, clone, pool

    from .test_template import make_template

    make_template(env)
    s = env.store()
    stray = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)",
                              str(env.home)], stdin=subprocess.DEVNULL)
    try:
        spec = s.get_template("t").spec.with_(name="_pool.t.stray")
        s.add_pool_member(PoolMember("_pool.t.stray", "t", spec, stray.pid,
                                     process_start_time(stray.pid), time.time(),
                                     ready=False))
        assert pool.take_member(s, "t") is None  # not ready: no clone takes it
        run(pool.set_pool(s, "t", 1))
        wait_for(lambda: stray.poll() is not None, 10)  # ended (and reaped)
        (member,) = s.pool_members("t")
        assert member.id != "_pool.t.stray" and member.ready
        (c,) = run(clone.clone(s, "t", names=["c"]))
        assert c.pooled and c.pid == member.pid
        run(catalog.remove(s, "t", force=True))
    finally:
        stray.kill()
        stray.wait()
