"""Private by default, on real QEMU: what vmfork and its QEMU create is its
user's alone (files 0600, a template's 0400, directories 0700, as another
user sees them), a directory that is not the user's own is refused before
anything is written, and a memory file put in the place of a VM's is
refused by save, restore and update."""

from __future__ import annotations

import asyncio
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import pytest

from vmfork import private, vm
from vmfork.errors import MigrationError, UnsafePath
from vmfork.snapshots import export
from vmfork.snapshots import save as saving
from vmfork.store import Store, default_memory_dir
from vmfork.templates import catalog, clone, create
from vmfork.update import live

if TYPE_CHECKING:
    from conftest import Env

T = TypeVar("T")
NOBODY = 65534
#: A Python that user nobody may run (the test's own lives under root's home).
SYSTEM_PYTHON = "/usr/bin/python3"


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def start_vm(env: Env, name: str = "a", persistent: bool = True) -> None:
    run(vm.run(env.store(), vm.RunOptions(name=name, demo=True, accel="tcg",
                                          persistent=persistent)))


def entries(*roots: Path) -> Iterator[Path]:
    """Every file and directory under *roots* (the test's shared images,
    linked into the home, are not vmfork's making)."""
    for root in roots:
        yield root
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames if not (Path(dirpath) / d).is_symlink()]
            for n in (*dirnames, *filenames):
                p = Path(dirpath) / n
                if not p.is_symlink():
                    yield p


def check_private(env: Env, *extra: Path, readonly: tuple[Path, ...] = ()) -> int:
    """Assert the modes of everything in the home, the memory dir and *extra*:
    directories 0700, files 0600 (*readonly* ones 0400), sockets without
    group or other bits. Returns how many were checked."""
    bad = []
    n = 0
    for p in (*entries(env.home, env.memory_dir), *extra):
        st = os.lstat(p)
        mode = stat.S_IMODE(st.st_mode)
        if stat.S_ISDIR(st.st_mode):
            want = private.DIR_MODE
        elif stat.S_ISSOCK(st.st_mode):
            want = mode & ~0o077
        else:
            want = private.READONLY_MODE if p in readonly else private.FILE_MODE
        n += 1
        if mode != want:
            bad.append(f"{p} {mode:04o} (want {want:04o})")
    assert not bad, "not private: " + ", ".join(bad)
    return n


def unreadable_by_nobody(paths: list[Path]) -> list[str]:
    """The paths that user nobody can open or list (should be none)."""
    code = ("import os, sys\n"
            "for p in sys.argv[1:]:\n"
            "    try:\n"
            "        os.listdir(p) if os.path.isdir(p) else os.close(os.open(p, os.O_RDONLY))\n"
            "        print(p)\n"
            "    except OSError:\n"
            "        pass\n")
    out = subprocess.run([SYSTEM_PYTHON, "-c", code, *map(str, paths)], user=NOBODY,
                         capture_output=True, text=True, check=True, timeout=30)
    return out.stdout.split()


def swap(path: Path) -> Path:
    """Put a copy of *path* (same content, another inode) in its place; return
    where the original is kept."""
    keep = path.with_name(path.name + ".orig")
    copy = path.with_name(path.name + ".copy")
    subprocess.run(["cp", "--sparse=always", str(path), str(copy)], check=True, timeout=60)
    os.rename(path, keep)
    os.rename(copy, path)
    return keep


# -- modes -----------------------------------------------------------------------------
def test_files_and_dirs_are_private(env: Env, tmp_path: Path) -> None:
    umask = os.umask(0o022)  # a program that embeds vmfork, with the usual umask
    try:
        start_vm(env)
        s = env.store()
        rec = s.get_vm("a")
        mem = Path(str(rec.spec.memory.path))
        assert {p.name for p in s.run_dir("a").glob("*.sock")} >= {"qmp.sock", "console.sock",
                                                                   "agent.sock"}
        assert (s.run_dir("a") / "console.log").exists()
        ran = check_private(env)

        out = tmp_path / "exports"
        out.mkdir(mode=0o755)
        run(export.export(s, "a", out / "a.snap"))
        run(saving.save(s, "a"))
        state, manifest = saving.state_paths(s, "a")
        assert state.exists() and manifest.exists()
        check_private(env, out / "a.snap")

        run(saving.restore(s, "a", sync_clock=False))
        run(create.create_from_vm(s, "t", "a"))
        t = s.get_template("t")
        run(clone.clone(s, "t", ["c"], set_identity=False))
        tdir = Path(t.state_file).parent
        readonly = (Path(t.memory_file), Path(t.state_file))
        assert Path(t.memory_file).parent == mem.parent
        checked = check_private(env, readonly=readonly)
        assert checked > ran  # the template's and the clone's files were seen
        assert (tdir / "manifest.json").exists()
        assert os.umask(0o022) == 0o022  # the library left the umask alone

        everything = [*entries(env.home, env.memory_dir), out / "a.snap"]
        assert unreadable_by_nobody(everything) == []
        # Even with the home and memory dir opened up, nothing inside is
        # readable by another user.
        for d in (env.home, env.memory_dir, *mem.parents):
            if d.is_relative_to(env.home) or d == env.memory_dir:
                d.chmod(0o711)
        files = [p for p in everything if p.is_file()]
        assert unreadable_by_nobody(files) == []
        for d in (env.home, env.memory_dir, mem.parent):
            d.chmod(0o700)
        run(vm.stop(s, "c"))
        run(catalog.remove(s, "t"))
    finally:
        os.umask(umask)


