"""Test images of guests that have never heard of vmfork, and their fixtures.

Owns the recipes, the build and the cache of three guests with none of
vmfork's serial agent, units or readiness marker, as a user would bring them:

- **plain Debian**: debootstrap bookworm minbase plus systemd, systemd-sysv,
  udev, iproute2, qemu-guest-agent and dbus; DHCP on ``eth*``/``en*`` with
  systemd-networkd, an autologin root shell on ttyS0, and a unit that prints
  ``multi-user reached`` on ttyS0 once multi-user.target is reached. Its root
  file system is the whole disk (``root=/dev/vda``), booted with the host's
  Debian kernel and an initramfs that can mount a virtio-blk root
  (:data:`PLAIN_APPEND`). qemu-guest-agent starts when its virtio-serial port
  ``org.qemu.guest_agent.0`` appears. Nothing masks the getty that systemd
  starts on a hypervisor console (hvc0), as on any Debian.
- **bootable Debian**: the same file system in the partition of an MBR disk,
  its kernel and initramfs in /boot and extlinux installed, so that QEMU boots
  it with no ``-kernel`` (SeaBIOS, extlinux, kernel; console on ttyS0).
- **busybox initrd**: the host kernel and an initramfs whose init mounts
  proc, sys and dev, brings eth0 up with udhcpc, serves ``/www`` with busybox
  httpd on port :data:`BUSYBOX_HTTP_PORT`, prints ``busybox guest up`` on the
  console and then runs a shell on it. Nothing listens on hvc0.

They are built by the test session into the persistent cache of
``tests/test_debian.py`` (``$VMFORK_TEST_CACHE``, default
/var/tmp/vmfork-test) under ``images/foreign-debian`` and
``images/foreign-busybox``, each keyed by a fingerprint of its recipe and the
host kernel, under a build lock so that two sessions never build one at once.
The Debian pair needs root (debootstrap, chroot, a loop mount for extlinux).

Fixtures (session scope; tests/conftest.py makes them visible to every test
module): :func:`plain_debian`, :func:`bootable_debian`, :func:`busybox_initrd`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import struct
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from vmfork.errors import SetupError
from vmfork.images.debian import (
    ROOT_MODULES,
    SUITE,
    DiskImage,
    build_lock,
    copy_host_modules,
    debian_mirror,
    debootstrap,
    host_initrd,
    root_initrd,
    run_step,
    slim_rootfs,
)
from vmfork.images.demo import (
    Cpio,
    GuestImage,
    host_busybox,
    host_kernel,
    module_bytes,
    module_closure,
)
from vmfork.private import FILE_MODE, READONLY_MODE, write_file

CACHE = Path(os.environ.get("VMFORK_TEST_CACHE", "/var/tmp/vmfork-test"))
IMAGES = CACHE / "images"

# -- the Debian pair ------------------------------------------------------------------
#: What the issue's user installed on top of debootstrap's minbase variant.
DEBIAN_PACKAGES = ("systemd", "systemd-sysv", "udev", "iproute2", "qemu-guest-agent", "dbus")
#: The kernel command line the issue's user gave ``vmfork run --append``.
PLAIN_APPEND = "console=ttyS0 root=/dev/vda rw"
#: The kernel command line extlinux gives the kernel of the bootable disk.
BOOT_APPEND = "console=ttyS0 root=/dev/vda1 rw"
#: The line both Debian guests print on ttyS0 at multi-user.target.
DEBIAN_READY = "multi-user reached"
#: A regular expression matching that line (for ``--ready console:REGEX``).
DEBIAN_READY_RE = r"multi-user reached"
ROOT_LABEL = "debian-root"
HOSTNAME = "debian"
DISK_SIZE = 2 << 30
#: Where the root partition of the bootable disk starts (bytes; 2048 sectors).
PART_START = 1 << 20
SECTOR = 512
#: The MBR's disk identifier (any fixed value: the build is reproducible).
DISK_SIGNATURE = b"fdeb"
MBR_BIN = Path("/usr/lib/syslinux/mbr/mbr.bin")
ENABLED_UNITS = ("systemd-networkd.service", "multi-user-reached.service")

#: Files written into the Debian root file system (path -> (mode, text)).
#: ``{version}`` in the extlinux configuration is the kernel version.
DEBIAN_FILES: dict[str, tuple[int, str]] = {
    "etc/hostname": (0o644, f"{HOSTNAME}\n"),
    "etc/hosts": (0o644, f"127.0.0.1\tlocalhost\n127.0.1.1\t{HOSTNAME}\n"
                         "::1\t\tlocalhost ip6-localhost ip6-loopback\n"),
    "etc/fstab": (0o644, f"LABEL={ROOT_LABEL}\t/\text4\tdefaults\t0\t0\n"),
    "etc/apt/sources.list": (0o644, "# Add the Debian mirror you use, e.g.\n"
                                    "# deb <mirror>/debian bookworm main\n"),
    "etc/systemd/network/20-wired.network": (0o644, "[Match]\nName=eth* en*\n\n"
                                                    "[Network]\nDHCP=yes\n"),
    "etc/systemd/system/serial-getty@ttyS0.service.d/autologin.conf": (0o644, (
        "[Service]\nExecStart=\n"
        "ExecStart=-/sbin/agetty --autologin root --noclear --keep-baud "
        "115200,57600,38400,9600 %I $TERM\n")),
    "etc/systemd/system/multi-user-reached.service": (0o644, (
        "[Unit]\nDescription=Say on ttyS0 that multi-user.target is reached\n"
        "After=multi-user.target\n\n"
        "[Service]\nType=oneshot\n"
        "ExecStart=/bin/sh -c 'echo \"multi-user reached after $$(cut -d \" \" -f 1 "
        "/proc/uptime) s\" > /dev/ttyS0'\n\n"
        "[Install]\nWantedBy=multi-user.target\n")),
    "boot/extlinux/extlinux.conf": (0o644, (
        "SERIAL 0 115200\nDEFAULT debian\nPROMPT 0\nTIMEOUT 1\n\n"
        "LABEL debian\n  LINUX /boot/vmlinuz-{version}\n  INITRD /boot/initrd.img-{version}\n"
        f"  APPEND {BOOT_APPEND}\n")),
}


@dataclass(frozen=True)
class ForeignDebian:
    """The Debian pair: the plain image with its boot triple, and the
    bootable disk; *manifest* is what the build recorded (times, sizes)."""

    plain: DiskImage
    bootable: str
    manifest: dict[str, Any]


def _stat_key(p: Path) -> str:
    st = p.stat()
    return f"{p}:{st.st_size}:{st.st_mtime_ns}"


def _debian_fingerprint(kernel: Path, initrd: Path | None) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(["foreign-debian:1", SUITE, DEBIAN_PACKAGES, PLAIN_APPEND, BOOT_APPEND,
                         ROOT_LABEL, DISK_SIZE, PART_START, ROOT_MODULES, ENABLED_UNITS,
                         sorted(DEBIAN_FILES.items())]).encode())
    for p in (kernel, initrd, MBR_BIN):
        if p is not None and p.exists():
            h.update(_stat_key(p).encode())
    return h.hexdigest()[:16]


def _read_manifest(d: Path, fp: str) -> dict[str, Any] | None:
    """The manifest of image directory *d* if it has fingerprint *fp* and
    all the files it names exist."""
    try:
        data: dict[str, Any] = json.loads((d / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    if data.get("fingerprint") != fp:
        return None
    if not all((d / name).is_file() for name in data.get("files", ())):
        return None
    return data


def _foreign_debian(d: Path, data: dict[str, Any]) -> ForeignDebian:
    plain = DiskImage(name="plain-debian", kernel=str(d / "vmlinuz"),
                      initrd=str(d / "initrd.img"), append=PLAIN_APPEND,
                      kernel_version=data["kernel_version"], disk=str(d / "plain.qcow2"),
                      disk_format="qcow2")
    return ForeignDebian(plain=plain, bootable=str(d / "bootable.qcow2"), manifest=data)


def foreign_debian_images(images_dir: Path = IMAGES, build: bool = True) -> ForeignDebian:
    """Return the Debian pair from *images_dir*/foreign-debian, building it
    first if it is missing or stale (SetupError instead with *build* False)."""
    kernel, version = host_kernel()
    initrd_src = host_initrd(version)
    d = images_dir / "foreign-debian"
    fp = _debian_fingerprint(kernel, initrd_src)
    data = _read_manifest(d, fp)
    if data is not None:
        return _foreign_debian(d, data)
    if not build:
        raise SetupError("the foreign Debian test images are not built (or are stale) in "
                         f"{d}: run the tests as root once to build them")
    with build_lock(d):
        data = _read_manifest(d, fp)  # another session may have built them meanwhile
        if data is None:
            data = _build_debian(d, kernel, version, initrd_src, fp)
    return _foreign_debian(d, data)


def _check_debian_tools() -> None:
    if os.geteuid() != 0:
        raise SetupError("building the foreign Debian test images needs root "
                         "(debootstrap, chroot, a loop mount)")
    missing = [t for t in ("debootstrap", "chroot", "mkfs.ext4", "qemu-img", "extlinux",
                           "losetup", "mount", "umount") if shutil.which(t) is None]
    if not MBR_BIN.is_file():
        missing.append(str(MBR_BIN))
    if missing:
        raise SetupError(f"missing {', '.join(missing)}: run scripts/setup-system.sh")


def configure_foreign_rootfs(root: Path, kernel: Path, initrd: Path, version: str) -> None:
    """Turn a fresh debootstrap tree into the foreign Debian guest, with the
    host kernel, its modules and *initrd* in /boot for the bootloader."""
    for rel, (mode, text) in DEBIAN_FILES.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text.replace("{version}", version))
        p.chmod(mode)
    shutil.copyfile(kernel, root / "boot" / f"vmlinuz-{version}")
    shutil.copyfile(initrd, root / "boot" / f"initrd.img-{version}")
    copy_host_modules(root, version)
    run_step(["chroot", str(root), "systemctl", "enable", *ENABLED_UNITS], "systemctl enable")
    run_step(["chroot", str(root), "passwd", "-d", "root"], "passwd -d root")
    slim_rootfs(root)


def mbr(disk_bytes: int, part_start: int = PART_START) -> bytes:
    """The first sector of the bootable disk: syslinux's MBR boot code and
    one active Linux partition from *part_start* to the end of the disk."""
    code = MBR_BIN.read_bytes()[:440]
    first, count = part_start // SECTOR, (disk_bytes - part_start) // SECTOR
    # CHS fields 0xfe 0xff 0xff: "beyond CHS, use the LBA fields".
    entry = struct.pack("<B3sB3sII", 0x80, b"\xfe\xff\xff", 0x83, b"\xfe\xff\xff",
                        first, count)
    sector = code.ljust(440, b"\0") + DISK_SIGNATURE + b"\0\0" + entry + b"\0" * 48 + b"\x55\xaa"
    assert len(sector) == SECTOR
    return sector


@contextlib.contextmanager
def loop_mounted(image: Path, offset: int, size: int) -> Iterator[Path]:
    """Mount the ext4 file system at *offset* of *image* through a loop
    device, on a directory outside the cache (a mount records its mount
    point in the file system); unmount and detach on the way out."""
    mnt = Path(tempfile.mkdtemp(prefix="foreign-mnt-"))
    dev = subprocess.run(["losetup", "--find", "--show", "--offset", str(offset),
                          "--sizelimit", str(size), str(image)],
                         capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if dev.returncode != 0:
        mnt.rmdir()
        raise SetupError(f"losetup failed (exit status {dev.returncode}): {dev.stderr.strip()}")
    loop = dev.stdout.strip()
    try:
        run_step(["mount", "-t", "ext4", loop, str(mnt)], "mount")
        try:
            yield mnt
        finally:
            run_step(["umount", str(mnt)], "umount")
    finally:
        subprocess.run(["losetup", "--detach", loop], capture_output=True,
                       stdin=subprocess.DEVNULL)
        mnt.rmdir()


def _build_debian(d: Path, kernel: Path, version: str, initrd_src: Path | None,
                  fp: str) -> dict[str, Any]:
    _check_debian_tools()
    mirror = debian_mirror()
    t0 = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=d))
    build_log = tmp / "build.log"
    try:
        root = tmp / "rootfs"
        debootstrap(root, DEBIAN_PACKAGES, mirror, build_log)
        t_debootstrap = time.monotonic()
        shutil.copyfile(kernel, tmp / "vmlinuz")
        root_initrd(version, initrd_src, tmp / "initrd.img")
        configure_foreign_rootfs(root, kernel, tmp / "initrd.img", version)
        mkfs = ["mkfs.ext4", "-q", "-F", "-L", ROOT_LABEL, "-d", str(root)]
        # The plain image: the file system is the whole disk.
        raw = tmp / "plain.raw"
        run_step([*mkfs, str(raw), f"{DISK_SIZE // 1024}k"], "mkfs.ext4", build_log)
        run_step(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw),
                  str(tmp / "plain.qcow2")], "qemu-img convert", build_log)
        raw.unlink()
        t_plain = time.monotonic()
        # The bootable disk: the same tree in a partition, extlinux in its
        # boot sector and /boot/extlinux, syslinux's MBR code in front.
        raw = tmp / "bootable.raw"
        part = DISK_SIZE - PART_START
        run_step([*mkfs, "-E", f"offset={PART_START}", str(raw), f"{part // 1024}k"],
                 "mkfs.ext4 (partition)", build_log)
        shutil.rmtree(root)
        with open(raw, "r+b") as f:
            f.truncate(DISK_SIZE)
            f.write(mbr(DISK_SIZE))
        with loop_mounted(raw, PART_START, part) as mnt:
            run_step(["extlinux", "--install", str(mnt / "boot/extlinux")], "extlinux",
                     build_log)
        run_step(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw),
                  str(tmp / "bootable.qcow2")], "qemu-img convert", build_log)
        raw.unlink()
        files = ("plain.qcow2", "bootable.qcow2", "vmlinuz", "initrd.img")
        for name in files:
            os.replace(tmp / name, d / name)
            (d / name).chmod(READONLY_MODE if name.endswith(".qcow2") else FILE_MODE)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    t_end = time.monotonic()
    manifest = {
        "fingerprint": fp, "suite": SUITE, "packages": list(DEBIAN_PACKAGES),
        "kernel_version": version, "files": list(files), "size": DISK_SIZE,
        "plain_bytes": (d / "plain.qcow2").stat().st_size,
        "bootable_bytes": (d / "bootable.qcow2").stat().st_size,
        "build_seconds": round(t_end - t0, 1),
        "debootstrap_seconds": round(t_debootstrap - t0, 1),
        "plain_seconds": round(t_plain - t_debootstrap, 1),
        "bootable_seconds": round(t_end - t_plain, 1),
        "built": time.time(),
    }
    write_file(d / "manifest.json", json.dumps(manifest, indent=2).encode())
    return manifest


# -- the busybox initrd --------------------------------------------------------------
BUSYBOX_APPEND = "console=ttyS0 panic=-1"
#: The line the busybox guest prints on its console when it is up.
BUSYBOX_READY = "busybox guest up"
BUSYBOX_READY_RE = r"busybox guest up"
#: The guest port busybox httpd serves /www on.
BUSYBOX_HTTP_PORT = 8080
BUSYBOX_MODULES = ("virtio_net",)
BUSYBOX_INIT = f"""#!/bin/sh
# init of a busybox guest: the basics, DHCP on eth0, a web server, a line on
# the console, then a shell there.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin HOME=/root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /run /tmp
mount -t devpts devpts /dev/pts
while read -r mod; do
    [ -n "$mod" ] && insmod "/lib/modules/$mod"
