"""The test images of guests that have never heard of vmfork
(tests/foreign_images.py): none holds vmfork's agent, units or marker, and
each boots under plain QEMU (no vmfork) to its ready line on the serial
console: the plain Debian with the host kernel (its qemu-guest-agent answers
and its NIC has a DHCP address), the bootable Debian through SeaBIOS and its
own extlinux, the busybox guest with its web server reachable through a
user-mode port forward and nothing on the hypervisor console.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import selectors
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vmfork.images.debian import DiskImage
from vmfork.images.demo import GuestImage
from vmfork.timeouts import Timeouts

from .foreign_images import (
    BOOT_APPEND,
    BUSYBOX_HTTP_PORT,
    BUSYBOX_READY_RE,
    DEBIAN_READY_RE,
    PART_START,
    ROOT_LABEL,
)

TIMEOUTS = Timeouts()
#: Boots under TCG on a shared machine: twice vmfork's own boot deadline.
BOOT_TIMEOUT = 2 * TIMEOUTS.boot
#: Case-insensitive: the project's name, its agent's and its marker.
VMFORK_RE = re.compile(rb"(?i)vmfork")


# -- helpers ----------------------------------------------------------------------------
def mentions_of_vmfork(path: Path) -> list[str]:
    """Every place in file *path* (its data extents only: sparse images are
    large) where the word vmfork occurs, with a little context."""
    found: list[str] = []
    chunk, overlap = 4 << 20, 64
    with open(path, "rb") as f:
        fd, end = f.fileno(), os.fstat(f.fileno()).st_size
        pos = 0
        while pos < end:
            try:
                pos = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:  # no data after pos
                break
            hole = os.lseek(fd, pos, os.SEEK_HOLE)
            while pos < hole:
                f.seek(pos)
                data = f.read(min(chunk, hole - pos) + overlap)
                found += [f"{pos + m.start()}: {data[max(0, m.start() - 40):m.end() + 40]!r}"
                          for m in VMFORK_RE.finditer(data)
                          if m.start() < chunk or pos + chunk >= hole]
                pos += chunk
            pos = hole
    return found


def debugfs(image: Path, request: str, offset: int = 0) -> str:
    """Run one debugfs *request* read-only on the ext4 file system at *offset*
    of the raw *image*; its output (errors, such as a missing file, go to
    stderr and are left out)."""
    spec = f"{image}?offset={offset}" if offset else str(image)
    p = subprocess.run(["debugfs", "-R", request, spec], capture_output=True, text=True,
                       timeout=TIMEOUTS.exec, check=True)
    return p.stdout


def exists(image: Path, path: str, offset: int = 0) -> bool:
    return debugfs(image, f"stat {path}", offset) != ""


def raw_copy(qcow2: str, dest: Path) -> Path:
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", qcow2, str(dest)],
                   check=True, timeout=TIMEOUTS.exec, stdin=subprocess.DEVNULL)
    return dest


class Console:
    """QEMU's serial console on its stdout, read until a pattern shows up."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self.text = ""
        self._sel = selectors.DefaultSelector()
        assert proc.stdout is not None
        self._sel.register(proc.stdout, selectors.EVENT_READ)

    def wait_for(self, pattern: str, timeout: float) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        assert self.proc.stdout is not None
        while True:
            m = re.search(pattern, self.text)
            if m:
                return m
            left = deadline - time.monotonic()
            if left <= 0 or self.proc.poll() is not None:
                raise AssertionError(f"no {pattern!r} on the console within {timeout:.0f} s "
                                     f"(QEMU exit status {self.proc.poll()}); console ends:\n"
                                     f"{self.text[-3000:]}")
            if self._sel.select(left):
                self.text += os.read(self.proc.stdout.fileno(), 1 << 16).decode(
                    errors="replace")


