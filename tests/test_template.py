"""Templates and clones on real QEMU: data, isolation, identity, clock, pool,
and every refusal (corrupt state, changed memory file, other QEMU, in use)."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import time
from pathlib import Path

import psutil
import pytest

from vmfork import vm
from vmfork.errors import (
    AlreadyExists,
    GuestError,
    InvalidInput,
    NotFound,
    PartialClone,
    StateError,
    TemplateError,
)
from vmfork.proc import process_alive
from vmfork.qemu.machine import Machine
from vmfork.records import TemplateManifest
from vmfork.templates import catalog, clone, create, pool

from .conftest import Env, qemu_processes, run

PREPARE = ("head -c 4194304 /dev/urandom > /root/data && md5sum /root/data | cut -d' ' -f1 "
           "> /root/data.md5")


def make_template(env: Env, name: str = "t", prepare: str = PREPARE) -> TemplateManifest:
    return run(create.create_demo(env.store(), name, memory_mib=256, prepare=prepare,
                               accel="tcg"))


def md5_matches(env: Env, name: str) -> bool:
    """The guest's /root/data still has the md5 written next to it before the
    template was made."""
    now = env.exec(name, "md5sum /root/data | cut -d' ' -f1")
    return bool(now.strip()) and now == env.exec(name, "cat /root/data.md5")


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


async def generation_id(env: Env, name: str) -> str:
    s = env.store()
    async with vm.attached(s, name) as (_rec, m):
        result = await m.qmp("query-vm-generation-id")
        return str(result["guid"])


async def machine_has_hpet(env: Env, name: str) -> bool:
    async with vm.attached(env.store(), name) as (_rec, m):
        return bool(await m.qmp("qom-get", {"path": "/machine", "property": "hpet"}))


async def announce_rounds(env: Env, name: str) -> int:
    async with vm.attached(env.store(), name) as (_rec, m):
        return int((await m.qmp("query-migrate-parameters"))["announce-rounds"])


def test_clones_share_template_data_and_write_privately(env: Env) -> None:
    manifest = make_template(env)
    mem = manifest.memory_file
    assert Path(mem).stat().st_mode & 0o222 == 0, "template memory file must be read-only"
    assert manifest.state_size < 1_000_000  # device state only, RAM bypassed
    before = file_sha256(mem)
    results = run(clone.clone(env.store(), "t", names=["c1", "c2"]))
    assert [r.name for r in results] == ["c1", "c2"]
    for c in ("c1", "c2"):
        assert md5_matches(env, c)
        assert run(vm.status(env.store(), c)) == "running"
    env.exec("c1", "head -c 2097152 /dev/urandom > /root/only-c1 && "
                   "dd if=/dev/zero of=/root/data bs=4096 count=16 conv=notrunc 2>/dev/null")
    assert env.exec("c2", "ls /root").split() == ["data", "data.md5"]
    assert md5_matches(env, "c2")
    assert file_sha256(mem) == before, "a clone's write reached the template file"
    for c in ("c1", "c2"):
        run(vm.stop(env.store(), c))
    run(catalog.remove(env.store(), "t"))
    assert not Path(mem).exists()


def test_clone_identity_reseed_generation_id_hostname_machine_id(env: Env) -> None:
    make_template(env, prepare="true")
    run(clone.clone(env.store(), "t", names=["c1", "c2"]))
    ids = {c: run(generation_id(env, c)) for c in ("c1", "c2")}
    assert ids["c1"] != ids["c2"]
    manifest = env.store().get_template("t")
    assert manifest.spec.vmgenid not in ids.values()
    for c in ("c1", "c2"):
        assert "crng reseeded due to virtual machine fork" in env.exec(c, "dmesg")
        assert env.exec(c, "hostname").strip() == c
    assert env.exec("c1", "cat /etc/machine-id") != env.exec("c2", "cat /etc/machine-id")
    # The clone's QEMU announced nothing after the load: the announce makes a
    # virtio-net guest take RTNL in a work item that deadlocks against the
    # identity's link down (kernel virtio_net, see vmfork.spec).
    assert run(announce_rounds(env, "c1")) == 0
    # No HPET (a VM vmfork starts has none, and its clones keep its machine).
    assert manifest.spec.hpet is False and run(machine_has_hpet(env, "c1")) is False
    assert "hpet" not in env.exec(
        "c1", "cat /sys/devices/system/clocksource/clocksource0/available_clocksource")
    for c in ("c1", "c2"):
        run(vm.stop(env.store(), c))
    run(catalog.remove(env.store(), "t"))


def test_a_failing_clone_leaves_the_others_of_its_batch(env: Env) -> None:
    """One clone of three fails (its hook refuses its hostname): it is
    undone, the two others run, the CLI lists both and the failure (exit
    1, one error line); with --all-or-nothing none is left. Through the
    library the same is PartialClone; a batch where every clone fails
    raises the first failure itself."""
    make_template(env, prepare="true")
    s = env.store()
    hook = '[ "$(hostname)" != t-2 ] || { echo refused >&2; exit 3; }'
    p = env.cli("clone", "t", "-n", "3", "--on-clone", hook, "--json")
    assert p.returncode == 1, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert "1 of 3 clones failed" in p.stderr and "t-2" in p.stderr, p.stderr
    out = json.loads(p.stdout)
    assert [(c["name"], "error" in c) for c in out] == [("t-1", False), ("t-3", False),
                                                       ("t-2", True)]
    assert out[2]["error"]["code"] == "guest" and "status 3" in out[2]["error"]["message"]
    assert not s.has_vm("t-2") and not s.run_dir("t-2").exists()
    assert not [q for q in qemu_processes(str(env.home)) if "/run/t-2/" in " ".join(q.cmdline())]
    for c in ("t-1", "t-3"):
        assert run(vm.status(s, c)) == "running"
        assert env.exec(c, "hostname").strip() == c

    p = env.cli("clone", "t", "a", "-n", "3", "--all-or-nothing", "--on-clone",
                '[ "$(hostname)" != a-2 ]')
    assert p.returncode == 1 and "a-2" in p.stderr, p.stderr
    assert not [n for n in ("a-1", "a-2", "a-3") if s.has_vm(n)]

    with pytest.raises(PartialClone) as info:
        run(clone.clone(s, "t", names=["b1", "b2"], on_clone='[ "$(hostname)" = b1 ]'))
    assert [c.name for c in info.value.clones] == ["b1"]
    assert [n for n, _ in info.value.failures] == ["b2"]
    assert isinstance(info.value.failures[0][1], GuestError)
    with pytest.raises(GuestError, match="hook"):
        run(clone.clone(s, "t", names=["x1", "x2"], on_clone="false"))
    assert not s.has_vm("x1") and not s.has_vm("x2")
    for c in ("t-1", "t-3", "b1"):
        run(vm.stop(s, c))
    run(catalog.remove(s, "t"))


def test_clone_clock_follows_host_not_template(env: Env) -> None:
    # A template whose guest clock is far in the past stands for an old template.
    make_template(env, prepare="date -u -s 2001-01-01 >/dev/null && date +%Y")
    run(clone.clone(env.store(), "t", names=["c1"]))
    guest = int(env.exec("c1", "date +%s"))
    assert abs(guest - time.time()) <= 2
    run(catalog.remove(env.store(), "t", force=True))
    assert not env.store().has_vm("c1")


def test_pool_serves_clones_and_is_filled_on_request(env: Env) -> None:
    make_template(env)
    s = env.store()
    assert run(pool.set_pool(s, "t", 2)) == 2
    members = s.pool_members("t")
    assert len(members) == 2 and all(process_alive(m.pid, m.pid_start) for m in members)
    (res,) = run(clone.clone(s, "t", names=["p1"]))
    assert res.pooled and res.pid in {m.pid for m in members}
    assert md5_matches(env, "p1")
    # Taking a member does not refill the pool; fill_pool (or a keeper) does.
    status = pool.pool_status(s, "t")
    assert (status.target, status.ready) == (2, 1)
    assert run(pool.fill_pool(s, "t")) == 2
    assert pool.pool_status(s, "t").ready == 2
    (res2,) = run(clone.clone(s, "t", names=["p2"], use_pool=False))
    assert not res2.pooled
    pids = [m.pid for m in s.pool_members("t")]
    assert run(pool.set_pool(s, "t", 0)) == 0
    assert not any(process_alive(p) for p in pids)
    with pytest.raises(StateError, match="in use"):
        run(catalog.remove(s, "t"))
    run(catalog.remove(s, "t", force=True))
    assert s.list_vms() == []


def _no_clone_started(env: Env) -> None:
    assert env.store().list_vms() == []
    assert qemu_processes(str(env.home)) == []


def test_refuses_changed_template_and_starts_nothing(env: Env) -> None:
    manifest = make_template(env, prepare="true")
    s = env.store()
    state = manifest.state_path
    good = state.read_bytes()
    state.write_bytes(good[:100] + bytes([good[100] ^ 0xFF]) + good[101:])
    with pytest.raises(TemplateError, match="corrupt"):
        run(clone.clone(s, "t", names=["c1"]))
    _no_clone_started(env)
    state.write_bytes(good)
    mem = manifest.memory_path
    mem.chmod(0o644)
    with open(mem, "r+b") as f:
        f.truncate(mem.stat().st_size - 4096)
    with pytest.raises(TemplateError, match="resized"):
        run(clone.clone(s, "t", names=["c1"]))
    _no_clone_started(env)
    mem.unlink()
    with pytest.raises(TemplateError, match="missing"):
        run(clone.clone(s, "t", names=["c1"]))
    _no_clone_started(env)
    run(catalog.remove(s, "t"))


def test_refuses_other_qemu_version(env: Env) -> None:
    make_template(env, prepare="true")
    s = env.store()
    manifest = dataclasses.replace(s.get_template("t"), qemu_version="9.9.9")
    s.remove_template("t")
    s.add_template(manifest)
    r = env.cli("clone", "t", "c1")
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and "QEMU 9.9.9" in r.stderr
    _no_clone_started(env)
    run(catalog.remove(s, "t"))


def test_cli_template_story_and_bad_input(env: Env) -> None:
    r = env.cli("template", "create", "t", "--demo", "--memory", "256M", "--accel", "tcg",
                "--prepare", "echo hi > /root/hi", "--json", check=True)
    created = json.loads(r.stdout)
    assert created["state_size"] < 1_000_000 and created["version"] == 1
    (row,) = json.loads(env.cli("template", "ls", "--json", check=True).stdout)
    assert row == {"name": "t", "memory_mib": 256, "state_kib": round(created["state_size"] / 1024),
                   "clones": 0, "pool": 0, "qemu": created["qemu_version"],
                   "age_seconds": row["age_seconds"], "status": "ready",
                   # a local template: no source, no memory arriving
                   "source": None, "state": None, "local_percent": None,
                   "fetched_bytes": None, "cause": None}
    r = env.cli("clone", "t", "x", "-n", "2", "--json", check=True)
    clones = json.loads(r.stdout)
    assert [c["name"] for c in clones] == ["x-1", "x-2"]
    assert all(c["running"] >= c["state_loaded"] > 0 for c in clones)
    assert env.cli("exec", "x-2", "--", "cat", "/root/hi").stdout == "hi\n"
    ls = json.loads(env.cli("ls", "--json", check=True).stdout)
    assert {v["name"]: v["template"] for v in ls} == {"x-1": "t", "x-2": "t"}
    bad = [
        (("clone", "nope"), "no template named 'nope'"),
        (("clone", "t", "x-1"), "exists already"),
        (("clone", "t", "-n", "0"), "invalid clone count"),
        (("clone", "t", "bad/name"), "invalid VM name"),
        (("template", "create", "t", "--demo"), "exists already"),
        (("template", "create", "u", "--from", "ghost"), "no VM named 'ghost'"),
        (("template", "create", "u"), "exactly one of"),
        (("template", "rm", "t"), "in use"),
        (("template", "inspect", "nope"), "no template"),
    ]
    for args, message in bad:
        r = env.cli(*args)
        assert r.returncode != 0, args
        assert message in r.stderr and r.stderr.count("\n") == 1, (args, r.stderr)
    assert len(json.loads(env.cli("ls", "--json").stdout)) == 2
    inspected = json.loads(env.cli("template", "inspect", "t").stdout)
    assert inspected["clones"] == ["x-1", "x-2"]
    assert inspected["pool"] == {"template": "t", "target": 0, "warm": False, "ready": 0,
                                 "members": []}
    assert {k: v for k, v in inspected.items() if k not in ("clones", "pool")} == created
    env.cli("template", "rm", "t", "--force", check=True)
    assert json.loads(env.cli("ls", "--json").stdout) == []


def test_failed_prepare_leaves_nothing(env: Env) -> None:
    r = env.cli("template", "create", "t", "--demo", "--memory", "256M", "--accel", "tcg",
                "--prepare", "echo broken; exit 3")
    assert r.returncode == 1 and "status 3" in r.stderr
    assert env.store().list_templates() == [] and env.store().list_vms() == []
    assert list(env.memory_dir.iterdir()) == []


def test_clone_of_dead_pool_member_falls_back(env: Env) -> None:
    make_template(env, prepare="true")
    s = env.store()
    run(pool.set_pool(s, "t", 1))
    (member,) = s.pool_members("t")
    m = Machine(member.spec, s.run_paths(member.id), s.run_dir(member.id) / "qemu.log",
                member.pid)
    run(m.kill())
    (res,) = run(clone.clone(s, "t", names=["c1"]))
    assert not res.pooled
    assert env.exec("c1", "echo ok").strip() == "ok"
    run(pool.set_pool(s, "t", 0))
    run(catalog.remove(s, "t", force=True))


def test_bad_names_and_missing(env: Env) -> None:
    s = env.store()
    with pytest.raises(NotFound):
        run(clone.clone(s, "missing"))
    with pytest.raises(InvalidInput):
        run(create.create_from_vm(s, "a b", "x"))
    with pytest.raises(NotFound):
        run(create.create_from_vm(s, "ok", "ghost"))
    make_template(env, prepare="true")
    with pytest.raises(AlreadyExists):
        run(create.create_demo(s, "t", 256, accel="tcg"))
    with pytest.raises(InvalidInput):
        run(pool.set_pool(s, "t", -1))
    run(catalog.remove(s, "t"))


def test_clones_with_nic_get_their_own_mac(env: Env) -> None:
    s = env.store()
    run(vm.run(s, vm.RunOptions(name="src", demo=True, net="user", accel="tcg")))
    src_mac = s.get_vm("src").spec.net.mac  # type: ignore[union-attr]
    assert env.exec("src", "cat /sys/class/net/eth0/address").strip() == src_mac
    run(create.create_from_vm(s, "t", "src"))
    run(clone.clone(s, "t", names=["c1", "c2"]))
    seen = {}
    for c in ("c1", "c2"):
        spec_mac = s.get_vm(c).spec.net.mac  # type: ignore[union-attr]
        seen[c] = env.exec(c, "cat /sys/class/net/eth0/address").strip()
        assert seen[c] == spec_mac
    assert len({src_mac, *seen.values()}) == 3
    run(catalog.remove(s, "t", force=True))


def test_clone_qemu_gets_a_stub_of_the_kernel_and_ends_at_a_guest_reboot(env: Env) -> None:
    """A clone never boots: its QEMU is given the kernel's header only (it
    would otherwise keep the whole kernel and initrd in memory), and a guest
    reboot, which that stub could not boot, ends it."""
    m = make_template(env, prepare="true")
    assert m.spec.kernel and m.spec.initrd
    s = env.store()
    run(clone.clone(s, "t", names=["c1", "c2"]))
    rec = s.get_vm("c1")
    assert rec.spec.kernel != m.spec.kernel and rec.spec.initrd is None and rec.spec.reboot_ends
    assert rec.spec.kernel == s.get_vm("c2").spec.kernel  # one stub for the template's kernel
    argv = psutil.Process(rec.pid).cmdline()
    assert rec.spec.kernel in argv and "-initrd" not in argv
    assert Path(rec.spec.kernel).stat().st_size < 64 * 1024 < Path(m.spec.kernel).stat().st_size
    assert env.exec("c1", "cat /proc/cmdline").strip() == m.spec.append
    with contextlib.suppress(GuestError):
        run(vm.exec_(s, "c1", "reboot -f", timeout=10))
    end = time.monotonic() + 60
    while process_alive(rec.pid, rec.pid_start):
        assert time.monotonic() < end, "the clone's QEMU outlived its guest's reboot"
        time.sleep(0.2)
    assert vm.reconcile(s, s.get_vm("c1")).state == "dead"
    assert env.exec("c2", "echo on") == "on\n"
    run(vm.stop(s, "c1"))
    run(vm.stop(s, "c2"))
    run(catalog.remove(s, "t"))


def test_chained_template_from_a_clone(env: Env) -> None:
    """A clone's RAM is private; it is moved to a shared file first, then frozen."""
    make_template(env)
    s = env.store()
    run(clone.clone(s, "t", names=["c1"]))
    env.exec("c1", "echo second > /root/layer2")
    manifest2 = run(create.create_from_vm(s, "t2", "c1"))
    assert manifest2.parent == "t"
    assert manifest2.memory_file != s.get_template("t").memory_file
    assert not s.has_vm("c1")
    run(clone.clone(s, "t2", names=["d1"]))
    assert env.exec("d1", "cat /root/layer2").strip() == "second"
    assert md5_matches(env, "d1")
    assert "crng reseeded due to virtual machine fork" in env.exec("d1", "dmesg")
    run(catalog.remove(s, "t2", force=True))
    run(catalog.remove(s, "t"))