done < /etc/modules
hostname busybox
ip link set lo up
if [ -e /sys/class/net/eth0 ]; then
    ip link set eth0 up
    udhcpc -i eth0 -q -n -t 5 -T 1 -s /etc/udhcpc.script >/dev/null 2>&1
fi
httpd -p {BUSYBOX_HTTP_PORT} -h /www
echo "{BUSYBOX_READY} after $(cut -d ' ' -f 1 /proc/uptime) s" > /dev/console
while true; do
    setsid cttyhack sh -l
    sleep 1
done
"""
UDHCPC_SCRIPT = """#!/bin/sh
case "$1" in
    bound|renew)
        ip addr flush dev "$interface"
        ip addr add "$ip/${mask:-24}" dev "$interface"
        [ -n "$router" ] && ip route replace default via "${router%% *}" dev "$interface"
        : > /etc/resolv.conf
        for d in $dns; do echo "nameserver $d" >> /etc/resolv.conf; done
        ;;
esac
exit 0
"""
BUSYBOX_INDEX = "busybox guest\n"


def build_busybox_initrd(busybox: Path, version: str) -> bytes:
    """Pack the busybox guest's initramfs (cpio newc, uncompressed)."""
    cpio = Cpio()
    for d in ("bin", "sbin", "usr", "usr/bin", "usr/sbin", "etc", "proc", "sys", "dev",
              "tmp", "root", "run", "lib", "lib/modules", "var", "www"):
        cpio.dir(d)
    cpio.file("bin/busybox", busybox.read_bytes(), 0o755)
    applets = subprocess.run([str(busybox), "--list-full"], capture_output=True, text=True,
                             check=True).stdout.split()
    for applet in applets:
        if applet != "bin/busybox" and applet.count("/") <= 2:
            cpio.symlink(applet, "/bin/busybox")
    cpio.file("init", BUSYBOX_INIT.encode(), 0o755)
    cpio.file("etc/udhcpc.script", UDHCPC_SCRIPT.encode(), 0o755)
    cpio.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
    cpio.file("etc/group", b"root:x:0:\n")
    cpio.file("www/index.html", BUSYBOX_INDEX.encode())
    names = []
    for mod in module_closure(version, BUSYBOX_MODULES):
        fname = mod.name.split(".ko")[0] + ".ko"
        cpio.file(f"lib/modules/{fname}", module_bytes(mod))
        names.append(fname)
    cpio.file("etc/modules", "".join(f"{n}\n" for n in names).encode())
    return cpio.finish()


