"""``template create`` and ``template rm`` against concurrency, cancellation
and kill -9 at each step, on real QEMU with the demo guest.

The name is reserved before any work, so a second creation of it is refused
at once; a creation or removal whose vmfork died is finished or undone by
the next command (``template ls``, ``clone``, a command on the source VM),
the source VM either running with its data or become the template, and
nothing left behind (the conftest fails a test on a leftover QEMU, socket or
memory file). The freeze of a Debian guest is covered in
tests/test_debian_template.py.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from vmfork import vm
from vmfork.errors import AlreadyExists, NotFound, StateError
from vmfork.proc import process_alive
from vmfork.records import TemplateWork
from vmfork.store import Store
from vmfork.templates import create

from .conftest import VMFORK, Env, run
from .test_snapshot import kill9_at, stalled_cli
from .test_template import PREPARE, make_template, md5_matches
from .test_units import sample_manifest

CREATE_T = ("template", "create", "T", "--from", "a")


def boot_with_data(env: Env, name: str) -> None:
    env.cli("run", name, "--demo", "--accel", "tcg", check=True)
    env.exec(name, PREPARE)


def templates_ls(env: Env) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = json.loads(env.cli("template", "ls", "--json",
                                                    check=True).stdout)
    return rows


def one_line_error(p: subprocess.CompletedProcess[str]) -> str:
    """The one error line of a failed command (a settled interruption may be
    reported on a warning line before it)."""
    errors = [ln for ln in p.stderr.splitlines() if "WARNING" not in ln]
    assert p.returncode != 0 and len(errors) == 1, (p.returncode, p.stderr)
    return errors[0]


def vm_state(env: Env, name: str) -> str:
    """What the VM's QEMU says (no settling: the library, not the API)."""
    return run(vm.status(env.store(), name))


def assert_running_with_data(env: Env, name: str) -> None:
    assert vm_state(env, name) == "running"
    assert md5_matches(env, name)


# -- the catalog's side ---------------------------------------------------------------
def test_a_reservation_holds_the_name_and_is_no_template(tmp_path: Path) -> None:
    s = Store(tmp_path / "home", tmp_path / "mem")
    work = TemplateWork(name="t", op="create", pid=1, pid_start=None, started=1.0,
                        source_vm="a")
    s.reserve_template(work)
    with pytest.raises(StateError, match="being created by another vmfork command"):
        s.reserve_template(work)
    with pytest.raises(StateError, match="not complete"):
        s.get_template("t")
    assert s.list_templates() == [] and s.template_names() == ["t"]
    assert s.template_works() == [("creating", work)]
    manifest = sample_manifest("t")
    s.finish_template(manifest, "a")
    assert s.get_template("t") == manifest and s.template_works() == []
    with pytest.raises(AlreadyExists):
        s.reserve_template(work)
    with pytest.raises(StateError, match="no longer reserved"):
        s.finish_template(manifest, None)
    removing = TemplateWork(name="t", op="remove", pid=1, pid_start=None, started=2.0)
    assert s.mark_template_removing(removing) and not s.mark_template_removing(removing)
    with pytest.raises(StateError, match="being removed"):
        s.get_template("t")
    assert s.get_template("t", usable=False) == manifest
    s.remove_template("t")
    with pytest.raises(NotFound):
        s.get_template("t")
    s.close()


