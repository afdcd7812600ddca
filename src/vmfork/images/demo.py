"""Guest images: the busybox demo guest, built from the host's Debian kernel.

Owns finding a kernel and busybox on the host, packing an initramfs (cpio
``newc``, written here because nothing on PyPI does it without a C toolchain)
with the init script, the serial agent and the virtio modules, and caching
the result under ``$VMFORK_HOME/images/demo`` keyed by a content hash.
"""

from __future__ import annotations

import hashlib
import io
import json
import lzma
import os
import shutil
import subprocess
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from vmfork.errors import SetupError
from vmfork.private import make_dirs, opener, write_file

DEMO_APPEND = "console=ttyS0 loglevel=4 rdinit=/init panic=-1"
#: Modules the demo guest loads at boot, in dependency order resolved at build.
DEMO_MODULES = ("virtio_net", "virtio_blk", "virtio-rng")
_BUSYBOX = ("/bin/busybox", "/usr/bin/busybox")


@dataclass(frozen=True)
class GuestImage:
    """A bootable kernel + initrd pair and the kernel command line it wants."""

    name: str
    kernel: str
    initrd: str
    append: str
    kernel_version: str

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "kernel": self.kernel, "initrd": self.initrd,
                "append": self.append, "kernel_version": self.kernel_version}


class Cpio:
    """A minimal writer for the cpio ``newc`` format the kernel unpacks."""

    def __init__(self) -> None:
        self._buf = io.BytesIO()
        self._ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"") -> None:
        namez = name.encode() + b"\0"
        hdr = "070701" + "".join(f"{v:08X}" for v in (
            self._ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(namez), 0))
        self._ino += 1
        self._buf.write(hdr.encode() + namez)
        self._pad()
        self._buf.write(data)
        self._pad()

    def _pad(self) -> None:
        self._buf.write(b"\0" * (-self._buf.tell() % 4))

    def dir(self, name: str) -> None:
        self._entry(name, 0o040755)

    def file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        self._entry(name, 0o100000 | perm, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, 0o120777, target.encode())

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return self._buf.getvalue()


def host_kernel() -> tuple[Path, str]:
    """The newest kernel in /boot and its version."""
    kernels = sorted(Path("/boot").glob("vmlinuz-*"), key=lambda p: p.stat().st_mtime)
    if not kernels:
        raise SetupError("no kernel in /boot: install linux-image-cloud-amd64 "
                         "(make demo does it)")
    k = kernels[-1]
    return k, k.name.removeprefix("vmlinuz-")


def host_busybox() -> Path:
    for p in _BUSYBOX:
        if Path(p).is_file():
            out = (subprocess.run(["file", "-L", p], capture_output=True, text=True).stdout
                   if shutil.which("file") else "statically linked")
            if "dynamically" not in out:
                return Path(p)
    raise SetupError("no static busybox: install busybox-static (make demo does it)")


def module_closure(version: str, wanted: tuple[str, ...]) -> list[Path]:
    """Module files for *wanted* and their dependencies, dependencies first."""
    base = Path("/lib/modules") / version
    dep_file = base / "modules.dep"
    if not dep_file.exists():
        return []
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in dep_file.read_text().splitlines():
        mod, _, rest = line.partition(":")
        deps[mod] = rest.split()
        stem = Path(mod).name.split(".ko")[0]
        by_name[stem] = mod
        by_name[stem.replace("-", "_")] = mod
    order: list[str] = []

    def visit(mod: str) -> None:
        for d in reversed(deps.get(mod, [])):
            visit(d)
        if mod not in order:
            order.append(mod)

    for w in wanted:
        found = by_name.get(w) or by_name.get(w.replace("-", "_"))
        if found:
            visit(found)
    return [base / m for m in order]


def module_bytes(path: Path) -> bytes:
    """The contents of module file *path*, uncompressed (for insmod)."""
    data = path.read_bytes()
    if path.suffix == ".xz":
        return lzma.decompress(data)
    if path.suffix == ".zst":
        raise SetupError(f"cannot unpack {path}: zstd-compressed modules are not supported")
    if path.suffix == ".gz":
        import gzip
        return gzip.decompress(data)
    return data


def _guest_file(name: str) -> bytes:
    return resources.files("vmfork.images").joinpath("guestfs").joinpath(name).read_bytes()


def build_demo_initrd(busybox: Path, kernel_version: str) -> bytes:
    """Pack the demo guest's initramfs."""
    cpio = Cpio()
    for d in ("bin", "sbin", "usr", "usr/bin", "usr/sbin", "etc", "proc", "sys", "dev",
              "tmp", "root", "run", "lib", "lib/modules", "var"):
        cpio.dir(d)
    cpio.file("bin/busybox", busybox.read_bytes(), 0o755)
    applets = subprocess.run([str(busybox), "--list-full"], capture_output=True, text=True,
                             check=True).stdout.split()
    for applet in applets:
        if applet != "bin/busybox" and applet.count("/") <= 2:
            cpio.symlink(applet, "/bin/busybox")
    cpio.file("init", _guest_file("init"), 0o755)
    cpio.file("bin/vmfork-agent", _guest_file("agent"), 0o755)
    cpio.file("etc/udhcpc.script", _guest_file("udhcpc.script"), 0o755)
    cpio.file("etc/hostname", b"vmfork\n")
    cpio.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
    cpio.file("etc/group", b"root:x:0:\n")
    cpio.file("etc/profile", b"export PS1='\\h:\\w# '\n")
    names = []
    for mod in module_closure(kernel_version, DEMO_MODULES):
        fname = mod.name.split(".ko")[0] + ".ko"
        cpio.file(f"lib/modules/{fname}", module_bytes(mod))
        names.append(fname)
    cpio.file("etc/vmfork-modules", ("\n".join(names) + "\n").encode())
    return cpio.finish()


def _fingerprint(kernel: Path, busybox: Path) -> str:
    h = hashlib.sha256()
    for p in (kernel, busybox):
        st = p.stat()
        h.update(f"{p}:{st.st_size}:{st.st_mtime_ns}".encode())
    for n in ("init", "agent", "udhcpc.script"):
        h.update(_guest_file(n))
    h.update(DEMO_APPEND.encode() + repr(DEMO_MODULES).encode())
    return h.hexdigest()[:16]


def demo_image(images_dir: Path, rebuild: bool = False) -> GuestImage:
    """Return the demo guest, building it first if it is missing or stale."""
    kernel, version = host_kernel()
    busybox = host_busybox()
    d = images_dir / "demo"
    manifest = d / "manifest.json"
    fp = _fingerprint(kernel, busybox)
    if not rebuild and manifest.exists():
        data = json.loads(manifest.read_text())
        if (data.get("fingerprint") == fp and Path(data["kernel"]).exists()
                and Path(data["initrd"]).exists()):
            return GuestImage("demo", data["kernel"], data["initrd"], data["append"],
                              data["kernel_version"])
    tmp = make_dirs(d / f".build-{os.getpid()}")  # and the image's directory
    try:
        with open(kernel, "rb") as src, open(tmp / "vmlinuz", "wb", opener=opener) as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        write_file(tmp / "initrd.cpio", build_demo_initrd(busybox, version))
        os.replace(tmp / "vmlinuz", d / "vmlinuz")
        os.replace(tmp / "initrd.cpio", d / "initrd.cpio")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    img = GuestImage("demo", str(d / "vmlinuz"), str(d / "initrd.cpio"), DEMO_APPEND, version)
    write_file(manifest, json.dumps({**img.to_dict(), "fingerprint": fp}, indent=2).encode())
    return img