def _busybox_fingerprint(kernel: Path, busybox: Path) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(["foreign-busybox:1", BUSYBOX_APPEND, BUSYBOX_MODULES, BUSYBOX_INIT,
                         UDHCPC_SCRIPT, BUSYBOX_INDEX]).encode())
    for p in (kernel, busybox):
        h.update(_stat_key(p).encode())
    return h.hexdigest()[:16]


def busybox_image(images_dir: Path = IMAGES) -> GuestImage:
    """Return the busybox guest from *images_dir*/foreign-busybox, building
    it first if it is missing or stale (a second or so; no root needed
    beyond reading the kernel)."""
    kernel, version = host_kernel()
    busybox = host_busybox()
    d = images_dir / "foreign-busybox"
    fp = _busybox_fingerprint(kernel, busybox)
    data = _read_manifest(d, fp)
    if data is None:
        with build_lock(d):
            data = _read_manifest(d, fp)
            if data is None:
                t0 = time.monotonic()
                shutil.copyfile(kernel, d / "vmlinuz.new")
                write_file(d / "initrd.cpio.new", build_busybox_initrd(busybox, version))
                os.replace(d / "vmlinuz.new", d / "vmlinuz")
                os.replace(d / "initrd.cpio.new", d / "initrd.cpio")
                data = {"fingerprint": fp, "kernel_version": version,
                        "files": ["vmlinuz", "initrd.cpio"],
                        "initrd_bytes": (d / "initrd.cpio").stat().st_size,
                        "build_seconds": round(time.monotonic() - t0, 1),
                        "built": time.time()}
                write_file(d / "manifest.json", json.dumps(data, indent=2).encode())
    return GuestImage(name="busybox", kernel=str(d / "vmlinuz"), initrd=str(d / "initrd.cpio"),
                      append=BUSYBOX_APPEND, kernel_version=data["kernel_version"])