# -- directories -------------------------------------------------------------------------
def test_default_memory_dir_is_per_user(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VMFORK_MEMORY_DIR", raising=False)
    assert default_memory_dir() == Path(f"/dev/shm/vmfork-{os.geteuid()}")


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory in the shared location (/dev/shm), removed afterwards."""
    d = Path(tempfile.mkdtemp(prefix="vfshared", dir="/dev/shm"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_unsafe_dirs_are_refused_before_anything_is_written(env: Env,
                                                            shared_dir: Path) -> None:
    foreign = shared_dir / "theirs"
    foreign.mkdir()
    os.chown(foreign, NOBODY, NOBODY)
    foreign.chmod(0o777)  # another user made it first, open to all
    writable = shared_dir / "open"
    writable.mkdir()
    writable.chmod(0o777)
    mine = shared_dir / "mine"
    mine.mkdir(mode=0o700)
    link = shared_dir / "link"
    link.symlink_to(mine)
    cases = {foreign: f"belongs to uid {NOBODY}", writable: "writable by other users",
             link: "is a symbolic link"}
    for d, why in cases.items():
        with pytest.raises(UnsafePath, match=why):
            run(vm.run(env.store(), vm.RunOptions(name="a", demo=True, accel="tcg",
                                                  memory_dir=str(d))))
        p = env.cli("run", "a", "--demo", "--accel", "tcg", "--memory-dir", str(d))
        assert p.returncode == 2, p.stderr
        assert p.stderr.count("\n") == 1 and why in p.stderr
        # Nothing written: no VM, no memory file, no run directory.
        assert not env.store().list_vms()
        assert list(mine.iterdir()) == [] and list(foreign.iterdir()) == []
        assert list(writable.iterdir()) == []
        assert not (env.home / "run").exists() or not list((env.home / "run").iterdir())
    # A memory dir under the shared location that is missing is made 0700.
    fresh = shared_dir / "new" / "mem"
    assert private.private_dir(fresh, "memory dir") == fresh
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o700

    # A home owned by another user, or a symbolic link, is refused too.
    for home, why in ((foreign, f"belongs to uid {NOBODY}"), (link, "symbolic link")):
        p = subprocess.run([str(Path(sys.executable).with_name("vmfork")), "ls"],
                           env={**env.environ, "VMFORK_HOME": str(home)},
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == 2 and p.stderr.count("\n") == 1 and why in p.stderr
    assert list(foreign.iterdir()) == [] and list(mine.iterdir()) == []


def test_a_home_of_an_earlier_version_is_tightened(tmp_path: Path) -> None:
    """Earlier versions made 0755 directories and a 0644 catalog: ours, and
    nobody else could write into them, so they are made private, not refused."""
    home = tmp_path / "old"
    home.mkdir(mode=0o755)
    home.chmod(0o755)
    Store(home, tmp_path / "mem").close()
    (home / "vmfork.db").chmod(0o644)
    Store(home, tmp_path / "mem").close()
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    assert stat.S_IMODE((home / "vmfork.db").stat().st_mode) == 0o600


# -- memory file identity -----------------------------------------------------------------
def test_a_replaced_memory_file_is_refused(env: Env) -> None:
    start_vm(env)
    s = env.store()
    rec = s.get_vm("a")
    mem = Path(str(rec.spec.memory.path))
    env.exec("a", "echo before > /root/mark")

    # Update: the new QEMU would open the copy; refused, the guest runs on.
    keep = swap(mem)
    with pytest.raises(MigrationError, match="was replaced") as info:
        run(live.update(s, "a", mode="ignore-shared"))
    assert "\n" not in str(info.value)
    with pytest.raises(MigrationError, match="was replaced"):
        run(saving.save(s, "a"))
    after = s.get_vm("a")
    assert after.state == "running" and after.pid == rec.pid
    assert env.exec("a", "cat /root/mark").strip() == "before"
    os.rename(keep, mem)
    report = run(live.update(s, "a", mode="ignore-shared"))  # the file is its own again
    assert report.new_pid != rec.pid

    # Restore: the saved state would be loaded over the copy; refused, the
    # VM stays saved, and restores once its own file is back.
    run(saving.save(s, "a"))
    keep = swap(mem)
    with pytest.raises(MigrationError, match="not the file the VM was saved with"):
        run(saving.restore(s, "a", sync_clock=False))
    assert s.get_vm("a").state == "saved"
    p = env.cli("restore", "a")
    assert p.returncode == 1 and p.stderr.count("\n") == 1 and "was replaced" in p.stderr
    os.replace(keep, mem)
    run(saving.restore(s, "a", sync_clock=False))
    assert env.exec("a", "cat /root/mark").strip() == "before"
