"""Live update on real QEMU: the guest keeps running and its data across every
mode, ten updates in a row, a clone, and each injected failure rolls back with
the guest intact (plus unit tests of mode selection)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

from vmfork import launch, vm
from vmfork.errors import (
    InvalidInput,
    LaunchError,
    MigrationError,
    QMPCommandError,
    VmforkError,
    VmforkTimeout,
)
from vmfork.guest.serial import CutShort
from vmfork.proc import process_alive
from vmfork.qemu import features, migration
from vmfork.qemu.features import QemuFeatures
from vmfork.results import UpdateReport
from vmfork.spec import MemorySpec, VMSpec
from vmfork.templates import catalog, clone, create
from vmfork.timeouts import Timeouts
from vmfork.update.live import update
from vmfork.update.modes import choose_mode

from .conftest import Env, run

COUNTER = ("(setsid sh -c 'echo $$ > /root/counter.pid; i=0; while :; do i=$((i+1)); "
           "echo $i > /root/counter; sleep 0.1; done' </dev/null >/dev/null 2>&1 &); "
           "while [ ! -s /root/counter.pid ]; do sleep 0.1; done; cat /root/counter.pid")
FILL = ("head -c 1048576 /dev/urandom > /run/blk && i=0 && while [ $i -lt {mb} ]; do "
        "echo $i; cat /run/blk; i=$((i+1)); done > /root/data && rm /run/blk")
MD5 = "md5sum /root/data | cut -d' ' -f1"


# -- unit tests: choosing the mode ------------------------------------------------------
def features_of(cpr: bool = True, ignore: bool = True, aux: bool = True) -> QemuFeatures:
    return QemuFeatures(version="10.0.2", cpr_transfer=cpr, ignore_shared=ignore,
                        aux_ram_share=aux, machines=("pc-q35-10.0",))


def spec_with(memory: MemorySpec, aux: bool = True) -> VMSpec:
    return VMSpec(name="a", memory_mib=256, memory=memory, kernel="/k", aux_ram_share=aux)


FILE = MemorySpec(path="/dev/shm/a.mem")
MEMFD = MemorySpec(backend="memfd")
CLONE = MemorySpec(path="/dev/shm/t.mem", share=False, readonly=True)


@pytest.mark.parametrize(("memory", "old", "new", "expected"), [
    (FILE, features_of(), features_of(), "ignore-shared"),
    (FILE, features_of(), features_of(ignore=False), "cpr-transfer"),
    (FILE, features_of(cpr=False, ignore=False), features_of(), "copy"),
    (MEMFD, features_of(), features_of(), "cpr-transfer"),
    (MEMFD, features_of(), features_of(cpr=False), "copy"),
    (MEMFD, features_of(aux=False), features_of(), "copy"),
    (CLONE, features_of(), features_of(), "copy"),
])
def test_auto_picks_the_best_supported_mode(memory: MemorySpec, old: QemuFeatures,
                                            new: QemuFeatures, expected: str) -> None:
    mode, reason = choose_mode("auto", spec_with(memory), old, new)
    assert mode == expected
    if mode == "copy":
        assert "twice" in reason


def test_auto_needs_aux_ram_share_for_cpr() -> None:
    mode, _ = choose_mode("auto", spec_with(MEMFD, aux=False), features_of(), features_of())
    assert mode == "copy"


@pytest.mark.parametrize(("memory", "mode", "words"), [
    (MEMFD, "ignore-shared", "memfd"),
    (CLONE, "ignore-shared", "private"),
    (CLONE, "cpr-transfer", "private"),
    (FILE, "bogus", "invalid update mode"),
])
def test_impossible_mode_is_refused(memory: MemorySpec, mode: str, words: str) -> None:
    with pytest.raises(InvalidInput, match=words):
        choose_mode(mode, spec_with(memory), features_of(), features_of())


def test_a_binary_without_cpr_is_named() -> None:
    with pytest.raises(InvalidInput, match=r"new QEMU .* lacks migration mode cpr-transfer"):
        choose_mode("cpr-transfer", spec_with(MEMFD), features_of(), features_of(cpr=False))


def test_feature_cache_keeps_answers_per_binary(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(features, "_MEMORY", {})
    cache = features.FeatureCache(tmp_path)
    assert cache.get("1:2:3:4") is None
    cache.put("1:2:3:4", features_of())
    monkeypatch.setattr(features, "_MEMORY", {})  # another process: only the file
    assert features.FeatureCache(tmp_path).get("1:2:3:4") == features_of()
    assert features.FeatureCache(tmp_path).get("5:6:7:8") is None
    (tmp_path / "qemu-features.json").write_text("[not a cache")
    monkeypatch.setattr(features, "_MEMORY", {})
    assert features.FeatureCache(tmp_path).get("1:2:3:4") is None


def test_binary_version_refuses_what_is_not_a_qemu(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with pytest.raises(InvalidInput, match="not found"):
        features.binary_version(str(tmp_path / "no-such-qemu"))
    bad = wrapper(tmp_path, "qemu-broken", "echo 'broken on purpose' >&2; exit 3")
    with pytest.raises(LaunchError, match="broken on purpose") as exc:
        features.binary_version(bad)
    assert exc.value.exitcode == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["qemu-broken"], "probe log left"


# -- helpers for the QEMU tests ------------------------------------------------------------
class Guest:
    """What a test knows about the guest, to check it is intact after an update."""

    def __init__(self, env: Env, name: str, mb: int) -> None:
        self.env, self.name = env, name
        env.exec(name, FILL.format(mb=mb))
        self.md5 = self.exec(MD5).strip()
        self.counter_pid = self.exec(COUNTER).strip()
        self.count = 0
        self.wait_count()

    def wait_count(self) -> int:
        """Wait until the guest's counter moved past what we saw last; return it."""
        for _ in range(100):
            text = self.exec("cat /root/counter 2>/dev/null || echo 0").strip()
            if int(text or 0) > self.count:
                self.count = int(text)
                return self.count
            run(asyncio.sleep(0.1))
        raise AssertionError(f"the guest's counter stopped at {self.count}")

    def check(self) -> None:
        """Guest runs, counter kept counting (same process), data unchanged."""
        s = self.env.store()
        assert run(vm.status(s, self.name)) == "running"
        before = self.count
        assert self.wait_count() > before
        self.exec(f"kill -0 {self.counter_pid}")
        assert self.exec(MD5).strip() == self.md5

    def exec(self, command: str) -> str:
        """Run an idempotent guest command, again if its output got lost in
        transit (the serial agent's known weakness, not an update's)."""
        return exec_retry(self.env, self.name, command)