# -- fixtures ---------------------------------------------------------------------------
@pytest.fixture(scope="session")
def foreign_debian() -> ForeignDebian:
    """The Debian pair from the persistent cache (built there if missing and
    the session runs as root; skipped otherwise)."""
    try:
        imgs = foreign_debian_images(IMAGES, build=os.geteuid() == 0)
    except SetupError as exc:
        pytest.skip(f"no foreign Debian images: {exc}")
    m = imgs.manifest
    print(f"\n[foreign Debian images: built in {m['build_seconds']} s (debootstrap "
          f"{m['debootstrap_seconds']} s, plain {m['plain_seconds']} s, bootable "
          f"{m['bootable_seconds']} s); plain {m['plain_bytes'] / 1e6:.0f} MB, bootable "
          f"{m['bootable_bytes'] / 1e6:.0f} MB qcow2]")
    return imgs


@pytest.fixture(scope="session")
def plain_debian(foreign_debian: ForeignDebian) -> DiskImage:
    """The plain Debian guest: ``kernel``, ``initrd``, ``append``
    (:data:`PLAIN_APPEND`) and ``disk`` (a read-only qcow2 base; give VMs an
    overlay). Ready line on ttyS0: :data:`DEBIAN_READY`."""
    return foreign_debian.plain


@pytest.fixture(scope="session")
def bootable_debian(foreign_debian: ForeignDebian) -> str:
    """Path of the bootable Debian disk (a read-only qcow2 base), booted by
    QEMU with no ``-kernel``. Ready line on ttyS0: :data:`DEBIAN_READY`."""
    return foreign_debian.bootable


@pytest.fixture(scope="session")
def busybox_initrd() -> GuestImage:
    """The busybox guest with no agent: ``kernel``, ``initrd``, ``append``.
    Ready line on the console: :data:`BUSYBOX_READY`."""
    try:
        img = busybox_image(IMAGES)
    except SetupError as exc:
        pytest.skip(f"no busybox test image: {exc}")
    data = json.loads((Path(img.initrd).parent / "manifest.json").read_text())
    print(f"\n[busybox test image: built in {data['build_seconds']} s, initrd "
          f"{data['initrd_bytes'] / 1e6:.1f} MB]")
    return img


__all__ = [
    "BOOT_APPEND", "BUSYBOX_APPEND", "BUSYBOX_HTTP_PORT", "BUSYBOX_READY", "BUSYBOX_READY_RE",
    "DEBIAN_READY", "DEBIAN_READY_RE", "PLAIN_APPEND", "ForeignDebian", "bootable_debian",
    "busybox_image", "busybox_initrd", "foreign_debian", "foreign_debian_images",
    "plain_debian",
]
