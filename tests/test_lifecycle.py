"""Integration tests on real QEMU (TCG): run, exec, pause, resume, stop,
console, launch failures, bad input and VMs killed from outside, through the
library (:mod:`vmfork.vm`) and the ``vmfork`` CLI.

Each boot costs ~5-7 s under TCG, so each test boots at most one VM and checks
one behaviour with the assertions that belong to it. The ``env`` fixture's
leak check fails any test that leaves a QEMU process, socket or memory file.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from vmfork import launch, listing, vm
from vmfork.errors import GuestError, InvalidInput, LaunchError, StateError, VmforkTimeout
from vmfork.proc import process_alive
from vmfork.qemu.machine import Machine
from vmfork.store import Store

from .conftest import VMFORK, Env, qemu_processes, run

pytestmark = pytest.mark.qemu

DATA_CMD = "head -c 1048576 /dev/urandom > /root/data && md5sum /root/data"


# -- helpers -------------------------------------------------------------------------
def error_line(p: subprocess.CompletedProcess[str]) -> str:
    """The one line a failed command prints; fails on tracebacks or extra lines."""
    assert "Traceback" not in p.stderr, p.stderr
    lines = p.stderr.splitlines()
    assert len(lines) == 1, f"stderr is not one line: {p.stderr!r}"
    assert lines[0].startswith("vmfork: error: "), lines[0]
    return lines[0]


def assert_nothing_left(env: Env, name: str, store: Store | None = None) -> None:
    """No record, run dir, socket, memory file or QEMU process for *name*."""
    s = store or env.store()
    assert not s.has_vm(name)
    assert not s.run_dir(name).exists()
    assert list(s.home.rglob("*.sock")) == []
    assert list(env.memory_dir.iterdir()) == []
    assert qemu_processes(str(env.home)) == []


def qemu_wrapper(env: Env, extra: str) -> str:
    """A QEMU 'binary' that runs the real one with *extra* arguments appended."""
    w = env.home / "qemu-wrap"
    w.write_text(f'#!/bin/sh\nexec qemu-system-x86_64 "$@" {extra}\n')
    w.chmod(0o755)
    return str(w)


def guest_md5(env: Env, name: str) -> str:
    return env.exec(name, "md5sum /root/data").split()[0]


# -- library: run, state, exec --------------------------------------------------------------
def test_run_starts_a_detached_vm_and_records_it(env: Env) -> None:
    s = env.store()
    result = run(vm.run(s, vm.RunOptions(name="r1", demo=True, accel="tcg")))
    assert result.name == "r1" and result.accel == "tcg"
    assert 0 < result.boot_seconds < 120
    pid = result.pid
    rec = s.get_vm("r1")
    assert (rec.state, rec.pid) == ("running", pid)
    assert process_alive(rec.pid, rec.pid_start)
    assert run(vm.status(s, "r1")) == "running"
    # RAM is the named file in the memory dir, as big as the guest's RAM.
    mem = Path(result.memory_file)
    assert mem.parent == env.memory_dir and mem.name.startswith("r1-")
    assert mem.stat().st_size == 256 * 1024 * 1024
    assert str(mem) in " ".join(psutil.Process(pid).cmdline())
    # Own session (a terminal's Ctrl-C does not reach it); no inherited stdio.
    assert os.getsid(pid) == pid
    assert os.readlink(f"/proc/{pid}/fd/0") == "/dev/null"
    assert os.readlink(f"/proc/{pid}/fd/1") == str(launch.qemu_log(s, "r1"))
    assert os.readlink(f"/proc/{pid}/fd/2") == str(launch.qemu_log(s, "r1"))
    paths = launch.paths_for(s, rec)
    for sock in (paths.qmp, paths.console, paths.agent):
        assert Path(sock).is_socket()
    assert "VMFORK-READY" in Path(paths.console_log).read_text(errors="replace")
    run(vm.stop(s, "r1"))


def test_stop_removes_everything(env: Env, booted: str) -> None:
    s = env.store()
    rec = s.get_vm(booted)
    mem = Path(str(rec.spec.memory.path))
    assert mem.exists()
    run(vm.stop(s, booted))
    assert not process_alive(rec.pid, rec.pid_start)
    assert not mem.exists()
    assert_nothing_left(env, booted)
    with pytest.raises(Exception, match="no VM named"):
        run(vm.stop(s, booted))


def test_exec_output_status_and_data(env: Env, booted: str) -> None:
    s = env.store()
    r = run(vm.exec_(s, booted, "echo out; echo err >&2; exit 7"))
    assert (r.exit_code, r.stdout, r.stderr) == (7, "out\n", "err\n")
    assert "Linux version" in env.exec(booted, "cat /proc/version")
    # Large output arrives whole, or (QEMU's virtconsole drops data when the
    # host reads too slowly) the loss is reported - never silently cut.
    try:
        big = run(vm.exec_(s, booted, "head -c 300000 /dev/zero | tr '\\0' x"))
        assert (big.exit_code, big.stdout, big.stderr) == (0, "x" * 300000, "")
    except GuestError as exc:
        assert "cut short in transit" in str(exc)
    # Data written in the guest is readable back, byte for byte.
    md5 = env.exec(booted, DATA_CMD).split()[0]
    assert guest_md5(env, booted) == md5


def test_exec_timeout_then_next_command_is_not_confused(env: Env, booted: str) -> None:
    s = env.store()
    with pytest.raises(VmforkTimeout, match="guest command"):
        run(vm.exec_(s, booted, "sleep 2; echo late", timeout=0.5))
    # The late answer to the abandoned request must not be taken as this one's.
    assert env.exec(booted, "echo next") == "next\n"


def test_pause_and_resume(env: Env, booted: str) -> None:
    s = env.store()
    md5 = env.exec(booted, DATA_CMD).split()[0]
    run(vm.pause(s, booted))
    assert run(vm.status(s, booted)) == "paused"
    assert s.get_vm(booted).state == "paused"
    with pytest.raises(StateError, match="paused"):
        run(vm.exec_(s, booted, "true"))
    with pytest.raises(StateError, match="not running"):
        run(vm.pause(s, booted))
    run(vm.resume(s, booted))
    assert run(vm.status(s, booted)) == "running"
    assert s.get_vm(booted).state == "running"
    with pytest.raises(StateError, match="not paused"):
        run(vm.resume(s, booted))
    assert guest_md5(env, booted) == md5


def test_vm_killed_from_outside_is_dead(env: Env, booted: str) -> None:
    s = env.store()
    rec = s.get_vm(booted)
    assert rec.pid is not None
    os.kill(rec.pid, signal.SIGKILL)
    psutil.Process(rec.pid).wait(10)
    # Listing shows it dead and changes nothing; the next operation records it.
    assert [(r.name, r.state) for r in listing.statuses(s)] == [(booted, "dead")]
    assert s.get_vm(booted).state == "running"
    for op in (vm.pause(s, booted), vm.resume(s, booted), vm.status(s, booted),
               vm.exec_(s, booted, "true")):
        with pytest.raises(StateError, match="dead"):
            run(op)
    assert s.get_vm(booted).state == "dead"
    run(vm.stop(s, booted))
    assert_nothing_left(env, booted)


def test_memfd_backend(env: Env) -> None:
    s = env.store()
    result = run(vm.run(s, vm.RunOptions(name="m1", demo=True, accel="tcg",
                                         memory_backend="memfd")))
    assert result.memory_file is None
    assert list(env.memory_dir.iterdir()) == []
    assert "memory-backend-memfd" in " ".join(psutil.Process(result.pid).cmdline())
    assert env.exec("m1", "echo hi") == "hi\n"
    run(vm.stop(s, "m1"))
    assert_nothing_left(env, "m1")


def test_commas_in_paths(env: Env, session_images: Path) -> None:
    """Home (sockets, logs) and memory dir with commas reach QEMU escaped."""
    home, mdir = env.home / "h,1", env.memory_dir / "m,1"
    home.mkdir()
    (home / "images").symlink_to(session_images)
    s = Store(home, mdir)
    result = run(vm.run(s, vm.RunOptions(name="c1", demo=True, accel="tcg", memory_mib=128)))
    assert Path(result.memory_file).parent == mdir
    assert Path(result.memory_file).stat().st_size == 128 * 1024 * 1024
    assert run(vm.status(s, "c1")) == "running"
    r = run(vm.exec_(s, "c1", "echo hi"))
    assert (r.exit_code, r.stdout, r.stderr) == (0, "hi\n", "")
    run(vm.stop(s, "c1"))
    assert not s.has_vm("c1") and list(mdir.iterdir()) == []
    assert list(home.rglob("*.sock")) == []
    mdir.rmdir()


# -- launch failures ----------------------------------------------------------------------
def test_launch_failure_missing_kernel(env: Env) -> None:
    s = env.store()
    spec = vm.build_spec(s, vm.RunOptions(name="k1", demo=True, accel="tcg"))
    spec = spec.with_(kernel=str(env.home / "no-such-vmlinuz"))
    paths = s.run_paths("k1")
    with pytest.raises(LaunchError) as info:
        run(Machine.launch(spec, paths, s.run_dir("k1") / "qemu.log"))
    exc = info.value
    assert exc.exitcode == 1
    assert "no-such-vmlinuz" in str(exc) and "\n" not in str(exc)
    assert exc.argv[0] == "qemu-system-x86_64"
    assert qemu_processes(str(env.home)) == []
    assert list(s.home.rglob("*.sock")) == []
    # The memory file is the caller's (vm.run removes it on failure).
    if spec.memory.path:
        Path(spec.memory.path).unlink(missing_ok=True)


@pytest.mark.parametrize(("extra", "message"), [
    ("-vmfork-bogus-option", "invalid option"),
    ("-cpu no-such-cpu", "no-such-cpu"),
    ("-kernel /nonexistent/vmlinuz", "/nonexistent/vmlinuz"),
])
def test_launch_failure_cleans_up(env: Env, extra: str, message: str) -> None:
    s = env.store()
    opts = vm.RunOptions(name="bad", demo=True, accel="tcg", qemu=qemu_wrapper(env, extra))
    with pytest.raises(LaunchError, match=message) as info:
        run(vm.run(s, opts))
    assert info.value.exitcode == 1
    assert_nothing_left(env, "bad")


def test_socket_path_too_long(env: Env, session_images: Path) -> None:
    home = env.home / ("d" * 90)
    home.mkdir()
    (home / "images").symlink_to(session_images)
    s = Store(home, env.memory_dir)
    with pytest.raises(InvalidInput, match="shorter VMFORK_HOME"):
        run(vm.run(s, vm.RunOptions(name="long", demo=True, accel="tcg")))
    assert not s.has_vm("long")
    assert_nothing_left(env, "long", s)


# -- CLI ----------------------------------------------------------------------------------
def test_cli_run_exec_stop(env: Env) -> None:
    # Piped through cat: finishes only if QEMU does not hold the pipe open.
    p = subprocess.run(f"'{VMFORK}' run a --demo --accel tcg --json | cat", shell=True,
                       env=env.environ, capture_output=True, text=True, timeout=180,
                       stdin=subprocess.DEVNULL)
    assert p.returncode == 0, p.stderr
    result = json.loads(p.stdout)
    assert result["name"] == "a" and result["boot_seconds"] > 0
    # The VM outlives the command that started it.
    assert process_alive(result["pid"])
    ex = env.cli("exec", "a", "--", "cat", "/proc/version")
    assert ex.returncode == 0 and ex.stdout.startswith("Linux version"), ex
    ex = env.cli("exec", "a", "echo out; echo err >&2; exit 3")
    assert (ex.returncode, ex.stdout, ex.stderr) == (3, "out\n", "err\n")
    # Bytes that are not UTF-8 come back as written.
    raw = subprocess.run([VMFORK, "exec", "a", r"printf '\377o\n'; printf '\376e' >&2"],
                         env=env.environ, capture_output=True, timeout=120,
                         stdin=subprocess.DEVNULL)
    assert (raw.returncode, raw.stdout, raw.stderr) == (0, b"\xffo\n", b"\xfee")
    ls = json.loads(env.cli("ls", "--json", check=True).stdout)
    assert [(r["name"], r["state"], r["pid"]) for r in ls] == [("a", "running", result["pid"])]
    st = env.cli("stop", "a")
    assert st.returncode == 0 and st.stderr == "", st
    assert not process_alive(result["pid"])
    assert_nothing_left(env, "a")


def test_cli_demo_one_liner(env: Env) -> None:
    p = subprocess.run(f"'{VMFORK}' run a --demo && '{VMFORK}' exec a -- cat /proc/version "
                       f"&& '{VMFORK}' stop a", shell=True, env=env.environ,
                       capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL)
    assert p.returncode == 0, p.stderr
    assert "Linux version" in p.stdout and "a: stopped" in p.stdout
    # accel=auto fell back to TCG here and cached the verdict.
    assert "accel tcg" in p.stdout
    assert json.loads((env.home / "accel.json").read_text())["accel"] == "tcg"
    assert_nothing_left(env, "a")


def test_cli_pause_resume_console(env: Env, booted: str) -> None:
    s = env.store()
    p = env.cli("pause", booted)
    assert (p.returncode, p.stdout.strip()) == (0, f"{booted}: paused")
    assert run(vm.status(s, booted)) == "paused"
    assert "resume it first" in error_line(env.cli("exec", booted, "true"))
    assert env.cli("pause", booted).returncode == 1
    p = env.cli("resume", booted)
    assert (p.returncode, p.stdout.strip()) == (0, f"{booted}: running")
    assert run(vm.status(s, booted)) == "running"
    assert env.cli("resume", booted).returncode == 1
    # Not a terminal: stdin is sent to the serial console, the output printed.
    c = env.cli("console", booted, input="echo hello-$((6*7))\n", timeout=60)
    assert c.returncode == 0, c.stderr
    assert "hello-42" in c.stdout
    # A paused VM can be stopped.
    env.cli("pause", booted, check=True)
    assert env.cli("stop", booted).returncode == 0
    assert_nothing_left(env, booted)


def test_cli_dead_vm(env: Env, booted: str) -> None:
    rec = env.store().get_vm(booted)
    assert rec.pid is not None
    os.kill(rec.pid, signal.SIGKILL)
    psutil.Process(rec.pid).wait(10)
    ls = env.cli("ls")
    assert ls.returncode == 0
    assert [ln.split()[:2] for ln in ls.stdout.splitlines()[1:]] == [[booted, "dead"]]
    assert json.loads(env.cli("ls", "--json").stdout)[0]["state"] == "dead"
    for cmd in (("exec", booted, "true"), ("pause", booted), ("console", booted)):
        p = env.cli(*cmd)
        assert p.returncode == 1
        assert "dead" in error_line(p)
    assert env.store().get_vm(booted).state == "dead"
    st = env.cli("stop", booted)
    assert st.returncode == 0, st.stderr
    assert_nothing_left(env, booted)


def test_cli_duplicate_name_leaves_first_vm_alone(env: Env, booted: str) -> None:
    s = env.store()
    before = s.get_vm(booted)
    mem = Path(str(before.spec.memory.path))
    t0 = time.monotonic()
    p = env.cli("run", booted, "--demo", "--accel", "tcg")
    assert p.returncode == 1
    assert "exists already" in error_line(p)
    assert time.monotonic() - t0 < 10  # refused before any QEMU started
    after = s.get_vm(booted)
    assert (after.state, after.pid) == ("running", before.pid)
    assert mem.exists() and [x.name for x in env.memory_dir.iterdir()] == [mem.name]
    assert len(qemu_processes(str(env.home))) == 1
    assert env.exec(booted, "echo ok") == "ok\n"


@pytest.mark.parametrize(("args", "code", "message"), [
    (("run", "x", "--demo", "--accel", "tcg", "--memory", "12Q"), 2, "invalid size '12Q'"),
    (("run", "a/b", "--demo", "--accel", "tcg"), 2, "invalid VM name"),
    (("run", "a b", "--demo", "--accel", "tcg"), 2, "invalid VM name"),
    (("run", "x", "--kernel", "/nonexistent/vmlinuz", "--accel", "tcg"), 2, "does not exist"),
    (("run", "x", "--demo", "--accel", "tcg", "--memory-dir", "/proc/x/y"), 2, "memory dir"),
    (("run", "x", "--demo", "--accel", "tcg", "--port", "99999:22"), 2, "port forward"),
    (("run", "x", "--demo", "--accel", "tcg", "--memory", "16M"), 2, "between"),
    (("stop", "nope"), 1, "no VM named 'nope'"),
    (("exec", "nope", "true"), 1, "no VM named 'nope'"),
    (("pause", "nope"), 1, "no VM named 'nope'"),
    (("resume", "nope"), 1, "no VM named 'nope'"),
    (("console", "nope"), 1, "no VM named 'nope'"),
    (("stop", "a/b"), 2, "invalid VM name"),
    (("pause", "../a"), 2, "invalid VM name"),
    (("resume", "a b"), 2, "invalid VM name"),
    (("exec", "a/b", "true"), 2, "invalid VM name"),
    (("console", "a b"), 2, "invalid VM name"),
])
def test_cli_bad_input(env: Env, args: tuple[str, ...], code: int, message: str) -> None:
    p = env.cli(*args, timeout=60)
    assert p.returncode == code, p.stderr
    assert message in error_line(p)
    assert p.stdout == ""
    assert env.store().list_vms() == []
    assert list(env.memory_dir.iterdir()) == []
    assert list(env.home.rglob("*.sock")) == []
    assert not (env.home / "run").exists() or list((env.home / "run").iterdir()) == []
    assert qemu_processes(str(env.home)) == []
    assert not (env.home.parent / "a.lock").exists()


def test_cli_launch_failure(env: Env) -> None:
    p = env.cli("run", "bad", "--demo", "--accel", "tcg",
                "--qemu", qemu_wrapper(env, "-vmfork-bogus-option"))
    assert p.returncode == 1
    line = error_line(p)
    assert "exit status 1" in line and "-vmfork-bogus-option: invalid option" in line
    assert_nothing_left(env, "bad")


def test_cli_socket_path_too_long(env: Env, session_images: Path) -> None:
    home = env.home / ("d" * 90)
    home.mkdir()
    (home / "images").symlink_to(session_images)
    p = subprocess.run([VMFORK, "run", "x", "--demo", "--accel", "tcg"],
                       env={**env.environ, "VMFORK_HOME": str(home)}, capture_output=True,
                       text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert p.returncode == 2
    assert "shorter VMFORK_HOME" in error_line(p)
    assert_nothing_left(env, "x", Store(home, env.memory_dir))
