"""Warm pool members on real QEMU: state loaded and guest run in advance,
handed out as ordinary clones with their own identity."""

from __future__ import annotations

import json
import time

import pytest

from vmfork import vm
from vmfork.qemu.machine import Machine, process_alive
from vmfork.templates import catalog, clone, pool

from .conftest import Env, run
from .test_template import generation_id, make_template

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
    assert env.exec("w1", "md5sum /root/data | cut -d' ' -f1") == \
        env.exec("w1", "cat /root/data.md5")
    assert env.exec("w1", "hostname").strip() == "w1"
    # It saw its own generation ID (given to the pool process) and reseeded once.
    assert env.exec("w1", "dmesg | grep -c 'virtual machine fork'").strip() == "1"
    assert run(generation_id(env, "w1")) == member.spec.vmgenid
    # The pool refills with a warm member; switching to cold replaces it.
    deadline = time.monotonic() + 120
    while not (pool.pool_status(s, "t").ready == 1
               and pool.pool_status(s, "t").members[0].id != member.id):
        assert time.monotonic() < deadline, "pool did not refill"
        time.sleep(0.2)
    (warm2,) = s.pool_members("t")
    assert warm2.warm
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