# -- concurrency ----------------------------------------------------------------------
def test_two_creations_of_one_name_one_wins_the_other_touches_nothing(env: Env) -> None:
    boot_with_data(env, "a")
    boot_with_data(env, "b")
    procs = {src: subprocess.Popen([VMFORK, "template", "create", "T", "--from", src],
                                   env=env.environ, stdin=subprocess.DEVNULL,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for src in ("a", "b")}
    results = {src: (p.wait(timeout=300), p.communicate()[1]) for src, p in procs.items()}
    winners = [src for src, (rc, _err) in results.items() if rc == 0]
    assert len(winners) == 1, results
    (loser,) = {"a", "b"} - set(winners)
    rc, err = results[loser]
    assert rc != 0 and err.count("\n") == 1, results
    assert ("being created" in err or "exists already" in err), err
    assert_running_with_data(env, loser)
    env.cli("clone", "T", "c", check=True)
    assert md5_matches(env, "c")
    assert [r["status"] for r in templates_ls(env)] == ["ready"]
    env.cli("stop", "c", check=True)
    env.cli("stop", loser, check=True)
    env.cli("template", "rm", "T", check=True)


# -- cancellation and kill -9 of a creation from a VM ------------------------------
def test_create_from_a_vm_cancelled_or_killed_at_each_step(env: Env,
                                                           monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    boot_with_data(env, "a")
    tdir = env.home / "templates" / "T"

    # Cancelled in-process once the state is saved (QEMU in postmigrate):
    # the VM runs again, and nothing of T is left.
    async def cancel_at_saved(step: str) -> None:
        if step == "template.saved":
            raise asyncio.CancelledError

    with monkeypatch.context() as mp:
        mp.setattr(create, "checkpoint", cancel_at_saved)
        with pytest.raises(asyncio.CancelledError):
            run(create.create_from_vm(env.store(), "T", "a"))
    assert_running_with_data(env, "a")
    assert not tdir.exists() and not env.store().has_template("T")

    # Reserved: a second creation is refused at once and touches nothing;
    # `template ls` shows the reservation while its creator lives, and
    # settles it once the creator is killed.
    for p in stalled_cli(env, "template.reserved", *CREATE_T):
        assert "being created" in one_line_error(env.cli(*CREATE_T))
        assert "not complete" in one_line_error(env.cli("clone", "T"))
        assert [(r["name"], r["status"]) for r in templates_ls(env)] == [("T", "creating")]
        assert tdir.is_dir()
        p.kill()
    assert templates_ls(env) == []
    assert not tdir.exists()
    assert_running_with_data(env, "a")

    # Paused: the next command on the VM resumes it.
    kill9_at(env, "template.paused", *CREATE_T)
    assert vm_state(env, "a") == "paused"
    env.cli("exec", "a", "true", check=True)
    assert_running_with_data(env, "a")
    assert not tdir.exists() and templates_ls(env) == []

    # Saved, QEMU still there (postmigrate): undone by `clone T`, which then
    # finds no template.
    kill9_at(env, "template.saved", *CREATE_T)
    assert vm_state(env, "a") == "postmigrate" and (tdir / "state").is_file()
    assert "no template" in one_line_error(env.cli("clone", "T"))
    assert_running_with_data(env, "a")
    assert not tdir.exists()

    # QEMU has quit after the save: `clone T` finishes the template (the
    # VM became it) and clones it.
    pid = env.store().get_vm("a").pid
    kill9_at(env, "template.qemu-quit", *CREATE_T)
    assert not process_alive(pid)
    env.cli("clone", "T", "c", check=True)
    assert md5_matches(env, "c")
    assert not env.store().has_vm("a")
    assert [(r["name"], r["status"]) for r in templates_ls(env)] == [("T", "ready")]
    env.cli("stop", "c", check=True)
    env.cli("template", "rm", "T", check=True)
    assert not tdir.exists()


@pytest.mark.parametrize("step", ["template.saved", "template.recorded"])
def test_demo_create_killed(env: Env, step: str) -> None:
    """A half-made demo template is undone and its build VM ended; one
    killed after it was recorded is complete."""
    kill9_at(env, step, "template", "create", "D", "--demo", "--memory", "256M",
             "--accel", "tcg", "--prepare", PREPARE)
    rows = templates_ls(env)
    if step == "template.saved":
        assert rows == [] and not (env.home / "templates" / "D").exists()
    else:
        assert [(r["name"], r["status"]) for r in rows] == [("D", "ready")]
        env.cli("clone", "D", "c", check=True)
        assert md5_matches(env, "c")
        env.cli("stop", "c", check=True)
        env.cli("template", "rm", "D", check=True)
    assert json.loads(env.cli("ls", "--json", check=True).stdout) == []


# -- template rm ------------------------------------------------------------------------
def test_template_rm_killed_is_finished_by_the_next_command(env: Env) -> None:
    manifest = make_template(env, "T")
    env.cli("clone", "T", "c", check=True)
    for p in stalled_cli(env, "template-rm.stopped", "template", "rm", "T", "--force"):
        assert not env.store().has_vm("c")
        assert "being removed" in one_line_error(env.cli("clone", "T"))
        assert [(r["name"], r["status"]) for r in templates_ls(env)] == [("T", "removing")]
        assert Path(manifest.memory_file).exists()
        p.kill()
    assert templates_ls(env) == []
    assert not Path(manifest.memory_file).exists()
    assert not (env.home / "templates" / "T").exists()