def exec_retry(env: Env, name: str, command: str, tries: int = 3) -> str:
    for _ in range(tries - 1):
        with contextlib.suppress(CutShort):
            return env.exec(name, command)
    return env.exec(name, command)


def run_files(env: Env, name: str) -> list[str]:
    return sorted(p.name for p in env.store().run_dir(name).iterdir())


def assert_rolled_back(env: Env, guest: Guest, old_pid: int, gen: int,
                       new_pids: list[int], files_before: list[str], mem_before: list[str]) -> None:
    """The old QEMU still holds the guest, intact; nothing of the new one is left."""
    s = env.store()
    rec = s.get_vm(guest.name)
    assert rec.pid == old_pid and process_alive(old_pid, rec.pid_start)
    assert rec.state == "running"
    assert rec.info.gen == gen
    for pid in new_pids:
        assert not process_alive(pid), f"the new QEMU {pid} is still running"
    assert run_files(env, guest.name) == files_before, "stray files in the run directory"
    assert sorted(os.listdir(env.memory_dir)) == mem_before, "stray memory files"
    guest.check()


def console_says(env: Env, name: str) -> None:
    """The serial console of the VM's current QEMU answers a shell command."""
    s = env.store()
    path = launch.paths_for(s, s.get_vm(name)).console

    async def talk() -> bytes:
        reader, writer = await asyncio.open_unix_connection(path)
        try:
            writer.write(b"\necho CON$((6*7))\n")
            await writer.drain()
            buf = b""
            while b"CON42" not in buf:
                chunk = await asyncio.wait_for(reader.read(4096), 20)
                assert chunk, "console closed"
                buf += chunk
            return buf
        finally:
            writer.close()
    run(talk())


def wrapper(tmp: Path, name: str, body: str) -> str:
    path = tmp / name
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def do_update(env: Env, name: str, **kw: object) -> UpdateReport:
    return run(update(env.store(), name, **kw))  # type: ignore[arg-type]


def check_updated(env: Env, name: str, r: UpdateReport, old_pid: int, mode: str) -> None:
    rec = env.store().get_vm(name)
    assert r.mode == mode
    assert rec.pid == r.new_pid != old_pid == r.old_pid
    assert rec.info.gen == r.generation and rec.state == "running"
    assert not process_alive(old_pid)
    assert r.total_seconds > 0 and r.peak_memory_bytes >= r.memory_before_bytes > 0
    if mode != "copy":
        assert r.bytes_transferred <= 1_000_000
    assert r.pause_host_ms is not None and r.pause_qemu_ms is not None
    sockets = [f for f in run_files(env, name) if f.endswith(".sock")]
    assert sockets == sorted(f"{k}.{r.generation}.sock" for k in ("agent", "console", "qga",
                                                                   "qmp"))


