"""Guest images: a Debian bookworm disk image built with debootstrap.

Owns the recipe of the Debian guest (minbase plus systemd, udev, iproute2,
kmod, dbus, busybox and qemu-guest-agent), the files vmfork adds to it
(DHCP on the NIC with systemd-networkd, an autologin root shell on ttyS0, the
serial agent on /dev/hvc0, and a unit that prints the readiness marker on
ttyS0 once multi-user.target is reached), the boot pair (the host's Debian
kernel and an initramfs that can mount a virtio-blk root), and the cache under
``$VMFORK_HOME/images/debian`` keyed by a fingerprint of all of that.

Packages come only from the machine's own Debian mirror, read from its apt
sources (:func:`debian_mirror`); the mirror is never written into the image
or the manifest. Building needs root (debootstrap, chroot) and about a
minute or two; the result is a qcow2 of a few hundred MB that VMs use as the
read-only base of their own overlays.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from vmfork.errors import InvalidInput, SetupError
from vmfork.images.demo import GuestImage, _guest_file, host_kernel
from vmfork.private import FILE_MODE, READONLY_MODE, make_dirs, opener, write_file
from vmfork.spec import parse_size

log = logging.getLogger("vmfork.image")

SUITE = "bookworm"
#: What the guest gets on top of debootstrap's minbase variant.
PACKAGES = ("systemd", "systemd-sysv", "udev", "kmod", "iproute2", "dbus",
            "qemu-guest-agent", "busybox")
#: ``net.ifnames=0`` keeps the NIC named eth0, as on the demo guest.
DEBIAN_APPEND = "console=ttyS0 root=/dev/vda rw net.ifnames=0 loglevel=4 panic=-1"
DEFAULT_SIZE = "2G"
#: Initramfs modules needed to mount the root file system.
ROOT_MODULES = ("virtio_blk", "virtio_pci")
#: Units masked in the image: timers that wake a small VM for nothing, a
#: first-boot wizard that would wait for input on the console, and the getty
#: systemd starts on a hypervisor console (hvc0 is the vmfork agent's).
MASKED_UNITS = ("apt-daily.timer", "apt-daily-upgrade.timer", "e2scrub_all.timer",
                "e2scrub_reap.service", "fstrim.timer", "systemd-firstboot.service",
                "serial-getty@hvc0.service", "getty@tty1.service")
ENABLED_UNITS = ("systemd-networkd.service", "vmfork-agent.service", "vmfork-ready.service")

#: Files written into the root file system (path -> (mode, text)).
GUEST_FILES: dict[str, tuple[int, str]] = {
    "etc/hostname": (0o644, "vmfork\n"),
    "etc/hosts": (0o644, "127.0.0.1\tlocalhost\n127.0.1.1\tvmfork\n"
                         "::1\t\tlocalhost ip6-localhost ip6-loopback\n"),
    "etc/fstab": (0o644, "/dev/vda\t/\text4\tdefaults\t0\t0\n"),
    "etc/apt/sources.list": (0o644, "# Add the Debian mirror you use, e.g.\n"
                                    "# deb <mirror>/debian bookworm main\n"),
    "etc/dpkg/dpkg.cfg.d/90-vmfork-nodoc": (0o644, "path-exclude=/usr/share/doc/*\n"
                                                   "path-exclude=/usr/share/man/*\n"
                                                   "path-exclude=/usr/share/locale/*\n"),
    # Nested virtualisation is no use in a vmfork guest, and loading kvm_amd
    # (the emulated CPU has SVM) cost boot time under TCG.
    "etc/modprobe.d/vmfork.conf": (0o644, "blacklist kvm_amd\nblacklist kvm_intel\n"),
    "etc/systemd/network/80-vmfork.network": (0o644, "[Match]\nName=eth* en*\n\n"
                                                     "[Network]\nDHCP=yes\n"),
    "etc/systemd/system/serial-getty@ttyS0.service.d/autologin.conf": (0o644, (
        "[Service]\nExecStart=\n"
        "ExecStart=-/sbin/agetty --autologin root --noclear --keep-baud "
        "115200,57600,38400,9600 %I $TERM\n")),
    "etc/systemd/system/vmfork-agent.service": (0o644, (
        "[Unit]\nDescription=vmfork serial agent on /dev/hvc0\n"
        "ConditionPathExists=/dev/hvc0\n\n"
        "[Service]\nExecStart=/usr/local/sbin/vmfork-agent /dev/hvc0\n"
        "Restart=always\nRestartSec=1\n\n"
        "[Install]\nWantedBy=multi-user.target\n")),
    # Ordered after multi-user.target (which wants it): the marker means
    # "multi-user reached", and the agent has been started by then.
    "etc/systemd/system/vmfork-ready.service": (0o644, (
        "[Unit]\nDescription=Print the vmfork readiness marker on ttyS0\n"
        "After=multi-user.target vmfork-agent.service\n\n"
        "[Service]\nType=oneshot\nExecStart=/usr/local/sbin/vmfork-ready\n\n"
        "[Install]\nWantedBy=multi-user.target\n")),
    # multi-user.target does not wait for udev to load its modules nor for
    # DHCP. Wait (at most 60 s) until udev has handled every device (its
    # workers were still probing AHCI, loading kvm_amd etc. when multi-user
    # was reached; a template saved then carried that work into every clone),
    # then, with a virtio NIC present, (at most 30 s) for an IPv4 address, so
    # that a ready guest is quiet and reachable (port forwards work).
    "usr/local/sbin/vmfork-ready": (0o755, """#!/bin/sh
