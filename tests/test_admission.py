"""Admission and clones with port forwards, on real QEMU: guest memory that
does not fit is refused before anything starts; a memory directory that
fills up during an update or a save fails the command cleanly (one line, no
QEMU or file left); names, clone counts and timeouts out of bounds are
refused up front; each clone of a template with ``--port`` gets host ports
of its own."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Env, qemu_processes, run
from vmfork import admission, ports, vm
from vmfork.errors import VmforkError
from vmfork.names import MAX_TEMPLATE_NAME
from vmfork.templates import catalog, clone, create
from vmfork.update import live

MIB = 1024 * 1024


def one_line_error(p: subprocess.CompletedProcess[str], status: int, *needles: str) -> str:
    assert p.returncode == status, p.stderr + p.stdout
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vmfork: error: "), p.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


@contextlib.contextmanager
def mounted(kind: str, size_mib: int, at: Path | None = None) -> Iterator[Path]:
    """A small file system (``tmpfs``, or ``ext4`` on a loop file) mounted at
    *at* (default a new directory), private to its user (vmfork refuses a
    directory others can write to), unmounted at the end."""
    where = at or Path(tempfile.mkdtemp(prefix="vfmnt", dir="/tmp"))
    where.mkdir(exist_ok=True)
    image = None
    if kind == "tmpfs":
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mib}m,mode=0700", "tmpfs",
                        str(where)], check=True)
    else:
        image = Path(tempfile.mkstemp(prefix="vfimg", dir="/tmp")[1])
        os.truncate(image, size_mib * MIB)
        subprocess.run(["mkfs.ext4", "-q", "-m", "0", str(image)], check=True)
        subprocess.run(["mount", "-o", "loop", str(image), str(where)], check=True)
        where.chmod(0o700)
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)
        if image is not None:
            image.unlink()
        if at is None:
            where.rmdir()


def fill(directory: Path, leave_mib: float) -> Path:
    """Fill the file system of *directory* until *leave_mib* MiB are free."""
    filler = directory / "filler"
    size = admission.free_space(directory) - int(leave_mib * MIB)
    if filler.exists():
        size += filler.stat().st_size
    subprocess.run(["fallocate", "-l", str(size), str(filler)], check=True)
    return filler


# -- refused up front (no QEMU is started) -------------------------------------------
def test_memory_that_does_not_fit_is_refused_before_launch(env: Env) -> None:
    p = env.cli("run", "big", "--demo", "--accel", "tcg", "--memory", "1T")
    one_line_error(p, 1, "big: 1048576 MiB of guest memory do not fit", "MiB free",
                   "MemAvailable is")
    with mounted("tmpfs", 64) as small:
        p = env.cli("run", "big", "--demo", "--accel", "tcg", "--memory", "128M",
                    "--memory-dir", str(small))
        one_line_error(p, 1, f"{small} has 64 MiB free", "MemAvailable is")
        assert list(small.iterdir()) == []
    assert not env.store().has_vm("big")
    assert list(env.memory_dir.iterdir()) == []


@pytest.mark.parametrize(("args", "needle"), [
    (("run", "_pool.t.abcdef", "--demo"), "vmfork's own"),
    (("run", "_build.t", "--demo"), "vmfork's own"),
    (("template", "create", "_bench.x", "--demo"), "vmfork's own"),
    (("template", "create", "t" * (MAX_TEMPLATE_NAME + 1), "--demo"),
     f"at most {MAX_TEMPLATE_NAME}"),
    (("clone", "t", "-n", str(clone.MAX_CLONES + 1)), f"must be 1-{clone.MAX_CLONES}"),
    (("clone", "t", "-n", "0"), f"must be 1-{clone.MAX_CLONES}"),
])
def test_names_and_counts_out_of_bounds(env: Env, args: tuple[str, ...], needle: str) -> None:
    one_line_error(env.cli(*args), 2, needle)
    assert not list(env.home.glob("run/*")) and not list(env.memory_dir.iterdir())


def test_timeouts_must_be_finite_and_positive(env: Env, booted: str) -> None:
    for bad in ("inf", "nan", "0", "-1"):
        one_line_error(env.cli("exec", booted, "--timeout", bad, "true"), 2,
                       "invalid exec timeout")
        one_line_error(env.cli("update", booted, "--timeout", bad), 2,
                       "invalid update timeout")
    assert env.exec(booted, "echo ok").strip() == "ok"  # untouched


# -- the memory directory fills up ------------------------------------------------------
def test_memory_dir_full_during_run(env: Env) -> None:
    """A memory directory that fills up while the guest boots kills QEMU
    (SIGBUS); the run fails with one line and leaves nothing."""
    s = env.store()

    async def run_and_fill(small: Path) -> None:
        async def fill_once_spawned() -> None:
            while not (s.has_vm("a") and s.get_vm("a").pid):
                await asyncio.sleep(0.01)
            fill(small, 0)

        filler = asyncio.ensure_future(fill_once_spawned())
        try:
            await vm.run(s, vm.RunOptions(name="a", demo=True, accel="tcg", memory_mib=128,
                                          memory_dir=str(small)))
        finally:
            await asyncio.wait_for(filler, 30)

    with mounted("tmpfs", 160) as small:
        with pytest.raises(VmforkError) as failed:
            run(run_and_fill(small))
        assert "\n" not in str(failed.value)
        assert "SIGBUS" in str(failed.value), failed.value
        assert [x.name for x in small.iterdir()] == ["filler"]
    assert not s.has_vm("a") and not qemu_processes(str(env.home))


def test_memory_dir_full_during_update(env: Env) -> None:
    """A copy update that does not fit is refused; one whose memory directory
    fills up while RAM is copied fails, and the guest runs on in its QEMU."""
    s = env.store()
    with mounted("tmpfs", 288) as small:
        run(vm.run(s, vm.RunOptions(name="a", demo=True, accel="tcg", memory_mib=128,
                                    memory_dir=str(small))))
        try:
            (own,) = list(small.iterdir())
            pid = s.get_vm("a").pid
            filler = fill(small, 4)
            one_line_error(env.cli("update", "a", "--mode", "copy"), 1,
                           "a copy update's second copy of guest memory do not fit",
                           f"{small} has 4 MiB free")
            filler.unlink()

            def fill_when_launched(phase: str, new_pid: int) -> None:
                if phase == "launched":
                    fill(small, 1)

            with pytest.raises(VmforkError) as failed:
                run(live.update(s, "a", mode="copy", on_phase=fill_when_launched))
            assert "\n" not in str(failed.value)
            assert "SIGBUS" in str(failed.value)
            filler.unlink()
            assert sorted(small.iterdir()) == [own]  # no new memory file left
            rec = s.get_vm("a")
            assert rec.state == "running" and rec.pid == pid
            assert [p.pid for p in qemu_processes(str(env.home))] == [pid]
            assert env.exec("a", "echo ok").strip() == "ok"
        finally:
            run(vm.stop(s, "a", force=True))


def test_memory_dir_full_during_save(env: Env) -> None:
    """A save whose file system (memory file and state) is full fails with one
    line; the VM runs on and nothing of the save is left."""
    vms = env.home / "vms"
    with mounted("ext4", 224, at=vms):
        mdir = vms / "_memory"
        p = env.cli("run", "p", "--demo", "--accel", "tcg", "--memory", "128M", "--persistent",
                    "--memory-dir", str(mdir))
        assert p.returncode == 0, p.stderr
        try:
            filler = fill(vms, 0.01)
            line = one_line_error(env.cli("save", "p"), 1)
            assert "No space left on device" in line or "ENOSPC" in line, line
            filler.unlink()
            assert sorted(x.name for x in (vms / "p").iterdir()) == []
            rec = env.store().get_vm("p")
            assert rec.state == "running"
            assert [q.pid for q in qemu_processes(str(env.home))] == [rec.pid]
            assert env.exec("p", "echo ok").strip() == "ok"
        finally:
            env.cli("stop", "p", "--force")


# -- clones of a template with port forwards ---------------------------------------------
def http_get(url: str, tries: int = 3, timeout: float = 10.0) -> str:
    """The body at *url*, trying again on a new connection if one stalls, as
    an HTTP client would."""
    for attempt in range(tries):
        try:
            with urllib.request.urlopen(url, timeout=timeout) as r:
                return str(r.read().decode())
        except TimeoutError:
            if attempt == tries - 1:
                raise
    raise AssertionError("unreachable")


def owner_of_listening_port(port: int) -> int | None:
    """The pid of the process that listens on 127.0.0.1:*port*."""
    inode = None
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        f = line.split()
        local, state = f[1], f[3]
        if state == "0A" and int(local.split(":")[1], 16) == port:
            inode = f[9]
    if inode is None:
        return None
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{pid}/fd/{fd}") == f"socket:[{inode}]":
                        return int(pid)
    return None


def test_clones_get_host_ports_of_their_own(env: Env) -> None:
    s = env.store()
    port = ports.free_port()
    run(vm.run(s, vm.RunOptions(name="src", demo=True, accel="tcg", ports=((port, 80),))))
    env.exec("src", "mkdir -p /www && httpd -h /www -p 80")
    run(create.create_from_vm(s, "web", "src"))
    try:
        p = env.cli("clone", "web", "-n", "2", "--json")
        assert p.returncode == 0, p.stderr
        clones = json.loads(p.stdout)
        hosts = [c["ports"][0][0] for c in clones]
        assert len(set(hosts)) == 2 and port not in hosts
        listed = {r["name"]: r["ports"] for r in json.loads(env.cli("ls", "--json").stdout)}
        for c in clones:
            name, ((host, guest),) = c["name"], c["ports"]
            assert guest == 80 and listed[name] == [[host, 80]]
            assert owner_of_listening_port(host) == c["pid"]
            # Through the forward at once: the clone announced its new MAC
            # to the user-mode network, whose state came from the template.
            env.exec(name, f"echo {name} > /www/index.html")
            assert http_get(f"http://127.0.0.1:{host}/", tries=1).strip() == name
    finally:
        run(catalog.remove(s, "web", force=True))
