"""The pool on real QEMU: warm members (state loaded and guest run in
advance) handed out as ordinary clones with their own identity, and the
keeper that keeps a pool filled (in the foreground, ``vmfork pool --keep``)
until it is stopped, leaving the members in place and nothing half-started."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from typing import Any

import pytest

from vmfork import vm
from vmfork.proc import process_alive
from vmfork.qemu.machine import Machine
from vmfork.records import PoolMember
from vmfork.store import Store
from vmfork.templates import catalog, clone, pool

from .conftest import VMFORK, Env, qemu_processes, run
from .test_template import generation_id, make_template, md5_matches

pytestmark = pytest.mark.qemu


def test_warm_pool_members_are_clones_in_waiting(env: Env) -> None:
    make_template(env)
    s = env.store()
    p = env.cli("pool", "t", "--size", "1", "--warm", "--json", check=True)
    status = json.loads(p.stdout)
    assert status["warm"] and status["ready"] == 1 and status["members"][0]["warm"]
    (member,) = s.pool_members("t")
    # A warm member's guest has run and is paused again, with the state loaded.
    assert run(_status_of(env, member.id, member.pid)) == "paused"
    (res,) = run(clone.clone(s, "t", names=["w1"]))
    assert res.pooled and res.pid == member.pid
    assert res.state_loaded < res.running <= res.responsive
    assert md5_matches(env, "w1")
    assert env.exec("w1", "hostname").strip() == "w1"
    # It saw its own generation ID (given to the pool process) and reseeded once.
    assert env.exec("w1", "dmesg | grep -c 'virtual machine fork'").strip() == "1"
    assert run(generation_id(env, "w1")) == member.spec.vmgenid
    # The clone did not refill the pool; filling it again (the size alone
    # keeps the kind) brings a new warm member; switching to cold replaces it.
    assert pool.pool_status(s, "t").ready == 0
    env.cli("pool", "t", "--size", "1", check=True)
    (warm2,) = s.pool_members("t")
    assert warm2.warm and warm2.id != member.id
    assert run(pool.set_pool(s, "t", 1, warm=False)) == 1
    (cold,) = s.pool_members("t")
    assert not cold.warm and not process_alive(warm2.pid, warm2.pid_start)
    (res2,) = run(clone.clone(s, "t", names=["c1"]))
    assert res2.pooled and res2.pid == cold.pid
    assert env.exec("c1", "hostname").strip() == "c1"
    assert run(generation_id(env, "c1")) != run(generation_id(env, "w1"))
    assert run(pool.set_pool(s, "t", 0)) == 0
    for name in ("w1", "c1"):
        run(vm.stop(s, name))
    run(catalog.remove(s, "t"))


async def _status_of(env: Env, member_id: str, pid: int) -> str:
    s = env.store()
    (member,) = [m for m in s.pool_members("t") if m.id == member_id]
    m = Machine(member.spec, s.run_paths(member_id), s.run_dir(member_id) / "qemu.log", pid)
    await m.connect()
    try:
        return await m.status()
    finally:
        await m.disconnect()


def wait_for_member(s: Store, template: str, known: set[str],
                    timeout: float = 120) -> PoolMember:
    """The first live pool member of *template* not in *known*."""
    end = time.monotonic() + timeout
    while True:
        fresh = [m for m in s.pool_members(template)
                 if m.id not in known and m.ready and process_alive(m.pid, m.pid_start)]
        if fresh:
            return fresh[0]
        assert time.monotonic() < end, f"no new pool member within {timeout} s"
        time.sleep(0.1)


def test_keeper_refills_after_clones_and_deaths_until_sigterm(env: Env) -> None:
    make_template(env, prepare="true")
    s = env.store()
    keeper = subprocess.Popen([VMFORK, "pool", "t", "--size", "1", "--keep", "--json"],
                              env=env.environ, stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = wait_for_member(s, "t", set())
        # A clone takes the member; the keeper replaces it.
        (res,) = run(clone.clone(s, "t", names=["c1"]))
        assert res.pooled and res.pid == first.pid
        second = wait_for_member(s, "t", {first.id})
        # The member's QEMU dies; the keeper drops it and starts another.
        os.kill(second.pid, signal.SIGKILL)
        third = wait_for_member(s, "t", {first.id, second.id})
        assert not s.run_dir(second.id).exists()
        assert keeper.poll() is None
        keeper.send_signal(signal.SIGTERM)
        out, err = keeper.communicate(timeout=60)
    finally:
        if keeper.poll() is None:
            keeper.kill()
            keeper.communicate(timeout=30)
    assert keeper.returncode == 0, err
    status = json.loads(out)
    assert (status["target"], status["ready"]) == (1, 1)
    assert [m["id"] for m in status["members"]] == [third.id]
    # The member stays, alive, for later clones.
    (left,) = s.pool_members("t")
    assert left.id == third.id and process_alive(third.pid, third.pid_start)
    (res2,) = run(clone.clone(s, "t", names=["c2"]))
    assert res2.pooled and res2.pid == third.pid
    assert env.exec("c2", "hostname").strip() == "c2"
    assert env.exec("c1", "hostname").strip() == "c1"
    run(catalog.remove(s, "t", force=True))
    assert s.list_vms() == [] and s.pool_members() == []


@pytest.mark.parametrize("how", ["stop", "cancel"])
def test_keeper_stopped_mid_spawn_leaves_nothing_half_started(
        env: Env, monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    """The stop (or cancellation) arrives while a warm member warms up: its
    QEMU is killed and its files removed; the template's pool stays as set."""
    make_template(env, prepare="true")
    s = env.store()
    warm_up = pool._warm_up
    seen: dict[str, Any] = {}

    async def go() -> None:
        stop = asyncio.Event()
        keeper = asyncio.create_task(pool.keep(s, "t", 1, warm=True, stop=stop))

        async def interrupted_warm_up(*args: Any) -> None:
            seen["qemu"] = [p.pid for p in qemu_processes(str(env.home))]
            seen["members"] = s.pool_members("t")
            if how == "stop":
                stop.set()
            else:
                keeper.cancel()
            await warm_up(*args)

        monkeypatch.setattr(pool, "_warm_up", interrupted_warm_up)
        async with asyncio.timeout(120):
            if how == "stop":
                status = await keeper
                assert (status.target, status.ready, status.members) == (1, 0, ())
            else:
                with pytest.raises(asyncio.CancelledError):
                    await keeper

    run(go())
    # It was mid-spawn: recorded (its pid known from the start), not ready.
    assert len(seen["qemu"]) == 1
    assert [(m.pid, m.ready) for m in seen["members"]] == [(seen["qemu"][0], False)]
    assert not process_alive(seen["qemu"][0])
    assert s.pool_members("t") == [] and not qemu_processes(str(env.home))
    assert not list(s.home.glob("run/_pool.*")) and not list(s.home.glob("vms/_pool.*"))
    assert (s.pool_target("t"), s.pool_warm("t")) == (1, True)
    run(catalog.remove(s, "t"))


def test_keeper_ends_when_its_template_is_removed(env: Env) -> None:
    make_template(env, prepare="true")
    s = env.store()

    async def go() -> None:
        keeper = asyncio.create_task(pool.keep(s, "t", 1, interval=0.1))
        async with asyncio.timeout(120):
            while not s.pool_members("t"):
                assert not keeper.done()
                await asyncio.sleep(0.1)
            await catalog.remove(s, "t", force=True)
            status = await keeper
        assert (status.target, status.ready) == (0, 0)

    run(go())
    assert not s.has_template("t") and not qemu_processes(str(env.home))