# Print the vmfork readiness marker on ttyS0 (see vmfork-ready.service).
udevadm settle --timeout=60 || echo "vmfork-ready: udev did not settle" >&2
nic=
for d in /sys/bus/pci/devices/*; do
    [ "$(cat "$d/vendor")" = 0x1af4 ] || continue
    case "$(cat "$d/device")" in 0x1000|0x1041) nic=1 ;; esac
done
i=0
while [ -n "$nic" ] && [ $i -lt 300 ] && ! ip -4 -o addr show scope global | grep -q inet; do
    sleep 0.1
    i=$((i + 1))
done
echo "VMFORK-READY $(cat /proc/uptime)" > /dev/ttyS0
"""),
}


@dataclass(frozen=True)
class DiskImage(GuestImage):
    """A guest that boots from a disk: a base image plus its kernel pair."""

    disk: str
    disk_format: str

    def to_dict(self) -> dict[str, str]:
        return {**super().to_dict(), "disk": self.disk, "disk_format": self.disk_format}


# -- the machine's Debian mirror ------------------------------------------------
def _deb822_uris(text: str, suite: str) -> Iterator[str]:
    for stanza in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        for line in stanza.splitlines():
            if line.startswith("#") or ":" not in line:
                continue
            key, _, value = line.partition(":")
            fields[key.strip().lower()] = value.strip()
        if fields.get("enabled", "yes").lower() == "no":
            continue
        if "deb" not in fields.get("types", "").split():
            continue
        if suite in fields.get("suites", "").split() and fields.get("uris"):
            yield fields["uris"].split()[0]


def _one_line_uris(text: str, suite: str) -> Iterator[str]:
    for line in text.splitlines():
        words = line.split("#", 1)[0].split()
        if not words or words[0] != "deb":
            continue
        words = words[1:]
        if words and words[0].startswith("["):
            while words and not words[0].endswith("]"):
                words = words[1:]
            words = words[1:]
        if len(words) >= 2 and words[1] == suite:
            yield words[0]


def debian_mirror(apt_dir: Path = Path("/etc/apt"), suite: str = SUITE) -> str:
    """The URI of the machine's Debian mirror: the first enabled apt source
    that carries *suite* (deb822 ``.sources`` files first, then ``.list``)."""
    env = os.environ.get("VMFORK_DEBIAN_MIRROR")
    if env:
        return env
    for f in sorted((apt_dir / "sources.list.d").glob("*.sources")):
        for uri in _deb822_uris(f.read_text(errors="replace"), suite):
            return uri
    lists = [apt_dir / "sources.list", *sorted((apt_dir / "sources.list.d").glob("*.list"))]
    for f in lists:
        if f.is_file():
            for uri in _one_line_uris(f.read_text(errors="replace"), suite):
                return uri
    raise SetupError(f"no Debian {suite} entry in the apt sources under {apt_dir}: "
                     "cannot tell where to get packages (set VMFORK_DEBIAN_MIRROR)")


# -- kernel and initramfs ----------------------------------------------------------
def initrd_modules(initrd: Path) -> set[str]:
    """Names of the kernel modules packed in *initrd* (via lsinitramfs)."""
    if shutil.which("lsinitramfs") is None:
        return set()
    p = subprocess.run(["lsinitramfs", str(initrd)], capture_output=True, text=True)
    if p.returncode != 0:
        return set()
    return {Path(line).name.split(".ko")[0] for line in p.stdout.splitlines()
            if ".ko" in Path(line).name}


def host_initrd(version: str) -> Path | None:
    p = Path("/boot") / f"initrd.img-{version}"
    return p if p.is_file() else None


def make_initrd(version: str, out: Path) -> None:
    """Build a lean initramfs for *version* (MODULES=list: just the root
    modules) from a private copy of the host's initramfs-tools configuration.

    It is less than half the size of the host's MODULES=most one, which cuts
    several seconds of unpacking and probing from every boot under TCG."""
    with tempfile.TemporaryDirectory(prefix="vmfork-initramfs-") as tmp:
        conf = Path(tmp) / "conf"
        if Path("/etc/initramfs-tools").is_dir():
            shutil.copytree("/etc/initramfs-tools", conf, symlinks=True)
        conf.mkdir(exist_ok=True)
        cfg = conf / "initramfs.conf"
        text = cfg.read_text() if cfg.exists() else ""
        text = re.sub(r"(?m)^MODULES=.*$", "", text) + "\nMODULES=list\n"
        cfg.write_text(text)
        with open(conf / "modules", "a") as f:
            f.write("\n" + "\n".join(ROOT_MODULES) + "\n")
        run_step(["mkinitramfs", "-d", str(conf), "-o", str(out), version], "mkinitramfs")


# -- building --------------------------------------------------------------------
def run_step(argv: list[str], what: str, log_file: Path | None = None,
             env: dict[str, str] | None = None) -> None:
    """Run a build step; on failure raise SetupError with the end of its output."""
    p = subprocess.run(argv, capture_output=True, text=True, env=env,
                       stdin=subprocess.DEVNULL)
    if log_file is not None:
        with open(log_file, "a") as f:
            f.write(f"$ {argv[0]} ...\n{p.stdout}{p.stderr}")
    if p.returncode != 0:
        tail = " | ".join((p.stdout + p.stderr).strip().splitlines()[-5:])
        raise SetupError(f"{what} failed (exit status {p.returncode}): {tail}")


def _check_tools() -> None:
    if os.geteuid() != 0:
        raise SetupError("building the Debian image needs root (debootstrap, chroot): "
                         "run 'sudo vmfork image debian' once; VMs then use the cached image")
    missing = [t for t in ("debootstrap", "chroot", "mkfs.ext4", "qemu-img")
               if shutil.which(t) is None]
    if missing:
        raise SetupError(f"missing {', '.join(missing)}: run scripts/setup-system.sh")


def debootstrap(root: Path, packages: tuple[str, ...], mirror: str,
                log_file: Path | None = None) -> None:
    """Install Debian ``SUITE`` (minbase variant plus *packages*) into *root*
    from *mirror*. debootstrap writes the mirror into the tree's
    ``etc/apt/sources.list``: callers overwrite that file."""
    run_step(["debootstrap", "--variant=minbase", f"--include={','.join(packages)}",
              SUITE, str(root), mirror], "debootstrap", log_file)


def root_initrd(version: str, initrd_src: Path | None, out: Path) -> None:
    """Write to *out* an initramfs for kernel *version* that can mount a
    virtio-blk root: a lean one made with mkinitramfs, or without it the
    host's (*initrd_src*) if that holds virtio_blk."""
    if shutil.which("mkinitramfs") is not None:
        log.info("initramfs: mkinitramfs (MODULES=list: %s)", ", ".join(ROOT_MODULES))
        make_initrd(version, out)
    elif initrd_src is not None and set(ROOT_MODULES[:1]) <= initrd_modules(initrd_src):
        shutil.copyfile(initrd_src, out)
    else:
        raise SetupError("no initramfs that can mount a virtio-blk root: install "
                         "initramfs-tools (scripts/setup-system.sh)")


def configure_rootfs(root: Path, kernel_version: str) -> None:
    """Turn a fresh debootstrap tree into the vmfork Debian guest."""
    for rel, (mode, text) in GUEST_FILES.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
        p.chmod(mode)
    agent = root / "usr/local/sbin/vmfork-agent"
    agent.parent.mkdir(parents=True, exist_ok=True)
    agent.write_bytes(_guest_file("agent"))
    agent.chmod(0o755)
    # Each boot of a fresh image makes its own machine-id (empty file = unset).
    (root / "etc/machine-id").write_text("")
    with contextlib.suppress(FileNotFoundError):
        (root / "var/lib/dbus/machine-id").unlink()
    copy_host_modules(root, kernel_version)
    run_step(["chroot", str(root), "systemctl", "enable", *ENABLED_UNITS], "systemctl enable")
    run_step(["chroot", str(root), "systemctl", "mask", *MASKED_UNITS], "systemctl mask")
    run_step(["chroot", str(root), "passwd", "-d", "root"], "passwd -d root")
    slim_rootfs(root)


def copy_host_modules(root: Path, kernel_version: str) -> None:
    """Copy the host kernel's modules into *root*, for the guest's udev to
    load virtio_net, virtio_rng etc. when it boots that kernel."""
    mods = Path("/lib/modules") / kernel_version
    if mods.is_dir():
        dest = root / "lib/modules" / kernel_version
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(mods, dest, symlinks=True)


def slim_rootfs(root: Path) -> None:
    """Empty what a built root file system need not carry: package lists,
    downloaded .debs, docs, man pages, locales (dpkg is told to skip the last
    three too) and logs."""
    for rel in ("var/cache/apt", "var/lib/apt/lists", "usr/share/doc", "usr/share/man",
                "usr/share/locale"):
        d = root / rel
        if d.is_dir():
            for child in d.iterdir():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()
    (root / "var/lib/apt/lists/partial").mkdir(parents=True, exist_ok=True)
    for f in (root / "var/log").rglob("*"):
        if f.is_file():
            f.write_bytes(b"")


def _fingerprint(kernel: Path, initrd: Path | None) -> str:
    """What the image depends on, apart from its size: the recipe, the agent
    and the host kernel and initramfs it boots with (and whose modules it holds)."""
    h = hashlib.sha256()
    h.update(json.dumps(["initrd:list", SUITE, PACKAGES, DEBIAN_APPEND, ROOT_MODULES, MASKED_UNITS,
                         ENABLED_UNITS, sorted(GUEST_FILES.items())]).encode())
    h.update(_guest_file("agent"))
    for p in (kernel, initrd):
        if p is not None:
            st = p.stat()
            h.update(f"{p}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


@contextlib.contextmanager
def build_lock(d: Path) -> Iterator[None]:
    """Hold the build lock of image directory *d* (created if missing), so
    that two processes never build the same image at once."""
    make_dirs(d)
    with open(d / ".lock", "w", opener=opener) as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _cached(d: Path, fp: str, size: int | None) -> DiskImage | None:
    manifest = d / "manifest.json"
    if not manifest.exists():
        return None
    try:
        data = json.loads(manifest.read_text())
        img = DiskImage(name="debian", kernel=data["kernel"], initrd=data["initrd"],
                        append=data["append"], kernel_version=data["kernel_version"],
                        disk=data["disk"], disk_format=data["disk_format"])
    except (ValueError, KeyError):
        return None
    if data.get("fingerprint") != fp or (size is not None and data.get("size") != size):
        return None
    if not all(Path(p).is_file() for p in (img.kernel, img.initrd, img.disk)):
        return None
    return img


def debian_image(images_dir: Path, size: str | int | None = None, rebuild: bool = False,
                 build: bool = True) -> DiskImage:
    """Return the Debian guest, building it first if it is missing or stale.

    *size* is the disk size (default: whatever the cached image has, else
    ``DEFAULT_SIZE``); a different size rebuilds. With *build* False a missing
    or stale image raises SetupError instead of building.
    """
    want = parse_size(size) if size is not None else None
    if want is not None and want < 512 * 1024 * 1024:
        raise InvalidInput(f"image size {size!r} is too small: use at least 512M")
    kernel, version = host_kernel()
    initrd_src = host_initrd(version)
    d = images_dir / "debian"
    fp = _fingerprint(kernel, initrd_src)
    if not rebuild:
        img = _cached(d, fp, want)
        if img is not None:
            return img
    if not build:
        raise SetupError("the Debian image is not built (or is stale): run "
                         "'sudo vmfork image debian'")
    with build_lock(d):
        if not rebuild:  # someone else may have built it while we waited
            img = _cached(d, fp, want)
            if img is not None:
                return img
        return _build(d, kernel, version, initrd_src, want or parse_size(DEFAULT_SIZE), fp)


def _build(d: Path, kernel: Path, version: str, initrd_src: Path | None, size: int,
           fp: str) -> DiskImage:
    _check_tools()
    mirror = debian_mirror()
    t0 = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=d))
    build_log = tmp / "build.log"
    try:
        root = tmp / "rootfs"
        log.info("debian image: debootstrap %s (minbase + %d packages)", SUITE, len(PACKAGES))
        debootstrap(root, PACKAGES, mirror, build_log)
        configure_rootfs(root, version)
        # Boot pair: the host kernel and a lean initramfs made for it; without
        # mkinitramfs, the host's initramfs if it can mount a virtio-blk root.
        shutil.copyfile(kernel, tmp / "vmlinuz")
        root_initrd(version, initrd_src, tmp / "initrd.img")
        raw = tmp / "root.img"
        log.info("debian image: mkfs.ext4 -d (%d MiB) and qemu-img convert", size >> 20)
        run_step(["mkfs.ext4", "-q", "-F", "-L", "vmfork-root", "-d", str(root), str(raw),
                  f"{size // 1024}k"], "mkfs.ext4", build_log)
        shutil.rmtree(root)
        run_step(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw),
                  str(tmp / "base.qcow2")], "qemu-img convert", build_log)
        raw.unlink()
        for name in ("base.qcow2", "vmlinuz", "initrd.img"):
            os.replace(tmp / name, d / name)
            (d / name).chmod(READONLY_MODE if name == "base.qcow2" else FILE_MODE)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    img = DiskImage(name="debian", kernel=str(d / "vmlinuz"), initrd=str(d / "initrd.img"),
                    append=DEBIAN_APPEND, kernel_version=version, disk=str(d / "base.qcow2"),
                    disk_format="qcow2")
    seconds = round(time.monotonic() - t0, 1)
    disk_bytes = (d / "base.qcow2").stat().st_size
    manifest = {**img.to_dict(), "fingerprint": fp, "suite": SUITE,
                "packages": list(PACKAGES), "size": size, "disk_bytes": disk_bytes,
                "build_seconds": seconds, "built": time.time()}
    write_file(d / "manifest.json", json.dumps(manifest, indent=2).encode())
    log.info("debian image: built in %.0f s (%d MB)", seconds, disk_bytes >> 20)
    return img
