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
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from vmfork import vm
from vmfork.errors import SetupError
from vmfork.image_debian import DEBIAN_APPEND, DiskImage, debian_image, debian_mirror
from vmfork.qga import GuestAgent
from vmfork.spec import DiskSpec, MemorySpec, NetSpec, RunPaths, VMSpec, build_argv

from .conftest import Env, qemu_processes, run

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
    vm.create_overlays(spec)
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", disk.path],
                                     capture_output=True, text=True, check=True).stdout)
    assert info["format"] == "qcow2"
    assert info["backing-filename"] == str(base)
    assert info["backing-filename-format"] == "raw"
    (direct,) = vm.disk_specs(store, vm.RunOptions(name="ov", disks=(str(base),),
                                                   overlay=False))
    assert direct.path == str(base) and direct.backing is None
    store.close()


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
    home = Path(tempfile.mkdtemp(prefix="vfd", dir="/tmp"))
    memory_dir = Path(tempfile.mkdtemp(prefix="vfdmem", dir="/dev/shm"))
    (home / "images").symlink_to(session_images)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VMFORK_HOME", str(home))
        mp.setenv("VMFORK_MEMORY_DIR", str(memory_dir))
        env = Env(home, memory_dir, dict(os.environ))
        base_sha = sha256(debian_img.disk)
        port = free_port()
        boot: dict[str, float] = {}
        try:
            t0 = time.monotonic()
            p = env.cli("run", "deb", "--image", "debian", "--memory", "512M", "--accel",
                        "tcg", "--port", f"{port}:8080", "--json", check=True, timeout=300)
            boot["deb"] = json.loads(p.stdout)["boot_seconds"]
            boot["deb_cli"] = time.monotonic() - t0
            r = run(vm.run(env.store(), vm.RunOptions(
                name="raw", memory_mib=512, accel="tcg", kernel=debian_img.kernel,
                initrd=debian_img.initrd, append=DEBIAN_APPEND, disks=(debian_img.disk,),
                net=True)))
            boot["raw"] = r["boot_seconds"]
            print(f"\n[debian boot to ready: {boot}]")
            yield DebianVMs(env, debian_img, base_sha, port, boot)
        finally:
            s = env.store()
            for rec in s.list_vms():
                try:
                    run(vm.stop(s, rec.name, force=True))
                except Exception as exc:  # pragma: no cover - reported by the leak check
                    print(f"cleanup of {rec.name} failed: {exc}")
            s.close()
            for proc in qemu_processes(str(home)):
                proc.kill()
            shutil.rmtree(memory_dir, ignore_errors=True)
            shutil.rmtree(home, ignore_errors=True)


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


@pytest.mark.slow
@pytest.mark.debian
def test_exec_via_cli_and_latency(debian: DebianVMs) -> None:
    p = debian.env.cli("exec", "deb", "uname -r; echo to-stderr >&2; exit 3")
    assert p.returncode == 3
    assert debian.img.kernel_version in p.stdout and "to-stderr" in p.stdout
    s = debian.env.store()
    times = []
    for _ in range(5):
        r = run(vm.exec_(s, "deb", "true"))
        assert r.status == 0
        times.append(r.seconds)
    s.close()
    print(f"\n[serial agent exec latency: min {min(times):.3f} s, "
          f"median {sorted(times)[2]:.3f} s]")


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
    assert env.exec("raw", "test -e /root/data && echo present || echo absent").strip() \
        == "absent"
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
            res["stdin"] = r2.output
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
        async with GuestAgent(vm.paths_for(s, rec).qga, s.run_dir("deb") / "qga.lock",
                              "deb") as qga2:
            await qga2.ping()
        return res

    res = run(go())
    s.close()
    r = res["exec"]
    assert r.status == 7 and r.output == b"out\nerr\n"  # type: ignore[attr-defined]
    assert res["stdin"] == b"stdin-data"
    assert res["set_delta"] < 5 and res["now_delta"] < 5  # type: ignore[operator]
    assert res["frozen"] >= 1 and res["status_frozen"] == "frozen"  # type: ignore[operator]
    assert res["thawed"] >= 1 and res["status_after"] == "thawed"  # type: ignore[operator]
    print(f"\n[qga connect+sync {res['connect']:.3f} s, "
          f"exec {r.seconds:.3f} s]")  # type: ignore[attr-defined]
    assert debian.env.exec("deb", "touch /root/after-thaw && echo ok").strip() == "ok"


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
