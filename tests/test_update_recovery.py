"""An update whose vmfork process is killed (kill -9) at each phase: the
next vmfork command finishes or undoes it; one QEMU holds the guest, which
runs on with its data intact; nothing is left behind."""

from __future__ import annotations

import json
import subprocess
import sys

import psutil
import pytest

from vmfork import update, vm
from vmfork.records import RetiredQemu

from .conftest import Env, qemu_processes, run
from .test_update import Guest

pytestmark = pytest.mark.qemu

KILLER = """
import asyncio, os, signal
from vmfork import update
from vmfork.records import RetiredQemu
from vmfork.store import Store
def hook(phase, pid):
    if phase == {phase!r}:
        os.kill(os.getpid(), signal.SIGKILL)
asyncio.run(update.update(Store(), "a", mode={mode!r}, on_phase=hook))
"""


def killed_update(env: Env, phase: str, mode: str) -> None:
    p = subprocess.run([sys.executable, "-c", KILLER.format(phase=phase, mode=mode)],
                       env=env.environ, capture_output=True, text=True, timeout=300,
                       stdin=subprocess.DEVNULL)
    assert p.returncode == -9, p.stderr


@pytest.mark.parametrize(("phase", "mode", "outcome"), [
    ("launched", "ignore-shared", "rolled back"),   # new QEMU up, nothing moved yet
    ("migrated", "ignore-shared", "completed"),     # state loaded in the new QEMU
    ("migrated", "copy", "completed"),              # ... with RAM copied into a new file
])
def test_killed_update_is_settled_by_the_next_command(env: Env, booted: str, phase: str,
                                                      mode: str, outcome: str) -> None:
    s = env.store()
    guest = Guest(env, "a", 8)
    old_pid = s.get_vm("a").pid
    killed_update(env, phase, mode)
    rec = s.get_vm("a")
    assert rec.state == "updating" and rec.info.update is not None
    assert len(qemu_processes(str(env.home))) == 2  # the old and the new QEMU
    p = env.cli("ls", "--json", check=True)
    (row,) = json.loads(p.stdout)
    assert row["state"] == "running"
    rec = s.get_vm("a")
    assert rec.info.update is None
    procs = qemu_processes(str(env.home))
    assert [q.pid for q in procs] == [rec.pid]
    if outcome == "completed":
        assert rec.pid != old_pid and rec.info.gen == 1 and rec.info.updates == 1
    else:
        assert rec.pid == old_pid and rec.info.gen == 0
    assert not list((env.home / "run" / "a").glob("mig.*.sock"))
    guest.check()
    # The VM updates normally afterwards.
    rep = run(update.update(s, "a"))
    assert rep.mode in ("cpr-transfer", "ignore-shared")
    guest.check()
    run(vm.stop(s, "a"))


def test_stop_of_an_interrupted_update_ends_both_qemus(env: Env, booted: str) -> None:
    killed_update(env, "launched", "ignore-shared")
    assert len(qemu_processes(str(env.home))) == 2
    p = env.cli("stop", "a")
    assert p.returncode == 0, p.stderr
    assert not qemu_processes(str(env.home))
    assert not env.store().has_vm("a")


def test_old_qemu_left_by_a_committed_update_is_ended(env: Env, booted: str) -> None:
    """A vmfork killed after the commit but before the old QEMU quit leaves
    it in ``postmigrate`` (``info.retire``); the next command ends it. A
    stand-in process plays the old QEMU here."""
    s = env.store()
    old = subprocess.Popen(["sleep", "300"])
    try:
        rec = s.get_vm("a")
        rec.info.retire = RetiredQemu(pid=old.pid, gen=7,
                                      pid_start=psutil.Process(old.pid).create_time())
        s.update_vm(rec)
        env.cli("ls", check=True)
        assert old.wait(timeout=10) == -9
        assert s.get_vm("a").info.retire is None
        assert run(vm.status(s, "a")) == "running"
    finally:
        old.kill()
        old.wait()
