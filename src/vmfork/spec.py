"""Pure description of a VM and its translation into a QEMU command line.

Owns :class:`VMSpec` (and its parts), name and size validation, and
:func:`build_argv`. Nothing here touches the file system or starts processes,
so it is unit-tested without QEMU.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

from vmfork.errors import InvalidInput
from vmfork.names import check_name

MIB = 1024 * 1024
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGT]?)(i?B)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": MIB, "K": 1024, "M": MIB, "G": 1024 * MIB, "T": 1024 * 1024 * MIB}
MIN_MEMORY_MIB = 64
MAX_MEMORY_MIB = 1024 * 1024

#: CPU model: named and stable (migrates between QEMU binaries) with RDRAND, so
#: the guest RNG initialises early and a VM generation ID change reseeds it.
DEFAULT_CPU = "qemu64,+rdrand"
DEFAULT_MACHINE = "q35"


def parse_size(text: str | int) -> int:
    """Parse a size such as ``256M``, ``1G``, ``1GiB``, ``512`` (MiB) or ``4096B``
    (bytes) into bytes."""
    if isinstance(text, int):
        return text * MIB
    m = _SIZE_RE.match(text)
    if not m:
        raise InvalidInput(f"invalid size {text!r}: use a number with K, M, G or T, e.g. 512M")
    if not m.group(2) and m.group(3):  # a bare "B" means bytes, not MiB
        return int(m.group(1))
    return int(m.group(1)) * _SIZE_UNITS[m.group(2).upper()]


def parse_memory(text: str | int) -> int:
    """Parse a guest memory size and return it in MiB (whole MiB, within limits)."""
    size = parse_size(text)
    if size % MIB:
        raise InvalidInput(f"invalid memory size {text!r}: must be a whole number of MiB")
    mib = size // MIB
    if not MIN_MEMORY_MIB <= mib <= MAX_MEMORY_MIB:
        raise InvalidInput(
            f"invalid memory size {text!r}: must be between {MIN_MEMORY_MIB}M and "
            f"{MAX_MEMORY_MIB // 1024}G")
    return mib


def parse_memory_list(text: str) -> tuple[int, ...]:
    """Parse ``256M,1G,4G`` into MiB values; at least one is required."""
    sizes = tuple(parse_memory(x.strip()) for x in text.split(",") if x.strip())
    if not sizes:
        raise InvalidInput(f"invalid size list {text!r}: use e.g. 256M,1G")
    return sizes


def new_guid() -> str:
    """A random UUID (a VM generation ID)."""
    import uuid  # here: imported only when a spec is made, not when one is read

    return str(uuid.uuid4())


def new_mac() -> str:
    """A random locally administered unicast MAC in QEMU's 52:54:00 style."""
    b = os.urandom(16)
    return "52:54:" + ":".join(f"{x:02x}" for x in b[:4])


@dataclass(frozen=True)
class MemorySpec:
    """Where guest RAM lives.

    ``file``: a named file (``path``) mapped ``share`` on or off; ``readonly``
    opens the file read-only and maps it privately writable (copy-on-write),
    which is how clones map a template. ``memfd``: an anonymous memfd, always
    shared (used with cpr-transfer).
    """

    backend: Literal["file", "memfd"] = "file"
    path: str | None = None
    share: bool = True
    readonly: bool = False

    def qemu_object(self, size_mib: int) -> str:
        if self.backend == "memfd":
            return f"memory-backend-memfd,id=mem0,size={size_mib}M,share=on"
        if not self.path:
            raise InvalidInput("a file memory backend needs a path")
        opts = [f"memory-backend-file,id=mem0,size={size_mib}M",
                f"mem-path={_qemu_escape(self.path)}",
                f"share={'on' if self.share else 'off'}"]
        if self.readonly:
            opts.append("readonly=on,rom=off")
        return ",".join(opts)


@dataclass(frozen=True)
class DiskSpec:
    """A disk image attached as virtio-blk."""

    path: str
    format: str = "qcow2"
    readonly: bool = False
    #: For an overlay: the image it is backed by (never written) and its
    #: format. The overlay at ``path`` is created before QEMU starts.
    backing: str | None = None
    backing_format: str | None = None


@dataclass(frozen=True)
class NetSpec:
    """User-mode networking with one virtio-net NIC."""

    mac: str
    ports: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True)
