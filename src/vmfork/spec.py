"""Pure description of a VM and its translation into a QEMU command line.

Owns :class:`VMSpec` (and its parts), name and size validation, and
:func:`build_argv`. Nothing here touches the file system or starts processes,
so it is unit-tested without QEMU.

A spec may come from the CLI, the API, the catalog, a template manifest or a
snapshot file someone else wrote, so every spec checks itself when it is made
(``__post_init__``): each field has its type, strings are bounded and free of
control characters, and every value that ends up inside a comma-separated
QEMU option (MAC, ports, machine type, CPU model, disk format, vmgenid) has a
strict pattern. :func:`build_argv` escapes (``,`` -> ``,,``) every such value
that may contain a comma, so a value can never add an option of its own.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
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
#: The QEMU binary a spec runs unless told otherwise; the only one an
#: imported snapshot runs.
DEFAULT_QEMU = "qemu-system-x86_64"

#: Longest path, kernel command line and QEMU binary name a spec holds.
MAX_PATH = 4096
MAX_APPEND = 4096
MAX_DISKS = 16
MAX_PORTS = 64
DISK_FORMATS = ("qcow2", "raw")
_MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$", re.IGNORECASE)
#: A machine type: QEMU's names are letters, digits, '.', '_' and '-'.
MACHINE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
#: A CPU model and its comma-separated features (``qemu64,+rdrand,-x2apic,
#: model-id=x``): the commas are QEMU's syntax here, so the parts are strict.
_CPU_PART = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"
CPU_RE = re.compile(rf"^{_CPU_PART}(,[+-]?{_CPU_PART}(={_CPU_PART})?){{0,32}}$")
_UUID_RE = re.compile(r"^[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}$", re.IGNORECASE)
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")


def _show(value: object) -> str:
    """*value* for an error message: repr, cut short (one line, bounded)."""
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:77]}..."


def _need(value: object, types: type | tuple[type, ...], what: str) -> None:
    """Raise InvalidInput unless *value* is of *types* (a bool is no int)."""
    if not isinstance(value, types) or (isinstance(value, bool) and types is int):
        raise InvalidInput(f"invalid {what} {_show(value)}: wrong type")


def _text(value: object, what: str, limit: int = MAX_PATH, optional: bool = False) -> None:
    """Raise InvalidInput unless *value* is a string of at most *limit*
    characters without control characters (or None if *optional*)."""
    if value is None and optional:
        return
    _need(value, str, what)
    assert isinstance(value, str)
    if len(value) > limit:
        raise InvalidInput(f"invalid {what} {_show(value)}: longer than {limit} characters")
    if _CONTROL_RE.search(value):
        raise InvalidInput(f"invalid {what} {_show(value)}: it has control characters")


def _bool(value: object, what: str) -> None:
    _need(value, bool, what)


def _match(value: object, pattern: re.Pattern[str], what: str) -> None:
    _need(value, str, what)
    assert isinstance(value, str)
    if not pattern.fullmatch(value):
        raise InvalidInput(f"invalid {what} {_show(value)}")


def check_port(value: object) -> int:
    """Return *value* if it is a TCP port (an int 1-65535), else raise InvalidInput."""
    _need(value, int, "port")
    assert isinstance(value, int)
    if not 1 <= value <= 65535:
        raise InvalidInput(f"invalid port {value}: must be 1-65535")
    return value


#: How ``vmfork run`` knows that a guest is ready (:func:`parse_ready`).
READY_KINDS = ("auto", "qga", "console", "tcp", "none")
#: Longest regular expression of ``console:REGEX``.
MAX_READY_REGEX = 256


@dataclass(frozen=True)
class Readiness:
    """A parsed readiness choice: ``auto`` (vmfork's boot marker on the
    console or an answer of qemu-guest-agent, whichever comes first),
    ``qga``, ``console`` (*pattern*, a regular expression over the serial
    console's output), ``tcp`` (*port*, a guest port that accepts a
    connection through a user-mode forward) or ``none`` (QEMU runs)."""

    kind: str
    pattern: str = ""
    port: int = 0

    def __str__(self) -> str:
        if self.kind == "console":
            return f"console:{self.pattern}"
        if self.kind == "tcp":
            return f"tcp:{self.port}"
        return self.kind


def parse_ready(text: object) -> Readiness:
    """Parse ``auto``, ``qga``, ``none``, ``console:REGEX`` or ``tcp:PORT``;
    InvalidInput naming the problem otherwise."""
    _text(text, "readiness", MAX_READY_REGEX + 8)
    assert isinstance(text, str)
    kind, sep, arg = text.partition(":")
    usage = "use auto, qga, none, console:REGEX or tcp:PORT"
    if kind not in READY_KINDS:
        raise InvalidInput(f"invalid readiness {_show(text)}: {usage}")
    if kind in ("auto", "qga", "none"):
        if sep:
            raise InvalidInput(f"invalid readiness {_show(text)}: {kind} takes no argument")
        return Readiness(kind)
    if not arg:
        raise InvalidInput(f"invalid readiness {_show(text)}: {usage}")
    if kind == "tcp":
        if not arg.isdigit():
            raise InvalidInput(f"invalid readiness {_show(text)}: the port must be a number")
        return Readiness(kind, port=check_port(int(arg)))
    try:
        re.compile(arg.encode())
    except re.error as exc:
        raise InvalidInput(f"invalid readiness {_show(text)}: bad regular expression "
                           f"({exc})") from None
    return Readiness(kind, pattern=arg)


def check_mac(value: object) -> str:
    """Return *value* if it is a unicast MAC address (``52:54:00:12:34:56``),
    else raise InvalidInput."""
    _match(value, _MAC_RE, "MAC address")
    assert isinstance(value, str)
    if int(value[:2], 16) & 1:
        raise InvalidInput(f"invalid MAC address {value!r}: a multicast address")
    return value


def _from_fields(cls: type[Any], d: object, what: str) -> dict[str, Any]:
    """*d* as the keyword arguments of dataclass *cls*: a dict whose keys are
    among its fields and hold every field without a default."""
    if not isinstance(d, dict):
        raise InvalidInput(f"invalid {what}: not an object")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(str(k) for k in d if k not in known)
    if unknown:
        raise InvalidInput(f"invalid {what}: unknown key {_show(unknown[0])}")
    missing = [n for n, f in known.items() if n not in d and f.default is MISSING
               and f.default_factory is MISSING]
    if missing:
        raise InvalidInput(f"invalid {what}: {missing[0]!r} is missing")
    return dict(d)


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

    def __post_init__(self) -> None:
        if self.backend not in ("file", "memfd"):
            raise InvalidInput(f"invalid memory backend {_show(self.backend)}")
        _text(self.path, "memory file path", optional=True)
        _bool(self.share, "memory share flag")
        _bool(self.readonly, "memory readonly flag")

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

    def __post_init__(self) -> None:
        _text(self.path, "disk path")
        if self.format not in DISK_FORMATS:
            raise InvalidInput(f"invalid disk format {_show(self.format)}: use qcow2 or raw")
        _bool(self.readonly, "disk readonly flag")
        _text(self.backing, "disk backing image", optional=True)
        if self.backing_format is not None and self.backing_format not in DISK_FORMATS:
            raise InvalidInput(f"invalid disk backing format {_show(self.backing_format)}")


@dataclass(frozen=True)
class NetSpec:
    """User-mode networking with one virtio-net NIC."""

    mac: str
    ports: tuple[tuple[int, int], ...] = ()

    def __post_init__(self) -> None:
        check_mac(self.mac)
        _need(self.ports, tuple, "port forwards")
        if len(self.ports) > MAX_PORTS:
            raise InvalidInput(f"too many port forwards ({len(self.ports)}; at most "
                               f"{MAX_PORTS})")
        for pair in self.ports:
            if not isinstance(pair, tuple) or len(pair) != 2:
                raise InvalidInput(f"invalid port forward {_show(pair)}: use (host, guest)")
            check_port(pair[0])
            check_port(pair[1])


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
    qemu: str = DEFAULT_QEMU
    #: Add a virtio-serial port for qemu-guest-agent (socket ``RunPaths.qga``).
    qga: bool = False
    #: How a boot of this VM is known to be ready (:func:`parse_ready`).
    ready: str = "auto"
    #: The machine's HPET. QEMU's default, and so that of every spec stored
    #: before this field; a VM that vmfork starts has none: an idle guest
    #: with an HPET costs its QEMU about four times the host CPU under TCG
    #: (the clocksource is the TSC either way). Part of the device state: a
    #: clone keeps its template's.
    hpet: bool = True
    #: A guest reboot ends QEMU (``-action reboot=shutdown``) instead of
    #: booting again: a clone's QEMU holds only a stub of the kernel
    #: (:mod:`vmfork.templates.kernel_stub`), which cannot boot.
    reboot_ends: bool = False

    def __post_init__(self) -> None:
        _need(self.name, str, "VM name")
        check_name(self.name)
        _need(self.memory_mib, int, "memory size")
        if not MIN_MEMORY_MIB <= self.memory_mib <= MAX_MEMORY_MIB:
            raise InvalidInput(f"invalid memory size {self.memory_mib}M")
        _need(self.memory, MemorySpec, "memory")
        _need(self.cpus, int, "cpu count")
        if not 1 <= self.cpus <= 64:
            raise InvalidInput(f"invalid cpu count {self.cpus}: must be 1-64")
        _text(self.kernel, "kernel path", optional=True)
        _text(self.initrd, "initrd path", optional=True)
        _text(self.append, "kernel command line", MAX_APPEND)
        _need(self.disks, tuple, "disk list")
        if len(self.disks) > MAX_DISKS:
            raise InvalidInput(f"too many disks ({len(self.disks)}; at most {MAX_DISKS})")
        for disk in self.disks:
            _need(disk, DiskSpec, "disk")
        if self.net is not None:
            _need(self.net, NetSpec, "network")
        if not self.kernel and not self.disks:
            raise InvalidInput("a VM needs a kernel or a disk to boot from")
        if self.accel not in ("kvm", "tcg"):
            raise InvalidInput(f"invalid accelerator {_show(self.accel)}: resolve 'auto' first")
        _match(self.machine, MACHINE_RE, "machine type")
        _match(self.cpu, CPU_RE, "CPU model")
        _bool(self.aux_ram_share, "aux-ram-share flag")
        _match(self.vmgenid, _UUID_RE, "VM generation ID")
        _text(self.qemu, "QEMU binary")
        if not self.qemu:
            raise InvalidInput("invalid QEMU binary '': empty")
        _bool(self.qga, "qga flag")
        parse_ready(self.ready)
        _bool(self.hpet, "hpet flag")
        _bool(self.reboot_ends, "reboot flag")

    def with_(self, **changes: Any) -> VMSpec:
        """A copy with *changes* applied (dataclasses.replace)."""
        return replace(self, **changes)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VMSpec:
        """The spec in *d* (its JSON form); InvalidInput if *d* holds an
        unknown key, lacks one, or has a value of the wrong type or form."""
        d = _from_fields(cls, d, "spec")
        d["memory"] = MemorySpec(**_from_fields(MemorySpec, d["memory"], "memory spec"))
        disks = d.get("disks", ())
        if not isinstance(disks, list | tuple) or len(disks) > MAX_DISKS:
            raise InvalidInput(f"invalid disk list {_show(disks)}")
        d["disks"] = tuple(DiskSpec(**_from_fields(DiskSpec, x, "disk spec")) for x in disks)
        if d.get("net") is not None:
            n = _from_fields(NetSpec, d["net"], "network spec")
            ports = n.get("ports", ())
            if not isinstance(ports, list | tuple) or len(ports) > MAX_PORTS:
                raise InvalidInput(f"invalid port forwards {_show(ports)}")
            n["ports"] = tuple(tuple(p) if isinstance(p, list | tuple) else p for p in ports)
            d["net"] = NetSpec(**n)
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


#: The ring buffer that keeps the serial console's latest output in QEMU, and
#: its size in bytes (QEMU wants a power of two). Each ``ringbuf-read``
#: consumes what it returns.
CONSOLE_RING_ID = "log0"
CONSOLE_RING = 1 << 20


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
    machine = f"{_qemu_escape(spec.machine)},memory-backend=mem0"
    if spec.aux_ram_share:
        machine += ",aux-ram-share=on"
    if not spec.hpet:
        machine += ",hpet=off"
    accel = "tcg,tb-size=64" if spec.accel == "tcg" else "kvm"
    reboot = ["-action", "reboot=shutdown"] if spec.reboot_ends else []
    argv = [
        spec.qemu, "-name", f"{_qemu_escape(spec.name)},debug-threads=on",
        "-nodefaults", "-no-user-config", "-nographic", *reboot,
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
        # The serial console goes to a hub: to the console socket (``vmfork
        # console``, the readiness wait) and to a ring buffer that keeps its
        # last CONSOLE_RING bytes, which vmfork drains into console.log
        # (vmfork.qemu.console_log). No logfile: QEMU would let a guest grow
        # it without limit.
        "-chardev", f"socket,id=con0,path={_qemu_escape(paths.console)},server=on,wait=off",
        "-chardev", f"ringbuf,id={CONSOLE_RING_ID},size={CONSOLE_RING}",
        "-chardev", f"hub,id=serial0,chardevs.0={CONSOLE_RING_ID},chardevs.1=con0",
        "-serial", "chardev:serial0",
        "-device", "virtio-serial-pci,id=vser0",
        "-chardev", f"socket,id=agent0,path={_qemu_escape(paths.agent)},server=on,wait=off",
        "-device", "virtconsole,chardev=agent0,id=agent0port",
        "-device", f"vmgenid,id=vmgenid0,guid={_qemu_escape(spec.vmgenid)}",
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
                 "-blockdev",
                 f"driver={_qemu_escape(disk.format)},file=file{i},node-name=disk{i}{ro}",
                 "-device", f"virtio-blk-pci,drive=disk{i},id=vblk{i}"]
    if spec.net:
        fwd = "".join(f",hostfwd=tcp:127.0.0.1:{check_port(h)}-:{check_port(g)}"
                      for h, g in spec.net.ports)
        argv += ["-netdev", f"user,id=net0{fwd}",
                 "-device",
                 f"virtio-net-pci,netdev=net0,mac={_qemu_escape(spec.net.mac)},id=nic0"]
    if start_paused:
        argv.append("-S")
    for inc in incoming:
        argv += ["-incoming", inc]
    return argv
