"""Save/restore and portable snapshots, on real QEMU where it matters.

Unit tests cover the pure parts (file-system checks, the export header and
its hashing); the rest runs the demo guest under TCG and checks that guest
data (md5) and a running counter survive, that restore works from a fresh
process, and that corrupt or missing files, a concurrent restore and a kill -9
at each step of a save or restore leave a complete VM, never a half one.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import pytest

from vmfork import bench, checkpoints, vm
from vmfork.errors import BadSnapshotFile, GuestError, InvalidInput, MigrationError, StateError
from vmfork.proc import process_alive
from vmfork.results import ExportResult, ImportResult, MigrationStats, RestoreResult, SaveResult
from vmfork.snapshots import export, imports
from vmfork.snapshots import save as saving
from vmfork.spec import DiskSpec, MemorySpec, VMSpec
from vmfork.store import Store
from vmfork.templates import catalog
from vmfork.timeouts import DEFAULT

if TYPE_CHECKING:
    from conftest import Env

T = TypeVar("T")
VMFORK = str(Path(sys.executable).with_name("vmfork"))
#: How long one vmfork save or restore may take by its own deadlines (QEMU
#: start, state load, clock), scaled like them by VMFORK_TIMEOUT_SCALE.
OP_DEADLINE = DEFAULT.start + DEFAULT.migrate + DEFAULT.clock_agent + DEFAULT.clock_exec


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


#: The keys of each command's --json output (more may be added, none dropped).
SAVE_KEYS = {"name", "state", "state_file", "state_size", "sha256", "memory_file",
             "memory_size", "seconds", "downtime_seconds", "preflush_seconds",
             "flush_seconds", "migration"}
RESTORE_KEYS = {"name", "state", "pid", "seconds", "running_seconds", "check_seconds",
                "spawn_seconds", "load_seconds", "clock_synced"}
EXPORT_KEYS = {"name", "file", "size", "allocated", "memory_mib", "seconds", "migration"}
IMPORT_KEYS = {"name", "state", "pid", "file", "memory_file", "memory_mib", "seconds",
               "check_seconds", "load_seconds", "clock_synced"}
#: The nested "migration" of save and export: what QEMU reported.
MIGRATION_KEYS = {"status", "seconds", "total_time_ms", "downtime_ms", "ram_bytes",
                  "total_bytes"}

COUNTER = ("(i=0; while :; do i=$((i+1)); echo $i > /root/counter; sleep 0.2; done)"
           " </dev/null >/dev/null 2>&1 &")


# -- helpers ------------------------------------------------------------------------
def start_vm(env: Env, name: str = "a", persistent: bool = True) -> None:
    run(vm.run(env.store(), vm.RunOptions(name=name, demo=True, accel="tcg",
                                          persistent=persistent)))


def fill(env: Env, name: str, mb: int = 16) -> str:
    """Write *mb* MiB of data in the guest; return its md5 as read back."""
    # The demo agent now and then loses a command's answer in transit
    # (GuestError "cut short in transit"); the data is written all the same.
    with contextlib.suppress(GuestError):
        run(bench.fill_guest(env.store(), name, mb))
    md5 = md5_of(env, name)
    assert len(md5) == 32, md5
    return md5


def md5_of(env: Env, name: str) -> str:
    for attempt in range(3):
        try:
            r = run(vm.exec_(env.store(), name, "md5sum /root/data"))
            break
        except GuestError:
            if attempt == 2:
                raise
    assert r.exit_code == 0, r.stderr
    return r.stdout.split()[0]


def record(env: Env, name: str) -> vm.VMRecord:
    return env.store().get_vm(name)


def ls(env: Env) -> dict[str, dict[str, object]]:
    rows = json.loads(env.cli("ls", "--json", check=True).stdout)
    return {r["name"]: r for r in rows}


def flip_byte(path: Path, offset: int) -> bytes:
    with open(path, "r+b") as f:
        f.seek(offset)
        old = f.read(1)
        f.seek(offset)
        f.write(bytes([old[0] ^ 0xFF]))
    return old


def put_byte(path: Path, offset: int, value: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(value)


def stalled_cli(env: Env, step: str, *args: str) -> Iterator[subprocess.Popen[str]]:
    """Start ``vmfork ARGS`` that stalls at *step*; yield it once it got there."""
    log = env.home / f"stall-{step}.log"
    environ = {**env.environ, checkpoints.STALL_ENV: step, "COLUMNS": "200"}
    with open(log, "w") as errf:
        p = subprocess.Popen([VMFORK, *args], env=environ, stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=errf, text=True)
    try:
        t_end = time.monotonic() + OP_DEADLINE
        while "stalling at" not in log.read_text():
            assert p.poll() is None, f"vmfork ended before {step}: {log.read_text()}"
            assert time.monotonic() < t_end, f"vmfork never reached {step}"
            time.sleep(0.05)
        yield p
    finally:
        if p.poll() is None:
            p.kill()
        p.wait()


def kill9_at(env: Env, step: str, *args: str) -> None:
    for p in stalled_cli(env, step, *args):
        p.send_signal(signal.SIGKILL)


# -- unit tests -----------------------------------------------------------------------
def test_filesystem_type_tells_tmpfs_from_disk(tmp_path: Path) -> None:
    assert vm.filesystem_type("/dev/shm") == "tmpfs"
    assert not vm.is_persistent_dir("/dev/shm/not/yet/created")
    assert vm.is_persistent_dir(tmp_path / "sub")  # /tmp is on disk here


def test_persistent_memory_dir(env: Env) -> None:
    s = env.store()
    spec = vm.build_spec(s, vm.RunOptions(name="p", demo=True, accel="tcg", persistent=True))
    assert Path(str(spec.memory.path)).parent == env.home / "memory"
    with pytest.raises(InvalidInput, match="tmpfs"):
        vm.build_spec(s, vm.RunOptions(name="p", demo=True, accel="tcg", persistent=True,
                                       memory_dir=str(env.memory_dir)))
    with pytest.raises(InvalidInput, match=r"memfd|file memory backend"):
        vm.build_spec(s, vm.RunOptions(name="p", demo=True, accel="tcg", persistent=True,
                                       memory_backend="memfd"))


def test_hash_range_reads_holes_as_zeros(tmp_path: Path) -> None:
    f = tmp_path / "sparse"
    with open(f, "wb") as w:
        w.seek(3 << 20)
        w.write(b"x" * 5000)
        w.seek(9 << 20)
        w.write(b"tail")
    content = f.read_bytes()
    with open(f, "rb") as r:
        assert export.hash_range(r, 0, len(content)) == hashlib.sha256(content).hexdigest()
        expected = hashlib.sha256(content[100:4 << 20]).hexdigest()
        assert export.hash_range(r, 100, 4 << 20) == expected


def test_read_header_refuses_other_files(tmp_path: Path) -> None:
    f = tmp_path / "x"
    f.write_bytes(b"not a snapshot" * 100)
    with pytest.raises(BadSnapshotFile, match="not a vmfork snapshot"):
        export.read_header(f)


SHA_A, SHA_B = "a" * 64, "b" * 64


def make_header(spec: VMSpec, blobs: dict[str, export.Part] | None = None,
                ram: export.Part | None = None) -> export.Header:
    return export.Header(name=spec.name, created=1.5, memory_mib=spec.memory_mib,
                         qemu_version="10.0.2", machine="pc-q35-10.0", spec=spec,
                         blobs=blobs or {"kernel": export.Part(export.HEADER_SIZE, 0, SHA_A)},
                         ram=ram or export.Part(export.ALIGN, 0, SHA_B))


def test_header_round_trip_and_corrupt_headers(tmp_path: Path) -> None:
    spec = VMSpec(name="h", memory_mib=256, memory=MemorySpec(path="/m"), kernel="/k")
    header = make_header(spec, {"kernel": export.Part(65536, 10, SHA_A)},
                         export.Part(1 << 20, 4096, SHA_B))
    f = tmp_path / "snap"
    f.write_bytes(header.encode())
    assert f.stat().st_size == export.HEADER_SIZE
    with pytest.raises(BadSnapshotFile, match="truncated: RAM ends at byte 1052672"):
        export.read_header(f)  # its parts lie outside the file
    os.truncate(f, (1 << 20) + 4096)
    assert export.read_header(f) == header
    on_disk = json.loads(f.read_bytes()[len(export.MAGIC):].rstrip(b"\0"))
    assert sorted(on_disk) == ["blobs", "capabilities", "created", "format", "machine",
                               "memory_mib", "name", "qemu_version", "ram", "spec"]
    assert on_disk["ram"] == {"offset": 1 << 20, "size": 4096, "sha256": SHA_B}

    for d, error in (({**on_disk, "format": 2}, "format 2 is not supported"),
                     ({k: v for k, v in on_disk.items() if k != "ram"}, "lacks 'ram'"),
                     ({**on_disk, "blobs": {"kernel": {"offset": 1}}}, "kernel lacks 'size'")):
        put_byte(f, 0, export.MAGIC + json.dumps(d).encode().ljust(
            export.HEADER_SIZE - len(export.MAGIC), b"\0"))
        with pytest.raises(BadSnapshotFile, match=error):
            export.read_header(f)


def test_check_export_finds_truncated_and_corrupt_parts(tmp_path: Path) -> None:
    spec = VMSpec(name="h", memory_mib=256, memory=MemorySpec(path="/m"), kernel="/k")
    kernel, ram = b"kernel bytes", b"\1" * 5000
    k_at, r_at = export.HEADER_SIZE, 1 << 20
    header = make_header(spec, {"kernel": export.Part(k_at, len(kernel),
                                                      hashlib.sha256(kernel).hexdigest())},
                         export.Part(r_at, len(ram), hashlib.sha256(ram).hexdigest()))
    f = tmp_path / "snap"
    with open(f, "wb") as w:
        w.write(header.encode())
        w.seek(k_at)
        w.write(kernel)
        w.seek(r_at)
        w.write(ram)
    assert export.check_export(f) == header
    flip_byte(f, k_at + 3)
    with pytest.raises(BadSnapshotFile, match="corrupt: the kernel sha256"):
        export.check_export(f)
    flip_byte(f, k_at + 3)
    os.truncate(f, r_at + len(ram) - 1)
    with pytest.raises(BadSnapshotFile, match=f"truncated: RAM ends at byte {r_at + len(ram)}"):
        export.check_export(f, header)
    with pytest.raises(BadSnapshotFile, match=f"truncated: RAM ends at byte {r_at + len(ram)}"):
        export.read_header(f)


def test_snapshot_files_refuse_disks(tmp_path: Path) -> None:
    """A snapshot file carries no disks: export refuses a VM that has some,
    import a file whose VM had some (before reading the rest of the file)."""
    disk = DiskSpec(path="/v/disk0.qcow2", backing="/b.qcow2", backing_format="qcow2")
    spec = VMSpec(name="d", memory_mib=256, memory=MemorySpec(path="/m"), kernel="/k",
                  disks=(disk,))
    with pytest.raises(StateError, match=r"d: it has disks \(/v/disk0.qcow2\).*vmfork save"):
        export.check_exportable(spec)
    export.check_exportable(spec.with_(disks=()))
    f = tmp_path / "snap"
    f.write_bytes(make_header(spec).encode())
    os.truncate(f, export.ALIGN)
    store = Store(tmp_path / "home", tmp_path / "mem")
    with pytest.raises(BadSnapshotFile, match="had disks"):
        run(imports.import_(store, f, "imp"))
    assert not store.has_vm("imp")
    store.close()


def test_results_have_the_json_keys() -> None:
    """The --json output of save, restore, export and import is the result's
    to_dict(): it keeps every key scripts read (checked on real runs below)."""
    mig = MigrationStats(status="completed", seconds=0.1, total_time_ms=100, downtime_ms=5,
                         ram_bytes=0, total_bytes=300_000)
    saved = SaveResult(name="a", state="saved", state_file="/s", state_size=1, sha256="ab",
                       memory_file="/m", memory_size=2, seconds=1.0, downtime_seconds=0.5,
                       preflush_seconds=0.1, flush_seconds=0.1, migration=mig).to_dict()
    assert set(saved) >= SAVE_KEYS and set(saved["migration"]) >= MIGRATION_KEYS
    restored = RestoreResult(name="a", state="running", pid=1, seconds=1.0,
                             running_seconds=0.5, check_seconds=0.1, spawn_seconds=0.1,
                             load_seconds=0.1, clock_synced=True).to_dict()
    assert set(restored) >= RESTORE_KEYS
    exported = ExportResult(name="a", file="/f", size=3, allocated=1, memory_mib=256,
                            seconds=1.0, migration=mig).to_dict()
    assert set(exported) >= EXPORT_KEYS and set(exported["migration"]) >= MIGRATION_KEYS
    imported = ImportResult(name="b", state="running", pid=1, file="/f", memory_file="/m",
                            memory_mib=256, seconds=1.0, check_seconds=0.1, load_seconds=0.1,
                            clock_synced=True).to_dict()
    assert set(imported) >= IMPORT_KEYS
    json.dumps([saved, restored, exported, imported])


def test_save_refuses_volatile_memory(env: Env, booted: str) -> None:
    # The `booted` VM keeps its RAM on tmpfs (/dev/shm): a save would not survive
    # a host reboot, so it is refused, and the VM keeps running.
    with pytest.raises(StateError, match=r"tmpfs.*--persistent"):
        run(saving.save(env.store(), booted))
    assert vm.get_live(env.store(), booted).state == "running"


# -- save and restore ---------------------------------------------------------------
def test_save_restore_from_fresh_processes(env: Env) -> None:
    env.cli("run", "a", "--demo", "--accel", "tcg", "--persistent", check=True)
    md5 = fill(env, "a")
    env.exec("a", COUNTER)
    time.sleep(1)
    before = int(env.exec("a", "cat /root/counter"))
    mem = Path(str(record(env, "a").spec.memory.path))
    pid = record(env, "a").pid

    saved = json.loads(env.cli("save", "a", "--json", check=True).stdout)
    assert set(saved) >= SAVE_KEYS and set(saved["migration"]) >= MIGRATION_KEYS
    assert saved["state"] == "saved" and saved["migration"]["status"] == "completed"
    assert 0 < saved["state_size"] <= 1_000_000
    assert Path(saved["state_file"]).stat().st_size == saved["state_size"]
    assert not process_alive(pid)
    assert ls(env)["a"]["state"] == "saved" and ls(env)["a"]["pid"] is None
    rec = record(env, "a")
    assert rec.info.saved.sha256 == saved["sha256"]
    assert rec.info.saved.memory_size == mem.stat().st_size == 256 << 20
    assert Path(saved["state_file"]).is_relative_to(env.home / "vms" / "a")

    time.sleep(3)  # the guest clock falls behind while saved
    restored = json.loads(env.cli("restore", "a", "--json", check=True).stdout)
    assert set(restored) >= RESTORE_KEYS
    assert restored["state"] == "running" and restored["clock_synced"]
    assert ls(env)["a"]["state"] == "running"
    assert md5_of(env, "a") == md5
    after = int(env.exec("a", "cat /root/counter"))
    assert after >= before  # the counter went on from where it stopped ...
    time.sleep(1)
    assert int(env.exec("a", "cat /root/counter")) > after  # ... and still runs
    assert abs(int(env.exec("a", "date +%s")) - time.time()) <= 2
    assert not Path(saved["state_file"]).exists()  # consumed

    p = env.cli("restore", "a")
    assert p.returncode == 1 and "a is running, not saved" in p.stderr

    # A saved VM can be stopped: record, memory file and state are removed.
    env.cli("save", "a", check=True)
    env.cli("stop", "a", check=True)
    assert not mem.exists() and not (env.home / "vms" / "a").exists()
    assert "a" not in ls(env)


def test_restore_refuses_bad_files_and_a_second_restore(env: Env) -> None:
    start_vm(env)
    md5 = fill(env, "a")
    s = env.store()
    saved = run(saving.save(s, "a"))
    state, mem = Path(saved.state_file), Path(saved.memory_file)

    old = flip_byte(state, saved.state_size // 2)
    with pytest.raises(MigrationError, match=r"state file .* is corrupt: sha256"):
        run(saving.restore(s, "a"))
    put_byte(state, saved.state_size // 2, old)
    assert record(env, "a").state == "saved"

    os.truncate(mem, mem.stat().st_size + 4096)
    with pytest.raises(MigrationError, match=r"memory file .* is 268439552 bytes, expected"):
        run(saving.restore(s, "a"))
    os.truncate(mem, 256 << 20)

    mem.rename(mem.with_suffix(".away"))
    p = env.cli("restore", "a")
    assert p.returncode == 1 and f"memory file {mem} is missing" in p.stderr
    mem.with_suffix(".away").rename(mem)
    assert record(env, "a").state == "saved"

    # Someone else is working on the VM: refused at once, not after waiting.
    with s.lock("a"), pytest.raises(StateError, match="busy") as busy:
        run(saving.restore(env.store(), "a"))
    assert "waited" not in str(busy.value)

    # Two restores at the same time: one wins, the other is refused.
    procs = [subprocess.Popen([VMFORK, "restore", "a"], env=env.environ, text=True,
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE) for _ in range(2)]
    results = [(p.wait(OP_DEADLINE), p.stderr.read() if p.stderr else "") for p in procs]
    for p in procs:
        for stream in (p.stdout, p.stderr):
            if stream:
                stream.close()
    codes = sorted(code for code, _ in results)
    assert codes == [0, 1], results
    loser = next(err for code, err in results if code == 1)
    assert any(m in loser for m in ("busy", "being restored", "not saved")), loser
    assert ls(env)["a"]["state"] == "running"
    assert md5_of(env, "a") == md5


# -- kill -9 at each step --------------------------------------------------------------
def _kill_qemu_at(monkeypatch: pytest.MonkeyPatch, env: Env, at: str) -> None:
    real = checkpoints.checkpoint

    async def checkpoint(step: str) -> None:
        if step == at:
            pid = record(env, "a").pid
            assert pid
            os.kill(pid, signal.SIGKILL)
            while process_alive(pid):
                time.sleep(0.01)
        await real(step)

    monkeypatch.setattr(checkpoints, "checkpoint", checkpoint)


def test_qemu_killed_after_state_written_still_saves(env: Env,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    start_vm(env)
    md5 = fill(env, "a")
    _kill_qemu_at(monkeypatch, env, "save.state-written")
    run(saving.save(env.store(), "a"))
    monkeypatch.undo()
    assert record(env, "a").state == "saved"
    run(saving.restore(env.store(), "a"))
    assert md5_of(env, "a") == md5


def test_qemu_killed_during_save_leaves_no_saved_vm(env: Env,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    start_vm(env)
    _kill_qemu_at(monkeypatch, env, "save.paused")
    with pytest.raises((MigrationError, StateError)):
        run(saving.save(env.store(), "a"))
    monkeypatch.undo()
    assert ls(env)["a"]["state"] == "dead"
    assert not (env.home / "vms" / "a" / saving.MANIFEST_FILE).exists()
    p = env.cli("restore", "a")
    assert p.returncode == 1 and "a is dead, not saved" in p.stderr


def test_vmfork_killed_mid_save_or_restore(env: Env) -> None:
    start_vm(env)
    md5 = fill(env, "a")
    qemu = record(env, "a").pid

    # Killed after the state was written, QEMU still up (paused after the
    # migration): the VM is still the running VM, and saving again works.
    for step in ("save.state-written", "save.manifest-written"):
        kill9_at(env, step, "save", "a")
        assert process_alive(qemu) and ls(env)["a"]["state"] == "running"
        env.cli("save", "a", check=True)
        assert ls(env)["a"]["state"] == "saved" and not process_alive(qemu)
        env.cli("restore", "a", check=True)
        assert md5_of(env, "a") == md5
        qemu = record(env, "a").pid

    # Killed after QEMU quit, before the catalog said "saved": listed as dead,
    # and restore finds the complete save and uses it.
    kill9_at(env, "save.qemu-quit", "save", "a")
    assert ls(env)["a"]["state"] == "dead"
    env.cli("restore", "a", check=True)
    assert md5_of(env, "a") == md5

    # Killed during a restore before the state was loaded: the half-started
    # QEMU is ended and the next restore works.
    env.cli("save", "a", check=True)
    kill9_at(env, "restore.spawned", "restore", "a")
    half = record(env, "a")
    assert half.state == "restoring" and process_alive(half.pid, half.pid_start)
    env.cli("restore", "a", check=True)
    assert not process_alive(half.pid, half.pid_start)
    assert md5_of(env, "a") == md5

    # Killed after the state was loaded (it is consumed): the loaded QEMU is
    # adopted as paused, and resume continues it.
    env.cli("save", "a", check=True)
    kill9_at(env, "restore.loaded", "restore", "a")
    p = env.cli("restore", "a")
    assert p.returncode == 1 and "a is paused, not saved" in p.stderr
    env.cli("resume", "a", check=True)
    assert md5_of(env, "a") == md5


# -- portable snapshots --------------------------------------------------------------
def test_export_import_round_trip(env: Env) -> None:
    start_vm(env)
    md5 = fill(env, "a", 24)
    live = env.home / "live.snap"
    cold = env.home / "saved.snap"

    out = json.loads(env.cli("snapshot", "export", "a", str(live), "--json",
                             check=True).stdout)
    assert set(out) >= EXPORT_KEYS and set(out["migration"]) >= MIGRATION_KEYS
    assert out["allocated"] < out["size"]  # sparse: zero pages take no space
    assert ls(env)["a"]["state"] == "running"
    p = env.cli("snapshot", "export", "a", str(live))
    assert p.returncode == 1 and "exists already" in p.stderr

    env.cli("save", "a", check=True)
    env.cli("snapshot", "export", "a", str(cold), check=True)
    assert ls(env)["a"]["state"] == "saved"

    for i, f in enumerate((live, cold)):
        name = f"b{i}"
        got = json.loads(env.cli("snapshot", "import", str(f), name, "--json",
                                 check=True).stdout)
        assert set(got) >= IMPORT_KEYS
        assert got["state"] == "running" and got["clock_synced"]
        assert md5_of(env, name) == md5
        assert record(env, name).spec.vmgenid != record(env, "a").spec.vmgenid
        env.cli("stop", name, check=True)

    # The saved VM is untouched by its export.
    env.cli("restore", "a", check=True)
    assert md5_of(env, "a") == md5

    header = export.read_header(live)
    assert header.name == "a" and header.spec == record(env, "a").spec
    flip_byte(live, header.ram.end - 10)
    p = env.cli("snapshot", "import", str(live), "c")
    assert p.returncode == 2 and "corrupt: the RAM sha256" in p.stderr
    assert "c" not in ls(env)


def test_import_as_template(env: Env) -> None:
    start_vm(env, persistent=False)
    md5 = fill(env, "a", 8)
    f = env.home / "a.snap"
    env.cli("snapshot", "export", "a", str(f), check=True)
    env.cli("stop", "a", check=True)
    try:
        env.cli("snapshot", "import", str(f), "t", "--as-template", check=True)
        assert [m.name for m in env.store().list_templates()] == ["t"]
        assert env.store().get_template("t").imported_from == str(f.absolute())
        assert not [r.name for r in env.store().list_vms()]  # no temporary VM left
        env.cli("clone", "t", "c", check=True)
        assert md5_of(env, "c") == md5
        env.cli("stop", "c", check=True)
    finally:
        if env.store().has_template("t"):
            run(catalog.remove(env.store(), "t", force=True))