# -- the guest survives ------------------------------------------------------------------
def test_update_in_every_mode_keeps_the_guest(env: Env, booted: str) -> None:
    guest = Guest(env, booted, mb=100)
    vmgenid = env.store().get_vm(booted).spec.vmgenid
    # auto through the CLI: a VM from `vmfork run` has a share=on memory file.
    old = env.store().get_vm(booted).pid
    p = env.cli("update", booted, "--json", check=True)
    r = UpdateReport(**{k: v for k, v in json.loads(p.stdout).items()
                        if k not in ("peak_memory_ratio", "warnings")})
    assert old is not None
    check_updated(env, booted, r, old, "ignore-shared")
    guest.check()
    console_says(env, booted)
    for mode in ("cpr-transfer", "copy", "auto"):
        old = r.new_pid
        r = do_update(env, booted, mode=mode)
        check_updated(env, booted, r, old, "ignore-shared" if mode == "auto" else mode)
        guest.check()
    console_says(env, booted)
    spec = env.store().get_vm(booted).spec
    assert spec.vmgenid == vmgenid, "an update is not a fork: the VM generation ID stays"
    assert spec.memory.path and Path(spec.memory.path).exists()
    assert os.listdir(env.memory_dir) == [Path(spec.memory.path).name]
    p = env.cli("update", booted)
    assert p.returncode == 0 and "updated (ignore-shared)" in p.stdout


def test_ten_updates_in_a_row(env: Env, booted: str) -> None:
    guest = Guest(env, booted, mb=8)
    pids = {env.store().get_vm(booted).pid}
    for i in range(10):
        r = do_update(env, booted)
        assert r.generation == i + 1
        pids.add(r.new_pid)
    assert len(pids) == 11
    assert [p for p in pids if process_alive(p)] == [r.new_pid]
    guest.check()
    rec = env.store().get_vm(booted)
    assert rec.info.updates == 10


def test_memfd_vm_updates_by_cpr_transfer(env: Env) -> None:
    run(vm.run(env.store(), vm.RunOptions(name="m", demo=True, accel="tcg",
                                          memory_backend="memfd")))
    guest = Guest(env, "m", mb=16)
    old = env.store().get_vm("m").pid
    assert old is not None
    r = do_update(env, "m")
    check_updated(env, "m", r, old, "cpr-transfer")
    assert r.ram_bytes_copied == 0
    guest.check()
    with pytest.raises(InvalidInput, match="memfd"):
        do_update(env, "m", mode="ignore-shared")
    guest.check()


def test_update_a_clone(env: Env) -> None:
    s = env.store()
    prepare = FILL.format(mb=16) + " && " + MD5 + " > /root/data.md5"
    manifest = run(create.create_demo(s, "t", memory_mib=256, prepare=prepare, accel="tcg"))
    try:
        run(clone.clone(s, "t", names=["c"], use_pool=False))
        md5 = exec_retry(env, "c", "cat /root/data.md5").strip()
        assert exec_retry(env, "c", MD5).strip() == md5
        env.exec("c", "echo mine > /root/own")
        old = s.get_vm("c").pid
        assert old is not None
        r = do_update(env, "c")   # private copy-on-write RAM: only copy works
        check_updated(env, "c", r, old, "copy")
        assert "twice" in r.reason
        rec = s.get_vm("c")
        assert rec.info.owns_memory and rec.spec.memory.share
        assert rec.spec.memory.path != manifest.memory_file
        assert manifest.memory_path.exists()
        assert exec_retry(env, "c", MD5).strip() == md5
        assert env.exec("c", "cat /root/own").strip() == "mine"
        r2 = do_update(env, "c")  # it owns a share=on file now: no copy
        check_updated(env, "c", r2, r.new_pid, "ignore-shared")
        assert exec_retry(env, "c", MD5).strip() == md5
        run(vm.stop(s, "c"))
        assert not Path(str(rec.spec.memory.path)).exists()
    finally:
        if s.has_vm("c"):
            run(vm.stop(s, "c", force=True))
        run(catalog.remove(s, "t", force=True))


# -- rollback, by injection ----------------------------------------------------------------
def injector(action: Callable[[int], None], at: str, pids: list[int]) -> Callable[[str, int],
                                                                                  None]:
    def hook(phase: str, pid: int) -> None:
        if phase == "launched":
            pids.append(pid)
        if phase == at:
            action(pid)
    return hook


def kill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)


def sigstop(pid: int) -> None:
    os.kill(pid, signal.SIGSTOP)


