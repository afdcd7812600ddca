"""Shared fixtures: an isolated vmfork home per test, the demo image built
once per session, CLI and library entry points, and a leak check that fails
the test if a QEMU process, socket or memory file is left behind."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import psutil
import pytest

from vmfork import vm
from vmfork.fork import base as fork_base
from vmfork.images.demo import demo_image
from vmfork.store import Store

# The session fixtures of the test images of foreign guests, for every module.
from .foreign_images import (  # noqa: F401
    bootable_debian,
    busybox_initrd,
    foreign_debian,
    plain_debian,
)

T = TypeVar("T")
VMFORK = str(Path(sys.executable).with_name("vmfork"))


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


@pytest.fixture(scope="session")
def session_images() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="vfimg", dir="/tmp"))
    demo_image(d)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def qemu_processes(marker: str) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        try:
            if p.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if any(marker in a for a in (p.info["cmdline"] or [])):
                found.append(p)
        except psutil.Error:
            pass
    return found


@contextlib.contextmanager
def module_env(prefix: str, session_images: Path) -> Iterator[Env]:
    """A vmfork home for a module-scoped fixture: its environment variables
    are set while the block runs; afterwards it is torn down (cleanup_home)."""
    home = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    memory_dir = Path(tempfile.mkdtemp(prefix=f"{prefix}mem", dir="/dev/shm"))
    (home / "images").symlink_to(session_images)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VMFORK_HOME", str(home))
        mp.setenv("VMFORK_MEMORY_DIR", str(memory_dir))
        try:
            yield Env(home, memory_dir, dict(os.environ))
        finally:
            cleanup_home(home, memory_dir)


def cleanup_home(home: Path, memory_dir: Path) -> None:
    """Tear down a module-scoped vmfork home: stop its VMs, kill any QEMU
    still running from it, remove it and its memory dir."""
    s = Store(home, memory_dir)
    for rec in s.list_vms():
        try:
            run(vm.stop(s, rec.name, force=True))
        except Exception as exc:  # pragma: no cover - reported by the leak checks
            print(f"cleanup of {rec.name} failed: {exc}")
    s.close()
    for proc in qemu_processes(str(home)):
        proc.kill()
    shutil.rmtree(memory_dir, ignore_errors=True)
    shutil.rmtree(home, ignore_errors=True)


@dataclass
class Env:
    """One isolated vmfork installation: home, memory dir, env vars."""

    home: Path
    memory_dir: Path
    environ: dict[str, str]

    def store(self) -> Store:
        return Store(self.home, self.memory_dir)

    def cli(self, *args: str, check: bool = False, timeout: float = 300,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        p = subprocess.run([VMFORK, *args], env=self.environ, capture_output=True, text=True,
                           timeout=timeout, input=input,
                           stdin=None if input is not None else subprocess.DEVNULL)
        if check and p.returncode != 0:
            raise AssertionError(f"vmfork {' '.join(args)} failed ({p.returncode}): "
                                 f"{p.stderr}{p.stdout}")
        return p

    def exec(self, name: str, command: str) -> str:
        """Run a guest command through the library; assert exit code 0; return stdout."""
        r = run(vm.exec_(self.store(), name, command))
        assert r.exit_code == 0, f"{command!r} exited {r.exit_code}: {r.stderr}{r.stdout}"
        return r.stdout


@pytest.fixture
def env(session_images: Path, monkeypatch: pytest.MonkeyPatch,
        request: pytest.FixtureRequest) -> Iterator[Env]:
    home = Path(tempfile.mkdtemp(prefix="vf", dir="/tmp"))
    memory_dir = Path(tempfile.mkdtemp(prefix="vfmem", dir="/dev/shm"))
    (home / "images").symlink_to(session_images)
    monkeypatch.setenv("VMFORK_HOME", str(home))
    monkeypatch.setenv("VMFORK_MEMORY_DIR", str(memory_dir))
    e = Env(home, memory_dir, dict(os.environ))
    yield e
    # Teardown, in order: print the logs of a failed test, stop the VMs the
    # test left in the catalog, then fail if any process, socket or memory
    # file survived that (a cleanup bug).
    failed = getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed
    if failed:
        for log in sorted(home.glob("run/*/*.log")):
            sys.stderr.write(f"--- {log}\n{log.read_text(errors='replace')[-3000:]}\n")
    s = e.store()
    leftover = [r.name for r in s.list_vms()]
    for name in leftover:
        try:
            run(vm.stop(s, name, force=True))
        except Exception as exc:  # pragma: no cover - reported below
            sys.stderr.write(f"cleanup of {name} failed: {exc}\n")
    if leftover:  # their fork bases go with them, as through the API
        run(fork_base.collect(s))
    s.close()
    procs = qemu_processes(str(home))
    for p in procs:
        p.kill()
    mem_left = sorted(x.name for x in memory_dir.iterdir())
    sockets = sorted(str(x) for x in home.rglob("*.sock"))
    shutil.rmtree(memory_dir, ignore_errors=True)
    shutil.rmtree(home, ignore_errors=True)
    assert not procs, f"QEMU processes left running: {[p.pid for p in procs]}"
    assert not sockets, f"sockets left behind: {sockets}"
    assert not mem_left, f"memory files left behind: {mem_left}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    outcome = yield
    rep = outcome.get_result()
    setattr(item, f"rep_{rep.when}", rep)


@pytest.fixture
def booted(env: Env) -> Iterator[str]:
    """A running demo VM named 'a' (stopped at the end of the test)."""
    run(vm.run(env.store(), vm.RunOptions(name="a", demo=True, accel="tcg")))
    yield "a"
    s = env.store()
    if s.has_vm("a"):
        run(vm.stop(s, "a"))
