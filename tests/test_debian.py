"""The Debian guest: image build, overlays, boot to multi-user, the serial agent
and qemu-guest-agent, DHCP on the NIC and a host port forward.

The image is built once into a persistent cache (``$VMFORK_TEST_CACHE``,
default /var/tmp/vmfork-test; needs root the first time, ~1-3 min) and shared
by every session. The integration tests share two booted VMs per module
(a boot costs 15-40 s under TCG); the last test stops them and checks that
nothing is left behind and the base image was never written.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from unittest.mock import ANY

import psutil
import pytest

from vmfork import launch, vm
from vmfork.errors import GuestError, SetupError
from vmfork.guest import identity
from vmfork.guest.qga import SHELL_WRAPPER, GuestAgent
from vmfork.images.debian import DEBIAN_APPEND, DiskImage, debian_image, debian_mirror
from vmfork.spec import DiskSpec, MemorySpec, NetSpec, RunPaths, VMSpec, build_argv
from vmfork.timeouts import Timeouts

from .conftest import VMFORK, Env, module_env, qemu_processes, run

CACHE = Path(os.environ.get("VMFORK_TEST_CACHE", "/var/tmp/vmfork-test"))


# -- pure parts -------------------------------------------------------------------
def test_mirror_from_deb822_sources(tmp_path: Path) -> None:
    d = tmp_path / "sources.list.d"
    d.mkdir()
    (d / "a.sources").write_text(
        "Types: deb\nURIs: http://disabled.invalid/debian\nSuites: bookworm\nEnabled: no\n\n"
        "Types: deb-src\nURIs: http://src.invalid/debian\nSuites: bookworm\n\n"
        "Types: deb\nURIs: http://mirror.invalid/debian http://other.invalid/debian\n"
        "Suites: bookworm bookworm-updates\nComponents: main\n")
    assert debian_mirror(tmp_path) == "http://mirror.invalid/debian"


def test_mirror_from_one_line_sources(tmp_path: Path) -> None:
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list").write_text(
        "# deb " "http://commented.invalid/debian bookworm main\n"
        "deb " "http://x.invalid/debian bookworm-backports main\n"
        "deb [arch=amd64 signed-by=/k.gpg] http://mirror.invalid/debian bookworm main\n")
    assert debian_mirror(tmp_path) == "http://mirror.invalid/debian"
    (tmp_path / "sources.list").write_text("")
    with pytest.raises(SetupError):
        debian_mirror(tmp_path)


def test_argv_with_qga_and_overlay() -> None:
    spec = VMSpec(name="d", memory_mib=256, memory=MemorySpec(path="/m"), kernel="/k",
                  disks=(DiskSpec(path="/v/disk0.qcow2", backing="/b.qcow2",
                                  backing_format="qcow2"),),
                  net=NetSpec(mac="52:54:00:11:22:33", ports=((8022, 22),)), qga=True)
    paths = RunPaths(qmp="/r/q", console="/r/c", console_log="/r/l", agent="/r/a", qga="/r/g")
    argv = build_argv(spec, paths)
    assert "socket,id=qga0,path=/r/g,server=on,wait=off" in argv
    assert any("name=org.qemu.guest_agent.0" in a and "chardev=qga0" in a for a in argv)
    assert "driver=file,filename=/v/disk0.qcow2,node-name=file0" in argv
    assert not any("/b.qcow2" in a for a in argv)  # QEMU opens the backing file read-only
    assert any("hostfwd=tcp:127.0.0.1:8022-:22" in a for a in argv)
    assert VMSpec.from_json(spec.to_json()) == spec
    no_qga = build_argv(spec.with_(qga=False), paths)
    assert not any("guest_agent" in a for a in no_qga)


def test_overlay_created_over_base(tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    base.write_bytes(b"\0" * (1 << 20))
    opts = vm.RunOptions(name="ov", disks=(str(base),))
    store = Env(tmp_path / "home", tmp_path / "mem", {}).store()
    (disk,) = vm.disk_specs(store, opts)
    assert disk.backing == str(base) and disk.backing_format == "raw"
    assert Path(disk.path).parent == store.vm_dir("ov")
    spec = VMSpec(name="ov", memory_mib=256, memory=MemorySpec(path="/m"), disks=(disk,))
    launch.create_overlays(spec)
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", disk.path],
                                     capture_output=True, text=True, check=True).stdout)
    assert info["format"] == "qcow2"
    assert info["backing-filename"] == str(base)
    assert info["backing-filename-format"] == "raw"
    (direct,) = vm.disk_specs(store, vm.RunOptions(name="ov", disks=(str(base),),
                                                   overlay=False))
    assert direct.path == str(base) and direct.backing is None
    store.close()


def test_qga_shell_wrapper_runs_like_the_serial_agent(tmp_path: Path) -> None:
    """The wrapper QGA runs shell commands in (here with the host's sh):
    stdout and stderr apart, the status, the directory, stdin passed on,
    done when the shell ends though a background process lives on (holding
    both its stdout and stderr), no file left behind."""
    def wrapped(cmd: str, cwd: str = "", stdin: str = "") -> tuple[int, str, str, float]:
        t0 = time.monotonic()
        p = subprocess.run(["/bin/sh", "-c", SHELL_WRAPPER, "vmfork-exec", cmd, cwd],
                           input=stdin, capture_output=True, text=True, timeout=30)
        return p.returncode, p.stdout, p.stderr, time.monotonic() - t0

    assert wrapped("echo a; echo b >&2; echo c; exit 3") == (3, "a\nc\n", "b\n", ANY)
    assert wrapped("pwd", str(tmp_path))[:3] == (0, f"{tmp_path}\n", "")
    assert wrapped("pwd", str(tmp_path / "missing"))[:3] == (0, f"{os.getcwd()}\n", "")
    assert wrapped("cat", stdin="in")[:3] == (0, "in", "")
    assert wrapped("kill -9 $$")[:3] == (137, "", "")
    assert wrapped("echo x >&3")[:3] == (2, "", ANY)  # fd 3 is the wrapper's, closed here
    status, out, err, seconds = wrapped(f"sleep 5 & echo $! > {tmp_path}/bg; echo started")
    assert (status, out, err) == (0, "started\n", "") and seconds < 4
    os.kill(int((tmp_path / "bg").read_text()), 9)
    time.sleep(0.2)
    assert not list(Path("/run").glob("vmfork-exec.*")) + list(Path("/tmp").glob(
        "vmfork-exec.*"))


def test_bench_clone_options_per_image() -> None:
    """``vmfork bench clone --image debian``: data in tmpfs and on disk, the
    Debian image booted; the demo guest keeps its data in its RAM root."""
    from vmfork.bench.clone import CloneBench
    from vmfork.errors import InvalidInput

    deb = CloneBench(image="debian", data_mb=100, disk_mb=16, counts=(1, 3))
    deb.check()
    assert deb.data_files() == (("/dev/shm/data", 100), ("/root/disk-data", 16))
    assert deb.run_options("b").image == "debian"
    assert CloneBench().data_files() == (("/root/data", 200),)
    for bad in (CloneBench(image="arch"), CloneBench(counts=(3, 1)), CloneBench(counts=())):
        with pytest.raises(InvalidInput):
            bad.check()


# -- the image ------------------------------------------------------------------------
@pytest.fixture(scope="session")
def debian_img(session_images: Path) -> DiskImage:
    """The Debian image from the persistent cache (built there if missing), made
    visible as images/debian of every test home."""
    images = CACHE / "images"
    try:
        img = debian_image(images, build=os.geteuid() == 0)
    except SetupError as exc:
        pytest.skip(f"no Debian image: {exc}")
    link = session_images / "debian"
    if not link.exists():
        link.symlink_to(images / "debian")
    manifest = json.loads((images / "debian" / "manifest.json").read_text())
    print(f"\n[debian image: built in {manifest['build_seconds']} s, "
          f"{manifest['disk_bytes'] / 1e6:.0f} MB qcow2]")
    return img


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class DebianVMs:
    """Two Debian VMs on one base: 'deb' (CLI, --image debian, port forward)
    and 'raw' (library, explicit --kernel/--initrd/--append/--disk)."""

    def __init__(self, env: Env, img: DiskImage, base_sha: str, port: int,
                 boot: dict[str, float]) -> None:
        self.env, self.img, self.base_sha, self.port, self.boot = env, img, base_sha, port, boot


@pytest.fixture(scope="module")
def debian(debian_img: DiskImage, session_images: Path) -> Iterator[DebianVMs]:
    with module_env("vfd", session_images) as env:
        base_sha = sha256(debian_img.disk)
        port = free_port()
        boot: dict[str, float] = {}
        t0 = time.monotonic()
        p = env.cli("run", "deb", "--image", "debian", "--memory", "512M", "--accel",
                    "tcg", "--port", f"{port}:8080", "--json", check=True, timeout=300)
        boot["deb"] = json.loads(p.stdout)["boot_seconds"]
        boot["deb_cli"] = time.monotonic() - t0
        r = run(vm.run(env.store(), vm.RunOptions(
            name="raw", memory_mib=512, accel="tcg", kernel=debian_img.kernel,
            initrd=debian_img.initrd, append=DEBIAN_APPEND, disks=(debian_img.disk,),
            net="user")))
        boot["raw"] = r.boot_seconds
        print(f"\n[debian boot to ready: {boot}]")
        yield DebianVMs(env, debian_img, base_sha, port, boot)


# -- integration ------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.debian
def test_boots_to_multi_user(debian: DebianVMs) -> None:
    assert debian.boot["deb"] < 120
    log = (debian.env.home / "run/deb/console.log").read_text(errors="replace")
    assert "VMFORK-READY" in log
    out = debian.env.exec("deb", "systemctl is-active multi-user.target; "
                                 "systemctl --failed --no-legend --plain; "
                                 "cat /etc/os-release; cat /proc/cmdline")
    assert out.startswith("active\n"), out
    assert "failed" not in out.split("PRETTY_NAME")[0], out
    assert 'VERSION_CODENAME=bookworm' in out
    assert "root=/dev/vda" in out


def exec_latency(env: Env, name: str, agent: str, n: int = 7) -> list[float]:
    """Seconds of *n* ``true`` commands through *agent*, host side end to end."""
    s = env.store()
    rec = s.get_vm(name)
    times = []
    for _ in range(n):
        t0 = time.monotonic()
        r = run(vm.guest_exec(s, rec, "true", agent=agent))
        times.append(time.monotonic() - t0)
        assert r.exit_code == 0
    s.close()
    return sorted(times)


@pytest.mark.slow
@pytest.mark.debian
def test_exec_via_cli_and_latency(debian: DebianVMs) -> None:
    p = debian.env.cli("exec", "deb", "uname -r; echo to-stderr >&2; exit 3")
    assert (p.returncode, p.stderr) == (3, "to-stderr\n")
    assert p.stdout == debian.img.kernel_version + "\n"
    lat = {a: exec_latency(debian.env, "deb", a) for a in ("serial", "qga")}
    print("\n[exec latency of 'true', session included: " + ", ".join(
        f"{a} min {t[0] * 1000:.0f} ms median {t[len(t) // 2] * 1000:.0f} ms"
        for a, t in lat.items()) + "]")
    assert lat["qga"][len(lat["qga"]) // 2] < 2.0


@pytest.mark.slow
@pytest.mark.debian
def test_qga_output_over_the_cap(debian: DebianVMs) -> None:
    """A command whose output passes the cap through qemu-guest-agent fails
    with the same one line as through the serial agent, and the next works
    (the readers themselves: tests/test_guest_output.py)."""
    p = debian.env.cli("exec", "deb", "--agent", "qga", "head -c 16777216 /dev/zero; "
                       "head -c 1048576 /dev/zero >&2")
    assert (p.returncode, p.stdout, p.stderr) == (
        1, "", "vmfork: error: deb: guest answer over 16 MiB (the most vmfork accepts); "
               "the rest was dropped\n")
    assert debian.env.exec("deb", "echo next") == "next\n"


@pytest.mark.slow
@pytest.mark.debian
def test_exec_same_through_both_agents(debian: DebianVMs) -> None:
    """``vmfork exec`` on the Debian guest (qemu-guest-agent by default) and
    through its serial agent, and the library through each: same stdout,
    stderr (apart), exit code, working directory and empty stdin, and the
    same one-line errors for a timeout and a paused VM."""
    env = debian.env
    s = env.store()
    for agent in ("serial", "qga"):
        r = run(vm.exec_(s, "deb", "echo out; echo err >&2; exit 3", agent=agent))
        assert (r.exit_code, r.stdout, r.stderr) == (3, "out\n", "err\n"), agent
    s.close()
    cmd = "pwd; echo out; echo err >&2; cat; exit 5"
    for agent in ("auto", "serial", "qga"):
        p = env.cli("exec", "deb", "--agent", agent, "--", cmd)
        assert (p.returncode, p.stdout, p.stderr) == (5, "/root\nout\n", "err\n"), agent
    # Bytes that are not UTF-8 come back as written.
    for agent in ("serial", "qga"):
        b = subprocess.run([VMFORK, "exec", "deb", "--agent", agent, "--",
                            r"printf '\377o\n'; printf '\376e' >&2"], env=env.environ,
                           capture_output=True, timeout=120, stdin=subprocess.DEVNULL)
        assert (b.returncode, b.stdout, b.stderr) == (0, b"\xffo\n", b"\xfee"), agent
    for agent in ("serial", "qga"):  # a background process does not hold the command
        t0 = time.monotonic()
        p = env.cli("exec", "deb", "--agent", agent, "--", "sleep 6 & echo started")
        assert (p.returncode, p.stdout) == (0, "started\n") and time.monotonic() - t0 < 5
    for agent in ("serial", "qga"):
        t0 = time.monotonic()
        p = env.cli("exec", "deb", "--agent", agent, "--timeout", "1", "--", "sleep 4")
        assert time.monotonic() - t0 < 15
        assert p.returncode == 1 and p.stdout == ""
        assert p.stderr.count("\n") == 1, p.stderr
        assert p.stderr.startswith("vmfork: error: timed out after 1 s waiting for guest "
                                   "command on deb: sleep 4"), p.stderr
    env.cli("pause", "deb", check=True)
    try:
        for agent in ("auto", "serial", "qga"):
            p = env.cli("exec", "deb", "--agent", agent, "--", "true")
            expected = "vmfork: error: deb is paused; resume it first\n"
            assert p.returncode == 1 and p.stderr == expected, p.stderr
    finally:
        env.cli("resume", "deb", check=True)
    time.sleep(3)  # the serial agent finishes the abandoned 'sleep 4' first
    assert env.exec("deb", "echo back").strip() == "back"
    r = run(vm.exec_(env.store(), "deb", "echo back", agent="serial"))
    assert (r.exit_code, r.stdout.strip()) == (0, "back")


@pytest.mark.slow
@pytest.mark.debian
def test_nic_dhcp_and_mac(debian: DebianVMs) -> None:
    s = debian.env.store()
    for name in ("deb", "raw"):
        mac = s.get_vm(name).spec.net.mac  # type: ignore[union-attr]
        out = debian.env.exec(name, "cat /sys/class/net/eth0/address; "
                                    "for i in $(seq 100); do ip -4 -o addr show dev eth0 | "
                                    "grep -q 'inet ' && break; sleep 0.2; done; "
                                    "ip -4 -o addr show dev eth0")
        assert out.splitlines()[0] == mac
        assert "inet 10.0.2.15/24" in out, out
    s.close()


@pytest.mark.slow
@pytest.mark.debian
def test_port_forward_on_loopback(debian: DebianVMs) -> None:
    env = debian.env
    env.exec("deb", "systemd-run --unit vmfork-test-nc --quiet "
                    "busybox nc -l -p 8080 -e /bin/echo hello-from-guest")
    got = b""
    deadline = time.monotonic() + 30
    while b"hello-from-guest" not in got and time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", debian.port), timeout=5) as c:
                got = c.recv(100)
        except OSError:
            pass
        if b"hello-from-guest" not in got:
            time.sleep(0.3)
    assert b"hello-from-guest" in got
    pid = env.store().get_vm("deb").pid
    listen = [c.laddr for c in psutil.Process(pid).net_connections("tcp")
              if c.status == psutil.CONN_LISTEN]
    assert listen and all(a.ip == "127.0.0.1" for a in listen), listen


@pytest.mark.slow
@pytest.mark.debian
def test_disk_write_sync_reread_and_isolation(debian: DebianVMs) -> None:
    env = debian.env
    out = env.exec("deb", "head -c 4194304 /dev/urandom > /root/data && sync && "
                          "md5sum /root/data && echo 3 > /proc/sys/vm/drop_caches && "
                          "md5sum /root/data")
    first, second = out.split()[0], out.split()[2]
    assert first == second
    # The write went to the VM's overlay, not to the base or the other VM.
    overlay = env.store().vm_dir("deb") / "disk0.qcow2"
    assert overlay.stat().st_size > 4 * 1024 * 1024
    info = json.loads(subprocess.run(["qemu-img", "info", "--force-share", "--output=json",
                                      str(overlay)], capture_output=True, text=True,
                                     check=True).stdout)
    assert Path(info["backing-filename"]).resolve() == Path(debian.img.disk).resolve()
    found = env.exec("raw", "test -e /root/data && echo present || echo absent").strip()
    assert found == "absent"
    assert sha256(debian.img.disk) == debian.base_sha


@pytest.mark.slow
@pytest.mark.debian
def test_qga_exec_time_and_fsfreeze(debian: DebianVMs) -> None:
    s = debian.env.store()
    rec = s.get_vm("deb")

    async def go() -> dict[str, object]:
        res: dict[str, object] = {}
        t0 = time.monotonic()
        async with vm.qga_for(s, rec) as qga:
            res["connect"] = time.monotonic() - t0
            r = await qga.exec("echo out; echo err >&2; exit 7")
            res["exec"] = r
            r2 = await qga.exec(["/bin/cat"], input=b"stdin-data")
            res["stdin"] = r2.stdout
            target = time.time_ns() - 3600 * 10**9
            await qga.set_time(target)
            res["set_delta"] = abs(await qga.get_time() - target) / 1e9
            await qga.set_time()
            res["now_delta"] = abs(await qga.get_time() - time.time_ns()) / 1e9
            frozen = await qga.fsfreeze_freeze()
            try:
                res["frozen"] = frozen
                res["status_frozen"] = await qga.fsfreeze_status()
            finally:
                res["thawed"] = await qga.fsfreeze_thaw()
            res["status_after"] = await qga.fsfreeze_status()
        # A second session on the same socket works (sync skips leftovers).
        async with GuestAgent(launch.paths_for(s, rec).qga, s.run_dir("deb") / "qga.lock",
                              "deb") as qga2:
            await qga2.ping()
        return res

    res = run(go())
    s.close()
    r = res["exec"]
    assert (r.exit_code, r.stdout, r.stderr) == (7, "out\n", "err\n")  # type: ignore[attr-defined]
    assert res["stdin"] == "stdin-data"
    assert res["set_delta"] < 5 and res["now_delta"] < 5  # type: ignore[operator]
    assert res["frozen"] >= 1 and res["status_frozen"] == "frozen"  # type: ignore[operator]
    assert res["thawed"] >= 1 and res["status_after"] == "thawed"  # type: ignore[operator]
    print(f"\n[qga connect+sync {res['connect']:.3f} s, "
          f"exec {r.seconds:.3f} s]")  # type: ignore[attr-defined]
    assert debian.env.exec("deb", "touch /root/after-thaw && echo ok").strip() == "ok"


DATA = ("head -c 8388608 /dev/urandom > /root/disk.bin && sync && "
        "head -c 16777216 /dev/urandom > /dev/shm/ram.bin && ")
MD5S = "md5sum /root/disk.bin /dev/shm/ram.bin"
WRITE = "echo {tag} > /root/after-{tag} && sync && cat /root/after-{tag}"


@pytest.mark.slow
@pytest.mark.debian
def test_update_keeps_disk_and_ram(debian: DebianVMs) -> None:
    """A disk-backed guest moves to a new QEMU in each mode: data synced to
    its overlay and data in RAM (tmpfs) are intact, it writes to its disk
    afterwards, and the base image is never written."""
    env = debian.env
    md5s = env.exec("deb", DATA + MD5S)
    overlay = env.store().vm_dir("deb") / "disk0.qcow2"
    pauses: list[str] = []
    for mode in ("ignore-shared", "cpr-transfer", "copy", "ignore-shared"):
        p = env.cli("update", "deb", "--mode", mode, "--json", check=True, timeout=180)
        r = json.loads(p.stdout)
        assert r["mode"] == mode and r["new_pid"] == env.store().get_vm("deb").pid
        pauses.append(f"{mode} {r['pause_host_ms']} ms, total {r['total_seconds']} s")
        assert env.exec("deb", MD5S) == md5s, mode
        tag = mode.replace("-", "")
        assert env.exec("deb", WRITE.format(tag=tag)).strip() == tag
        assert env.store().get_vm("deb").spec.disks[0].path == str(overlay)
    assert overlay.exists()
    assert sha256(debian.img.disk) == debian.base_sha
    print(f"\n[update of a Debian guest with a disk: {'; '.join(pauses)}]")


@pytest.mark.slow
@pytest.mark.debian
def test_save_restore_keeps_disk(debian: DebianVMs) -> None:
    """A --persistent Debian VM: save leaves its overlay in place next to the
    state, restore reuses it; disk and RAM data intact, the guest clock set
    by qemu-guest-agent; export is refused; a dead VM gives a one-line error."""
    env = debian.env
    t0 = time.monotonic()
    env.cli("run", "pers", "--image", "debian", "--memory", "512M", "--accel", "tcg",
            "--persistent", check=True, timeout=300)
    boot = time.monotonic() - t0
    s = env.store()
    try:
        md5s = env.exec("pers", DATA + MD5S)
        overlay = s.vm_dir("pers") / "disk0.qcow2"
        saved = json.loads(env.cli("save", "pers", "--json", check=True).stdout)
        rows = {r["name"]: r for r in json.loads(env.cli("ls", "--json", check=True).stdout)}
        assert rows["pers"]["state"] == "saved" and rows["pers"]["pid"] is None
        assert rows["deb"]["state"] == "running"
        assert overlay.is_file() and Path(saved["state_file"]).parent == overlay.parent
        p = env.cli("exec", "pers", "true")
        expected = "vmfork: error: pers is saved, not running\n"
        assert p.returncode == 1 and p.stderr == expected, p.stderr
        # A missing overlay is named, and the VM stays saved.
        overlay.rename(overlay.with_name("moved.qcow2"))
        p = env.cli("restore", "pers")
        expected = f"vmfork: error: pers: its disk {overlay} is missing\n"
        assert p.returncode == 1 and p.stderr == expected, p.stderr
        overlay.with_name("moved.qcow2").rename(overlay)
        assert s.get_vm("pers").state == "saved"
        time.sleep(4)  # the guest clock falls behind while saved
        restored = json.loads(env.cli("restore", "pers", "--json", check=True).stdout)
        assert restored["state"] == "running" and restored["clock_synced"]
        rec = s.get_vm("pers")
        assert rec.spec.disks[0].path == str(overlay)

        async def clock_offset() -> float:
            async with vm.qga_for(s, rec) as g:
                return abs(await g.get_time() - time.time_ns()) / 1e9
        offset = run(clock_offset())
        assert offset < 2, offset
        assert env.exec("pers", MD5S) == md5s
        assert env.exec("pers", WRITE.format(tag="restored")).strip() == "restored"
        p = env.cli("snapshot", "export", "pers", str(env.home / "pers.snap"))
        assert p.returncode == 1 and p.stderr.count("\n") == 1
        assert "has disks" in p.stderr and not (env.home / "pers.snap").exists()
        # A VM whose QEMU is gone: one line, status 1 (QGA as serial).
        pid = s.get_vm("pers").pid
        assert pid is not None
        psutil.Process(pid).kill()
        psutil.Process(pid).wait(10)
        for agent in ("auto", "serial"):
            p = env.cli("exec", "pers", "--agent", agent, "true")
            assert p.returncode == 1 and p.stderr.count("\n") == 1, p.stderr
            assert "its QEMU process is gone (dead)" in p.stderr
        print(f"\n[persistent Debian: boot {boot:.1f} s, save {saved['seconds']:.3f} s "
              f"(downtime {saved['downtime_seconds']:.3f} s, state "
              f"{saved['state_size'] // 1024} KiB), restore to running "
              f"{restored['running_seconds']:.3f} s, with clock set "
              f"{restored['seconds']:.3f} s, clock offset after {offset:.3f} s]")
    finally:
        if s.has_vm("pers"):
            env.cli("stop", "pers", "--force", timeout=60)
    assert not s.has_vm("pers") and not s.vm_dir("pers").exists()
    s.close()
    assert sha256(debian.img.disk) == debian.base_sha


@pytest.mark.slow
@pytest.mark.debian
def test_hung_identity_command_is_diagnosed(debian: DebianVMs) -> None:
    """An identity command that blocks (here: the root file system frozen
    behind qemu-guest-agent's back, which would refuse to run anything while
    it froze them itself) fails within its deadline with one line that
    points to the guest's own account: the blocked tasks and their stacks."""
    s = debian.env.store()
    rec = s.get_vm("deb")

    async def serial(cmd: str) -> str:
        r = await vm.guest_exec(s, rec, cmd, 30, agent="serial")
        assert r.exit_code == 0, r.stderr
        return r.stdout

    run(serial("fsfreeze -f / && echo frozen"))
    try:
        with pytest.raises(GuestError) as err:
            run(identity.make_unique(s, rec, Timeouts(exec=5)))
    finally:
        run(serial("fsfreeze -u /"))
    msg = str(err.value)
    assert "\n" not in msg
    # (qemu-guest-agent itself may stop answering: it logs to the journal,
    # which cannot write either.)
    # (Tried twice: a guest slow to answer on a loaded host gets a second try.)
    assert msg.startswith("deb: giving the clone its identity did not finish: timed out twice "
                          "after ")
    assert "load average" in msg
    assert "; what the guest was doing is in " in msg
    path = Path(msg.rsplit(" ", 1)[1])
    assert path.parent == s.home / "diagnoses"
    text = path.read_text()
    assert "root fs: a write blocks" in text
    assert "state D" in text and "[<0>]" in text  # blocked tasks, kernel stacks
    assert "eth0" in text
    # The host's side, from QMP: run state, virtio queues, vCPUs.
    assert "run state: running" in text and "virtio-blk" in text and "RIP=" in text
    # Thawed, the command that waited goes through: the guest took its identity.
    deadline = time.monotonic() + 30
    while debian.env.exec("deb", "cat /etc/hostname").strip() != "deb":
        assert time.monotonic() < deadline, "the blocked identity command never finished"
        time.sleep(0.5)
    s.close()


@pytest.mark.slow
@pytest.mark.debian
def test_stop_removes_overlays_and_leaves_base(debian: DebianVMs) -> None:
    env = debian.env
    s = env.store()
    overlays = [s.vm_dir(n) / "disk0.qcow2" for n in ("deb", "raw")]
    assert all(o.exists() for o in overlays)
    for name in ("deb", "raw"):
        env.cli("stop", name, check=True, timeout=60)
    assert not any(o.exists() for o in overlays)
    assert not s.list_vms()
    s.close()
    assert not qemu_processes(str(env.home))
    assert not list(env.home.rglob("*.sock"))
    assert not list(env.memory_dir.iterdir())
    assert sha256(debian.img.disk) == debian.base_sha
