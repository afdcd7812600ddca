"""Signals and kills in the middle of vmfork's operations, on real QEMU.

SIGTERM, SIGINT or SIGHUP to a ``vmfork`` command stalled at a step
(:mod:`vmfork.checkpoints`) cancels the operation: the command prints one
line and exits with 128 + the signal number, and what it was doing is undone
(run, clone, restore, export, import, a save before QEMU quit, an update) or
finished (a save whose QEMU quit): the VM keeps its data (md5 of a file in
the guest), ``vmfork ls`` shows no half state, and no QEMU, socket, memory
file or temporary file is left. A second signal during the cleanup does not
cut it short. A kill -9 at the steps added for clone, pool and import leaves
what the next command finishes or removes: a run, clone or import killed
before it was ready is an abandoned launch, listed as such (listing changes
nothing) and undone by the next command that creates VMs, its name free
again, or by ``stop``. A save killed after its manifest
was written is invalidated by a resume: a later death of that QEMU is not a
save.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.conftest import qemu_processes
from tests.test_snapshot import fill, kill9_at, ls, md5_of, record, stalled_cli, start_vm
from vmfork import vm
from vmfork.proc import process_alive

if TYPE_CHECKING:
    from tests.conftest import Env

#: How long a command may take to end after the signal (its cleanup is bounded
#: by its own deadlines: QEMU quit and kill, QMP).
CLEANUP_WAIT = 120


def interrupt_at(env: Env, step: str, sig: int, *args: str,
                 twice: bool = False) -> list[str]:
    """Run ``vmfork ARGS`` until it stalls at *step*, send *sig* (twice
    with *twice*, the second during the cleanup); assert it exits with
    128 + *sig* and one line on stderr naming the signal besides the stall's
    own. Return its stderr lines."""
    for p in stalled_cli(env, step, *args):
        p.send_signal(sig)
        if twice:
            time.sleep(0.05)
            p.send_signal(sig)
        code = p.wait(CLEANUP_WAIT)
    lines = (env.home / f"stall-{step}.log").read_text().splitlines()
    lines = [ln for ln in lines if "stalling at" not in ln]
    assert code == 128 + sig, (code, lines)
    assert lines == [f"vmfork: interrupted ({signal.Signals(sig).name})"], lines
    return lines


def qemus(env: Env) -> set[int]:
    return {p.pid for p in qemu_processes(str(env.home))}


def vm_qemus(env: Env) -> set[int]:
    """The QEMU processes the catalog knows (VMs and pool members)."""
    s = env.store()
    pids = {r.pid for r in s.list_vms() if r.pid and process_alive(r.pid, r.pid_start)}
    return pids | {m.pid for m in s.pool_members() if process_alive(m.pid, m.pid_start)}


def assert_no_orphans(env: Env, dest_dir: Path | None = None) -> None:
    """Every QEMU belongs to a VM or pool member, every memory file to a VM,
    and no export left a temporary file in *dest_dir*."""
    assert qemus(env) == vm_qemus(env)
    s = env.store()
    files = {Path(str(r.spec.memory.path)).name for r in s.list_vms() if r.spec.memory.path}
    files |= {Path(t.memory_file).name for t in s.list_templates()}
    assert {p.name for p in env.memory_dir.iterdir()} <= files
    if dest_dir is not None:
        assert not [p for p in dest_dir.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize(("sig", "twice"), [(signal.SIGTERM, True), (signal.SIGINT, False),
                                           (signal.SIGHUP, False)])
def test_signal_cancels_a_run(env: Env, sig: int, twice: bool) -> None:
    interrupt_at(env, "run.spawned", sig, "run", "a", "--demo", "--accel", "tcg",
                 twice=twice)
    assert ls(env) == {}
    assert not qemus(env) and not list(env.memory_dir.iterdir())
    assert not (env.home / "vms" / "a").exists() and not (env.home / "run" / "a").exists()


def test_sigterm_mid_save_restore_export_import_update(env: Env) -> None:
    start_vm(env)
    md5 = fill(env, "a", 8)
    out = env.home / "out"
    out.mkdir()

    def intact(state: str = "running") -> None:
        assert ls(env)["a"]["state"] == state
        assert_no_orphans(env, out)
        if state == "running":
            assert md5_of(env, "a") == md5

    # A save cancelled before QEMU quit is undone: the VM runs, no save files.
    for step in ("save.paused", "save.state-written", "save.manifest-written"):
        interrupt_at(env, step, signal.SIGTERM, "save", "a")
        intact()
        assert not list((env.home / "vms" / "a").glob("state.*"))
    # Cancelled after QEMU quit, the save is finished.
    interrupt_at(env, "save.qemu-quit", signal.SIGTERM, "save", "a")
    intact("saved")
    # A restore cancelled is undone: still saved, and the save still restores.
    interrupt_at(env, "restore.spawned", signal.SIGTERM, "restore", "a")
    intact("saved")
    env.cli("restore", "a", check=True)
    intact()

    # An export cancelled leaves no file, the VM runs on.
    interrupt_at(env, "export.written", signal.SIGTERM, "snapshot", "export", "a",
                 str(out / "a.snap"))
    assert not (out / "a.snap").exists()
    intact()

    # An import cancelled leaves no VM and none of its files.
    env.cli("snapshot", "export", "a", str(out / "a.snap"), check=True)
    for step in ("import.extracted", "import.spawned"):
        interrupt_at(env, step, signal.SIGINT, "snapshot", "import", str(out / "a.snap"), "b")
        assert set(ls(env)) == {"a"} and not (env.home / "vms" / "b").exists()
        intact()

    # An update cancelled before the guest moved is rolled back.
    pid = record(env, "a").pid
    for step in ("update.launched", "update.migrated"):
        interrupt_at(env, step, signal.SIGTERM, "update", "a")
        assert record(env, "a").pid == pid
        intact()


def test_sigterm_mid_clone_and_pool_refill(env: Env) -> None:
    env.cli("template", "create", "t", "--demo", "--memory", "256M", "--accel", "tcg",
            check=True)
    # A batch of clones cancelled: every clone of the call is removed.
    for step in ("clone.spawned", "clone.identity"):
        interrupt_at(env, step, signal.SIGTERM, "clone", "t", "-n", "2")
        assert ls(env) == {}
        assert_no_orphans(env)
        assert not [p for p in (env.home / "vms").glob("t-*")]
    # A pool fill cancelled leaves no member.
    interrupt_at(env, "pool.spawned", signal.SIGTERM, "pool", "t", "--size", "2")
    assert not env.store().pool_members("t")
    assert not qemus(env)

    # kill -9 mid-clone, before its guest runs or after: the half-made clone
    # is listed as abandoned, and the next clone undoes it (its name is free
    # again); kill -9 mid-fill: the next fill ends the member left not ready.
    kill9_at(env, "clone.spawned", "clone", "t", "c")
    first = record(env, "c")
    assert first.state == "starting" and process_alive(first.pid, first.pid_start)
    assert ls(env)["c"]["state"] == "abandoned" and record(env, "c") == first
    kill9_at(env, "clone.identity", "clone", "t", "c")
    second = record(env, "c")
    assert not process_alive(first.pid, first.pid_start)
    assert second.state == "running" and process_alive(second.pid, second.pid_start)
    assert ls(env)["c"]["state"] == "abandoned" and record(env, "c") == second
    env.cli("clone", "t", "c", check=True)
    assert not process_alive(second.pid, second.pid_start)
    assert ls(env)["c"]["state"] == "running" and record(env, "c").info.launcher is None
    assert_no_orphans(env)
    env.cli("stop", "c", check=True)
    assert not qemus(env) and ls(env) == {}
    kill9_at(env, "pool.spawned", "pool", "t", "--size", "1")
    left = env.store().pool_members("t")
    assert len(left) == 1 and not left[0].ready
    status = json.loads(env.cli("pool", "t", "--size", "1", "--json", check=True).stdout)
    assert status["ready"] == 1
    assert not process_alive(left[0].pid, left[0].pid_start)
    env.cli("pool", "t", "--size", "0", check=True)
    assert not qemus(env)
    env.cli("template", "rm", "t", check=True)


def test_kill9_mid_import_is_removed_by_stop(env: Env) -> None:
    start_vm(env, persistent=False)
    snap = env.home / "a.snap"
    env.cli("snapshot", "export", "a", str(snap), check=True)
    env.cli("stop", "a", check=True)
    kill9_at(env, "import.spawned", "snapshot", "import", str(snap), "b")
    assert ls(env)["b"]["state"] == "abandoned"
    env.cli("stop", "b", check=True)
    assert ls(env) == {} and not qemus(env) and not list(env.memory_dir.iterdir())
    assert not (env.home / "vms" / "b").exists()


def test_kill9_mid_run_is_undone_by_the_next_run(env: Env) -> None:
    kill9_at(env, "run.spawned", "run", "a", "--demo", "--accel", "tcg")
    half = record(env, "a")
    assert half.state == "starting" and process_alive(half.pid, half.pid_start)
    assert half.info.launcher is not None
    assert not process_alive(half.info.launcher.pid, half.info.launcher.start)
    assert ls(env)["a"]["state"] == "abandoned" and record(env, "a") == half
    # The name is free again: the next run undoes the abandoned launch first.
    p = env.cli("run", "a", "--demo", "--accel", "tcg", "--ready", "none", check=True)
    assert "abandoned" in p.stderr, p.stderr
    assert not process_alive(half.pid, half.pid_start)
    new = record(env, "a")
    assert new.state == "running" and new.pid != half.pid and new.info.launcher is None
    assert_no_orphans(env)
    env.cli("stop", "a", check=True)
    assert not qemus(env) and not list(env.memory_dir.iterdir())


def test_resume_invalidates_an_interrupted_save(env: Env) -> None:
    start_vm(env)
    md5 = fill(env, "a", 8)

    # Killed with the manifest written, QEMU paused after the save: if that
    # QEMU dies without having run, the save is complete and restores.
    kill9_at(env, "save.manifest-written", "save", "a")
    qemu = record(env, "a")
    os.kill(qemu.pid, signal.SIGKILL)
    env.cli("restore", "a", check=True)
    assert md5_of(env, "a") == md5

    # Killed there again, then resumed: the guest runs on (new data), so the
    # save no longer describes it; when its QEMU dies, nothing is restored.
    kill9_at(env, "save.manifest-written", "save", "a")
    manifest = env.home / "vms" / "a" / vm.MANIFEST_FILE
    assert manifest.exists()
    p = env.cli("resume", "a", check=True)
    assert not manifest.exists() and not (env.home / "vms" / "a" / vm.STATE_FILE).exists()
    assert "invalidated" in p.stderr
    newer = fill(env, "a", 4)
    assert newer != md5
    qemu = record(env, "a")
    os.kill(qemu.pid, signal.SIGKILL)
    while process_alive(qemu.pid, qemu.pid_start):
        time.sleep(0.01)
    p = env.cli("restore", "a")
    assert p.returncode == 1 and "a is dead, not saved" in p.stderr, p.stderr
    assert ls(env)["a"]["state"] == "dead"
    env.cli("stop", "a", check=True)


def test_a_manifest_of_another_qemu_is_not_a_save(env: Env) -> None:
    """Even a manifest left behind (by an older vmfork) does not make a dead
    VM saved when its last QEMU is not the one that wrote it."""
    start_vm(env)
    kill9_at(env, "save.manifest-written", "save", "a")
    state, manifest = vm.state_paths(env.store(), "a")
    kept = {p: p.read_bytes() for p in (state, manifest)}

    def put_back() -> None:  # as if nothing had invalidated the save
        for p, data in kept.items():
            p.write_bytes(data)
    env.cli("resume", "a", check=True)
    put_back()
    env.cli("update", "a", check=True)  # invalidates it, and moves to another QEMU
    assert not manifest.exists() and not state.exists()
    put_back()
    qemu = record(env, "a")
    os.kill(qemu.pid, signal.SIGKILL)
    while process_alive(qemu.pid, qemu.pid_start):
        time.sleep(0.01)
    p = env.cli("restore", "a")
    assert p.returncode == 1 and "a is dead, not saved" in p.stderr, p.stderr
    env.cli("stop", "a", check=True)


def test_stale_export_temp_files_are_removed(env: Env, tmp_path: Path) -> None:
    from vmfork.snapshots import export

    dest = tmp_path / "x.snap"
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = dest.with_name(f".x.snap.{dead.pid}-abc123{export.TEMP_SUFFIX}")
    live = export.temp_file(dest)
    other = tmp_path / f".y.snap.{dead.pid}-abc123{export.TEMP_SUFFIX}"
    for p in (stale, live, other):
        p.write_bytes(b"partial")
    export.remove_stale_temp_files(dest)
    assert not stale.exists() and live.exists() and other.exists()