def test_failed_start_and_killed_qemu_roll_back(env: Env, booted: str, tmp_path: Path) -> None:
    guest = Guest(env, booted, mb=20)
    s = env.store()
    old = s.get_vm(booted).pid
    assert old is not None
    files, mem = run_files(env, booted), sorted(os.listdir(env.memory_dir))

    def rolled_back(pids: list[int]) -> None:
        assert_rolled_back(env, guest, old, 0, pids, files, mem)

    # A --qemu that exits at once (it is not even a QEMU).
    bad = wrapper(tmp_path, "qemu-broken", "echo 'broken on purpose' >&2; exit 3")
    with pytest.raises(LaunchError, match="broken on purpose"):
        do_update(env, booted, qemu=bad)
    rolled_back([])
    p = env.cli("update", booted, "--qemu", bad)
    assert p.returncode == 1 and p.stderr.count("\n") == 1 and "did not start" in p.stderr
    rolled_back([])

    # A QEMU that answers a probe but refuses to start the incoming VM.
    picky = wrapper(tmp_path, "qemu-picky",
                    'for a in "$@"; do [ "$a" = -incoming ] && { echo no incoming >&2; '
                    'exit 4; }; done\nexec qemu-system-x86_64 "$@"')
    for mode in ("ignore-shared", "cpr-transfer"):
        with pytest.raises(LaunchError, match=r"rolled back.*no incoming"):
            do_update(env, booted, qemu=picky, mode=mode)
        rolled_back([])

    # The new QEMU killed during the move, and after the state arrived.
    for mode, at in (("ignore-shared", "migrating"), ("cpr-transfer", "migrating"),
                     ("copy", "migrating"), ("ignore-shared", "migrated"),
                     ("cpr-transfer", "migrated")):
        pids: list[int] = []
        with pytest.raises(VmforkError, match="rolled back") as exc:
            do_update(env, booted, mode=mode, on_phase=injector(kill, at, pids),
                      max_bandwidth=50_000_000 if mode == "copy" else None)
        assert "old QEMU" in str(exc.value), str(exc.value)
        assert pids, "the hook saw no new QEMU"
        rolled_back(pids)

    # And the VM still updates afterwards.
    r = do_update(env, booted)
    check_updated(env, booted, r, old, "ignore-shared")
    guest.check()


def test_move_exceeding_its_timeout_rolls_back(env: Env, booted: str) -> None:
    guest = Guest(env, booted, mb=20)
    s = env.store()
    old = s.get_vm(booted).pid
    assert old is not None
    files, mem = run_files(env, booted), sorted(os.listdir(env.memory_dir))
    short = Timeouts(migrate=2.0, qmp=2.0)
    # A slow copy: throttled to 1 MB/s, it cannot move 256 MiB in 2 s.
    pids: list[int] = []
    with pytest.raises(VmforkTimeout, match="rolled back"):
        do_update(env, booted, mode="copy", timeouts=short, max_bandwidth=1_000_000,
                  on_phase=injector(lambda pid: None, "", pids))
    assert_rolled_back(env, guest, old, 0, pids, files, mem)
    # A new QEMU that hangs (SIGSTOP) in the middle of a no-copy move.
    for mode in ("ignore-shared", "cpr-transfer"):
        pids = []
        with pytest.raises(VmforkTimeout, match="rolled back"):
            do_update(env, booted, mode=mode, timeouts=short,
                      on_phase=injector(sigstop, "migrating", pids))
        assert_rolled_back(env, guest, old, 0, pids, files, mem)


def test_update_refusals(env: Env, booted: str) -> None:
    p = env.cli("update", booted, "--mode", "bogus")
    assert p.returncode == 2
    p = env.cli("update", "nosuchvm")
    assert p.returncode == 1 and "no VM named" in p.stderr
    p = env.cli("update", booted, "--qemu", "/nonexistent/qemu")
    assert p.returncode == 2 and "not found" in p.stderr
    with pytest.raises(InvalidInput, match="invalid update mode"):
        do_update(env, booted, mode="bogus")
    assert env.store().get_vm(booted).info.gen == 0


# -- what QEMU says about itself, and how its refusals surface -----------------------------
def test_features_and_qmp_errors_of_a_running_qemu(env: Env, booted: str) -> None:
    s = env.store()
    qemu = shutil.which("qemu-system-x86_64")
    assert qemu is not None
    version = features.binary_version(qemu)

    async def ask() -> tuple[QemuFeatures, dict[str, str]]:
        async with vm.attached(s, booted) as (_rec, m):
            running = await features.query_features(m.name, m.qmp)
            ident = await features.qemu_identity(m)
            with pytest.raises(QMPCommandError) as exc:
                await m.qmp("no-such-command")
            assert exc.value.command == "no-such-command"
            assert exc.value.error_class == "CommandNotFound"
            with pytest.raises(MigrationError) as mig:
                await migration.set_capabilities(m, no_such_capability=True)
            assert isinstance(mig.value.__cause__, QMPCommandError)
            assert await m.status() == "running"
            return running, ident

    running, ident = run(ask())
    assert running.version == version == ident["qemu_version"]
    assert ident["machine"] in running.machines
    assert running.ignore_shared and running.cpr_transfer and running.aux_ram_share
    assert run(features.probe(qemu)) == running
