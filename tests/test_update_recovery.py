"""An update whose vmfork process is killed (kill -9) at each phase: listing
VMs shows it ``updating`` and touches nothing; the next command that acts on
the VM finishes or undoes it; one QEMU holds the guest, which runs on with its
data intact; nothing is left behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import psutil
import pytest

from vmfork import launch, vm
from vmfork.qemu.machine import Machine, find_qemu
from vmfork.records import RetiredQemu
from vmfork.update.live import update
from vmfork.update.recovery import settle, settle_all

from .conftest import Env, qemu_processes, run
from .test_update import Guest

pytestmark = pytest.mark.qemu

KILLER = """
import asyncio, os, signal
from vmfork.store import Store
from vmfork.update.live import update
def hook(phase, pid):
    if phase == {phase!r}:
        os.kill(os.getpid(), signal.SIGKILL)
asyncio.run(update(Store(), "a", mode={mode!r}, on_phase=hook))
"""


def killed_update(env: Env, phase: str, mode: str) -> None:
    p = subprocess.run([sys.executable, "-c", KILLER.format(phase=phase, mode=mode)],
                       env=env.environ, capture_output=True, text=True, timeout=300,
                       stdin=subprocess.DEVNULL)
    assert p.returncode == -9, p.stderr


def processes(env: Env) -> set[tuple[int, float]]:
    """The QEMU processes of this test's home, by pid and start time."""
    return {(q.pid, q.create_time()) for q in qemu_processes(str(env.home))}


async def _runstates(env: Env) -> dict[str, str]:
    """QEMU's run state of the old and the new QEMU of an interrupted update."""
    s = env.store()
    rec = s.get_vm("a")
    assert rec.info.update is not None
    states = {}
    for role, gen, spec in (("old", rec.info.gen, rec.spec),
                            ("new", rec.info.update.gen, rec.info.update.spec)):
        paths = s.run_paths("a", gen)
        pid = find_qemu(paths.qmp)
        assert pid is not None, f"no {role} QEMU"
        m = await Machine.attach(spec, paths, launch.qemu_log(s, "a"), pid)
        try:
            states[role] = await m.status()
        finally:
            await m.disconnect()
    return states


@pytest.mark.parametrize(("phase", "mode", "outcome", "command"), [
    # new QEMU up, nothing moved yet
    ("launched", "ignore-shared", "rolled back", ("exec", "a", "true")),
    # state loaded in the new QEMU
    ("migrated", "ignore-shared", "completed", ("pause", "a")),
    # ... with RAM copied into a new file
    ("migrated", "copy", "completed", ("exec", "a", "true")),
])
def test_killed_update_is_settled_by_the_next_command(env: Env, booted: str, phase: str,
                                                      mode: str, outcome: str,
                                                      command: tuple[str, ...]) -> None:
    s = env.store()
    guest = Guest(env, "a", 8)
    old_pid = s.get_vm("a").pid
    killed_update(env, phase, mode)
    rec = s.get_vm("a")
    assert rec.state == "updating" and rec.info.update is not None
    procs = processes(env)
    assert len(procs) == 2  # the old and the new QEMU
    states = run(_runstates(env))
    assert states == ({"old": "running", "new": "inmigrate"} if phase == "launched"
                      else {"old": "postmigrate", "new": "paused"})
    # Listing shows the interrupted update and changes nothing.
    p = env.cli("ls", "--json", check=True)
    (row,) = json.loads(p.stdout)
    assert row["state"] == "updating"
    assert processes(env) == procs
    assert run(_runstates(env)) == states
    after_ls = s.get_vm("a")
    assert (after_ls.state, after_ls.pid, after_ls.info) == (rec.state, rec.pid, rec.info)
    # The next command that acts on the VM settles it, then does its job.
    env.cli(*command, check=True)
    if command[0] == "pause":
        assert s.get_vm("a").state == "paused"
        env.cli("resume", "a", check=True)
    rec = s.get_vm("a")
    assert rec.state == "running" and rec.info.update is None
    assert [q[0] for q in processes(env)] == [rec.pid]
    if outcome == "completed":
        assert rec.pid != old_pid and rec.info.gen == 1 and rec.info.updates == 1
    else:
        assert rec.pid == old_pid and rec.info.gen == 0
    assert not list((env.home / "run" / "a").glob("mig.*.sock"))
    assert os.listdir(env.memory_dir) == [os.path.basename(str(rec.spec.memory.path))]
    guest.check()
    # The VM updates normally afterwards.
    rep = run(update(s, "a"))
    assert rep.mode in ("cpr-transfer", "ignore-shared")
    guest.check()
    run(vm.stop(s, "a"))


def test_an_update_settles_an_interrupted_one_first(env: Env, booted: str) -> None:
    s = env.store()
    old_pid = s.get_vm("a").pid
    killed_update(env, "launched", "ignore-shared")
    rep = run(update(s, "a"))
    assert rep.old_pid == old_pid  # the interrupted update was rolled back first
    rec = s.get_vm("a")
    assert rec.pid == rep.new_pid and rec.info.update is None
    assert [q[0] for q in processes(env)] == [rep.new_pid]


def test_settle_all_settles_only_what_is_interrupted(env: Env, booted: str) -> None:
    s = env.store()
    assert run(settle_all(s)) == []
    assert run(settle(s, "a")).state == "running"
    killed_update(env, "migrated", "ignore-shared")
    assert run(settle_all(s)) == ["a"]
    rec = s.get_vm("a")
    assert rec.state == "running" and rec.info.gen == 1
    assert [q[0] for q in processes(env)] == [rec.pid]


@pytest.mark.parametrize(("phase", "mode"), [("launched", "ignore-shared"),
                                             ("migrated", "copy")])
def test_stop_of_an_interrupted_update_ends_both_qemus(env: Env, booted: str, phase: str,
                                                       mode: str) -> None:
    killed_update(env, phase, mode)
    assert len(processes(env)) == 2
    p = env.cli("stop", "a")
    assert p.returncode == 0, p.stderr
    assert not qemu_processes(str(env.home))
    assert not env.store().has_vm("a")
    assert os.listdir(env.memory_dir) == [], "a memory file was left behind"


def test_old_qemu_left_by_a_committed_update_is_ended(env: Env, booted: str) -> None:
    """A vmfork killed after the commit but before the old QEMU quit leaves
    it in ``postmigrate`` (``info.retire``); listing leaves it alone, the
    next command ends it. A stand-in process plays the old QEMU here."""
    s = env.store()
    old = subprocess.Popen(["sleep", "300"])
    try:
        rec = s.get_vm("a")
        rec.info.retire = RetiredQemu(pid=old.pid, gen=7,
                                      pid_start=psutil.Process(old.pid).create_time())
        s.update_vm(rec)
        env.cli("ls", check=True)
        assert old.poll() is None and s.get_vm("a").info.retire is not None
        env.cli("exec", "a", "true", check=True)
        assert old.wait(timeout=10) == -9
        assert s.get_vm("a").info.retire is None
        assert run(vm.status(s, "a")) == "running"
    finally:
        old.kill()
        old.wait()