@contextlib.contextmanager
def plain_qemu(*args: str) -> Iterator[Console]:
    """QEMU with its defaults but no display, the serial console on stdout;
    killed on the way out."""
    qemu = shutil.which("qemu-system-x86_64")
    assert qemu, "qemu-system-x86_64 is not installed"
    proc = subprocess.Popen([qemu, "-accel", "tcg", "-m", "1G", "-display", "none",
                             "-serial", "stdio", "-monitor", "none", *args],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        yield Console(proc)
    finally:
        proc.kill()
        proc.wait(timeout=TIMEOUTS.stop)
        for f in (proc.stdin, proc.stdout):
            if f is not None:
                f.close()


def qga_call(path: Path, command: str, deadline: float) -> Any:
    """The answer of qemu-guest-agent behind socket *path* to *command*,
    retried (after a guest-sync) until it answers or *deadline* passes."""
    n = 0
    while True:
        n += 1
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(TIMEOUTS.agent_attempt)
                s.connect(str(path))
                f = s.makefile("rwb")
                f.write(json.dumps({"execute": "guest-sync", "arguments": {"id": n}})
                        .encode() + b"\n")
                f.flush()
                while True:
                    line = f.readline()
                    if not line:
                        raise ConnectionResetError("qemu-guest-agent closed the connection")
                    if json.loads(line).get("return") == n:
                        break
                f.write(json.dumps({"execute": command}).encode() + b"\n")
                f.flush()
                return json.loads(f.readline())["return"]
        except (OSError, ValueError, KeyError):
            if time.monotonic() > deadline:
                raise


def qga_device(path: Path) -> list[str]:
    return ["-device", "virtio-serial-pci",
            "-chardev", f"socket,id=qga0,path={path},server=on,wait=off",
            "-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- no vmfork inside -----------------------------------------------------------------------
def test_mentions_of_vmfork_reads_every_data_extent(tmp_path: Path) -> None:
    """The scan the image checks rely on finds the word in any case, across
    its read chunks and after holes, and nothing in a clean file."""
    f = tmp_path / "sparse"
    with open(f, "wb") as out:
        out.truncate(64 << 20)
        for offset, word in (((4 << 20) - 3, b"VMFORK-READY"), (40 << 20, b"/vmfork-agent")):
            out.seek(offset)
            out.write(word)
    assert [m.split(":")[0] for m in mentions_of_vmfork(f)] == [str((4 << 20) - 3),
                                                                str((40 << 20) + 1)]
    (tmp_path / "clean").write_bytes(b"vm fork, VMFOR-K, vmfrok")
    assert mentions_of_vmfork(tmp_path / "clean") == []


@pytest.mark.slow
@pytest.mark.debian
def test_debian_images_hold_no_vmfork(plain_debian: DiskImage, bootable_debian: str,
                                      tmp_path: Path) -> None:
    """Neither Debian disk mentions vmfork anywhere (no agent, unit or marker,
    not even in a file name), nor does the initramfs; both hold the same
    system, with the foreign ready unit enabled and qemu-guest-agent installed;
    the bootable one has an active partition, extlinux and the kernel pair."""
    plain = raw_copy(plain_debian.disk, tmp_path / "plain.raw")
    boot = raw_copy(bootable_debian, tmp_path / "boot.raw")
    assert mentions_of_vmfork(plain) == []
    assert mentions_of_vmfork(boot) == []
    for image, offset in ((plain, 0), (boot, PART_START)):
        assert ROOT_LABEL in debugfs(image, "show_super_stats -h", offset)
        wants = debugfs(image, "ls /etc/systemd/system/multi-user.target.wants", offset)
        assert "multi-user-reached.service" in wants and "systemd-networkd.service" in wants
        assert exists(image, "/usr/sbin/qemu-ga", offset)
        assert not exists(image, "/usr/local/sbin/vmfork-agent", offset)
        assert debugfs(image, "cat /etc/hostname", offset) == "debian\n"
    sector = boot.read_bytes()[:512]
    assert sector[510:] == b"\x55\xaa" and sector[446] == 0x80 and sector[450] == 0x83
    listing = debugfs(boot, "ls /boot/extlinux", PART_START)
    assert "ldlinux.sys" in listing and "extlinux.conf" in listing
    conf = debugfs(boot, "cat /boot/extlinux/extlinux.conf", PART_START)
    assert BOOT_APPEND in conf
    version = plain_debian.kernel_version
    assert f"vmlinuz-{version}" in debugfs(boot, "ls /boot", PART_START)
    unpacked = tmp_path / "initrd"
    subprocess.run(["unmkinitramfs", plain_debian.initrd, str(unpacked)], check=True,
                   timeout=TIMEOUTS.exec, stdin=subprocess.DEVNULL)
    files = [p for p in unpacked.rglob("*") if p.is_file() and not p.is_symlink()]
    assert any(p.name.startswith("virtio_blk") for p in files)
    assert [str(p) for p in files if mentions_of_vmfork(p)] == []


@pytest.mark.slow
@pytest.mark.qemu
def test_busybox_initrd_holds_no_vmfork(busybox_initrd: GuestImage, tmp_path: Path) -> None:
    """The busybox initramfs mentions vmfork nowhere and its init uses no
    hypervisor console."""
    initrd = Path(busybox_initrd.initrd)
    assert mentions_of_vmfork(initrd) == []
    names = subprocess.run(["cpio", "-t", "--quiet"], stdin=initrd.open("rb"),
                           capture_output=True, text=True, check=True,
                           timeout=TIMEOUTS.exec).stdout.split()
    assert "init" in names and "bin/busybox" in names and "lib/modules/virtio_net.ko" in names
    init = subprocess.run(["cpio", "-i", "--quiet", "--to-stdout", "init"],
                          stdin=initrd.open("rb"), capture_output=True, text=True, check=True,
                          timeout=TIMEOUTS.exec).stdout
    assert init.startswith("#!/bin/sh") and "hvc" not in init


# -- each boots under plain QEMU ---------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.debian
def test_plain_debian_boots_with_host_kernel(plain_debian: DiskImage, tmp_path: Path) -> None:
    """With the issue's --kernel/--initrd/--append: multi-user on ttyS0, an
    autologin root shell, qemu-guest-agent answering on its virtio-serial
    port, and the NIC's DHCP address from the user-mode network."""
    qga = tmp_path / "qga.sock"
    with plain_qemu("-kernel", plain_debian.kernel, "-initrd", plain_debian.initrd,
                    "-append", plain_debian.append,
                    "-drive", f"file={plain_debian.disk},if=virtio,format=qcow2,snapshot=on",
                    "-netdev", "user,id=n0", "-device", "virtio-net-pci,netdev=n0",
                    *qga_device(qga)) as console:
        t0 = time.monotonic()
        console.wait_for(DEBIAN_READY_RE, BOOT_TIMEOUT)
        console.wait_for(r"root@debian:~# ", BOOT_TIMEOUT)
        print(f"\n[plain Debian: ready line after {time.monotonic() - t0:.0f} s]")
        deadline = time.monotonic() + TIMEOUTS.boot
        assert qga_call(qga, "guest-get-osinfo", deadline)["id"] == "debian"
        while True:
            ifaces = qga_call(qga, "guest-network-get-interfaces", deadline)
            addrs = {a["ip-address"] for i in ifaces for a in i.get("ip-addresses", ())}
            if "10.0.2.15" in addrs or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert "10.0.2.15" in addrs, ifaces
    assert "VMFORK" not in console.text


@pytest.mark.slow
@pytest.mark.debian
def test_bootable_debian_boots_from_its_own_bootloader(bootable_debian: str) -> None:
    """No -kernel: SeaBIOS, syslinux's MBR, extlinux, the kernel with the
    command line of extlinux.conf, then multi-user on ttyS0."""
    with plain_qemu("-drive", f"file={bootable_debian},if=virtio,format=qcow2,snapshot=on",
                    "-netdev", "user,id=n0", "-device", "virtio-net-pci,netdev=n0") as console:
        t0 = time.monotonic()
        console.wait_for(DEBIAN_READY_RE, BOOT_TIMEOUT)
        print(f"\n[bootable Debian: ready line after {time.monotonic() - t0:.0f} s]")
    assert "SYSLINUX" in console.text
    assert re.search(rf"Command line: BOOT_IMAGE=/boot/vmlinuz-\S+ {re.escape(BOOT_APPEND)}",
                     console.text)


@pytest.mark.slow
@pytest.mark.qemu
def test_busybox_boots_with_no_agent(busybox_initrd: GuestImage, tmp_path: Path) -> None:
    """The busybox guest prints its line, answers HTTP through a user-mode
    port forward (so its DHCP worked), and says nothing on a hypervisor
    console even when written to."""
    port = free_port()
    hvc = tmp_path / "hvc.sock"
    with plain_qemu("-kernel", busybox_initrd.kernel, "-initrd", busybox_initrd.initrd,
                    "-append", busybox_initrd.append,
                    "-netdev", f"user,id=n0,hostfwd=tcp:127.0.0.1:{port}-:{BUSYBOX_HTTP_PORT}",
                    "-device", "virtio-net-pci,netdev=n0",
                    "-device", "virtio-serial-pci",
                    "-chardev", f"socket,id=hvc0,path={hvc},server=on,wait=off",
                    "-device", "virtconsole,chardev=hvc0") as console:
        t0 = time.monotonic()
        console.wait_for(BUSYBOX_READY_RE, BOOT_TIMEOUT)
        print(f"\n[busybox guest: ready line after {time.monotonic() - t0:.0f} s]")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/",
                                    timeout=TIMEOUTS.agent) as r:
            assert r.read() == b"busybox guest\n"
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(hvc))
            s.sendall(b"\n")
            s.settimeout(TIMEOUTS.agent_attempt)
            with pytest.raises(TimeoutError):
                s.recv(1)
    assert "VMFORK" not in console.text