class VMSpec:
    """Everything needed to start one QEMU process for a VM."""

    name: str
    memory_mib: int
    memory: MemorySpec
    cpus: int = 1
    kernel: str | None = None
    initrd: str | None = None
    append: str = ""
    disks: tuple[DiskSpec, ...] = ()
    net: NetSpec | None = None
    accel: str = "tcg"
    machine: str = DEFAULT_MACHINE
    cpu: str = DEFAULT_CPU
    aux_ram_share: bool = True
    vmgenid: str = field(default_factory=new_guid)
    qemu: str = "qemu-system-x86_64"
    #: Add a virtio-serial port for qemu-guest-agent (socket ``RunPaths.qga``).
    qga: bool = False

    def __post_init__(self) -> None:
        check_name(self.name)
        if not MIN_MEMORY_MIB <= self.memory_mib <= MAX_MEMORY_MIB:
            raise InvalidInput(f"invalid memory size {self.memory_mib}M")
        if not 1 <= self.cpus <= 64:
            raise InvalidInput(f"invalid cpu count {self.cpus}: must be 1-64")
        if not self.kernel and not self.disks:
            raise InvalidInput("a VM needs a kernel or a disk to boot from")
        if self.accel not in ("kvm", "tcg"):
            raise InvalidInput(f"invalid accelerator {self.accel!r}: resolve 'auto' first")

    def with_(self, **changes: Any) -> VMSpec:
        """A copy with *changes* applied (dataclasses.replace)."""
        return replace(self, **changes)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VMSpec:
        d = dict(d)
        d["memory"] = MemorySpec(**d["memory"])
        d["disks"] = tuple(DiskSpec(**x) for x in d.get("disks", ()))
        if d.get("net"):
            n = d["net"]
            d["net"] = NetSpec(mac=n["mac"], ports=tuple(tuple(p) for p in n.get("ports", ())))
        return cls(**d)

    @classmethod
    def from_json(cls, text: str) -> VMSpec:
        return cls.from_dict(json.loads(text))


@dataclass(frozen=True)
class RunPaths:
    """Host-side endpoints of one QEMU process."""

    qmp: str
    console: str
    console_log: str
    agent: str
    qga: str = ""


def _qemu_escape(value: str) -> str:
    """Escape a value for QEMU's comma-separated option syntax."""
    return value.replace(",", ",,")


def build_argv(spec: VMSpec, paths: RunPaths, incoming: tuple[str, ...] = (),
               start_paused: bool = True) -> list[str]:
    """Translate *spec* into a QEMU argv.

    *incoming* adds ``-incoming`` arguments (``defer``, a URI, or a JSON
    channel). With *start_paused* QEMU waits for ``cont`` (``-S``), so the
    caller can attach to the console before the guest runs.
    """
    machine = f"{spec.machine},memory-backend=mem0"
    if spec.aux_ram_share:
        machine += ",aux-ram-share=on"
    accel = "tcg,tb-size=64" if spec.accel == "tcg" else "kvm"
    argv = [
        spec.qemu, "-name", f"{spec.name},debug-threads=on",
        "-nodefaults", "-no-user-config", "-nographic",
        "-machine", machine,
        "-accel", accel,
        "-cpu", "host" if spec.accel == "kvm" else spec.cpu,
        "-smp", str(spec.cpus),
        "-m", f"{spec.memory_mib}M",
        "-object", spec.memory.qemu_object(spec.memory_mib),
        # No announce rounds after a state is loaded. On a user-mode network
        # there is nobody to announce to, and the announce makes a virtio-net
        # guest run its config work (netdev_notify_peers, which takes RTNL):
        # a Linux guest (seen with 6.18) deadlocks if that work waits for RTNL
        # while `ip link set down` holds it and waits for the work
        # (virtnet_close -> cancel_work_sync), and a clone's identity takes
        # the link down about a second after the load.
        "-global", "migration.announce-rounds=0",
        "-qmp", f"unix:{_qemu_escape(paths.qmp)},server=on,wait=off",
        "-chardev", (f"socket,id=con0,path={_qemu_escape(paths.console)},server=on,wait=off,"
                     f"logfile={_qemu_escape(paths.console_log)},logappend=on"),
        "-serial", "chardev:con0",
        "-device", "virtio-serial-pci,id=vser0",
        "-chardev", f"socket,id=agent0,path={_qemu_escape(paths.agent)},server=on,wait=off",
        "-device", "virtconsole,chardev=agent0,id=agent0port",
        "-device", f"vmgenid,id=vmgenid0,guid={spec.vmgenid}",
        "-device", "virtio-rng-pci,id=rng0",
    ]
    if spec.kernel:
        argv += ["-kernel", spec.kernel]
        if spec.initrd:
            argv += ["-initrd", spec.initrd]
        if spec.append:
            argv += ["-append", spec.append]
    if spec.qga:
        if not paths.qga:
            raise InvalidInput("a VM with qga needs a socket path for the guest agent")
        argv += ["-chardev", f"socket,id=qga0,path={_qemu_escape(paths.qga)},server=on,wait=off",
                 "-device", "virtserialport,bus=vser0.0,chardev=qga0,id=qga0port,"
                            "name=org.qemu.guest_agent.0"]
    for i, disk in enumerate(spec.disks):
        ro = ",read-only=on" if disk.readonly else ""
        argv += ["-blockdev",
                 f"driver=file,filename={_qemu_escape(disk.path)},node-name=file{i}{ro}",
                 "-blockdev", f"driver={disk.format},file=file{i},node-name=disk{i}{ro}",
                 "-device", f"virtio-blk-pci,drive=disk{i},id=vblk{i}"]
    if spec.net:
        fwd = "".join(f",hostfwd=tcp:127.0.0.1:{h}-:{g}" for h, g in spec.net.ports)
        argv += ["-netdev", f"user,id=net0{fwd}",
                 "-device", f"virtio-net-pci,netdev=net0,mac={spec.net.mac},id=nic0"]
    if start_paused:
        argv.append("-S")
    for inc in incoming:
        argv += ["-incoming", inc]
    return argv
