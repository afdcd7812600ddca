"""The portable snapshot file, and :func:`export`, which writes one.

Owns the file format and the export side:

* **Layout** (format 1): a 64 KiB header (:data:`MAGIC` line, then a JSON
  manifest padded with NULs), the kernel and initrd the VM booted (each at a
  4 KiB-aligned offset), and a QEMU ``mapped-ram`` migration stream (RAM and
  device state; sparse: only non-zero pages take space) at a 1 MiB-aligned
  offset. The manifest gives each part's offset, size and sha256, the VM's
  spec and the QEMU version and machine type that wrote it.
* **Header and hashing**: :func:`read_header`, :func:`check_export` (every
  sha256, holes read as zeros without I/O: :func:`hash_range`) and
  :func:`write_tail` (the blobs and the header written around QEMU's stream).
* **The header is untrusted input** (a snapshot file may come from anyone):
  :meth:`Header.from_dict` holds it to a strict schema — every key known and
  required, every value typed and bounded, blob names among
  :data:`BLOB_NAMES`, sha256 in hex, the spec checked by
  :class:`~vmfork.spec.VMSpec` itself — and :func:`read_header` adds the
  layout: parts 4 KiB-aligned, after the header, inside the file and not
  overlapping. Every refusal is :class:`~vmfork.errors.BadSnapshotFile`.
* **Export**: :func:`export` writes a running, paused or saved VM to one
  file. The file carries no disks: VMs with disks are refused
  (:func:`check_exportable`).

Bringing a file back is :mod:`vmfork.snapshots.imports`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import os
import re
import secrets
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, BinaryIO

from vmfork import checkpoints, vm
from vmfork.errors import (
    AlreadyExists,
    BadSnapshotFile,
    InvalidInput,
    MigrationError,
    StateError,
    VmforkError,
)
from vmfork.files import fsync_path, sha256_file, unlink_quietly
from vmfork.launch import Launch, Transient, attach
from vmfork.listing import LIVE_STATES
from vmfork.names import NAME_RE, check_name
from vmfork.proc import process_alive
from vmfork.qemu import features, migration
from vmfork.results import ExportResult
from vmfork.snapshots.save import load_incoming, recover, verify
from vmfork.spec import MACHINE_RE, MAX_MEMORY_MIB, MIB, MemorySpec, VMSpec
from vmfork.store import Store
from vmfork.tasks import finish_in_thread
from vmfork.timeouts import DEFAULT, Timeouts

log = logging.getLogger("vmfork.snapshot")

MAGIC = b"VMFORK-SNAPSHOT\n"
FORMAT = 1
HEADER_SIZE = 64 * 1024
ALIGN = MIB
#: The files a snapshot carries besides its stream; the only names an import
#: writes (in the directory it chose).
BLOB_NAMES = ("kernel", "initrd")
#: Largest kernel or initrd a snapshot file may carry.
MAX_BLOB_SIZE = 1 << 30
#: How much a RAM stream may exceed the guest RAM (ROMs, firmware, device
#: state, mapped-ram's per-block headers and bitmaps, 1 MiB alignment).
RAM_STREAM_SLACK = 256 * MIB
#: Capabilities a header may state, and the value each must have.
CAPABILITIES = {"mapped-ram": True}
_HEADER_KEYS = ("format", "name", "created", "memory_mib", "qemu_version", "machine",
                "spec", "blobs", "ram")
_OPTIONAL_KEYS = ("capabilities",)
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_VERSION_RE = re.compile(r"^[0-9]{1,4}\.[0-9]{1,4}\.[0-9]{1,4}$")
_MAX_CREATED = 1e11  # seconds since the epoch: year 5138


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:57]}..."


def _int(d: dict[str, Any], key: str, what: str, low: int, high: int) -> int:
    v = d[key]
    if not isinstance(v, int) or isinstance(v, bool):
        raise BadSnapshotFile(f"{what} {_show(v)} is not an integer")
    if not low <= v <= high:
        raise BadSnapshotFile(f"{what} {v} is out of range ({low}-{high})")
    return v


def _str(d: dict[str, Any], key: str, what: str, pattern: re.Pattern[str]) -> str:
    v = d[key]
    if not isinstance(v, str) or not pattern.fullmatch(v):
        raise BadSnapshotFile(f"invalid {what} {_show(v)}")
    return v


def _object(v: object, what: str, required: tuple[str, ...],
            optional: tuple[str, ...] = ()) -> dict[str, Any]:
    """*v* as a dict holding every key of *required*, others only from *optional*."""
    if not isinstance(v, dict):
        raise BadSnapshotFile(f"{what} is not a JSON object")
    unknown = sorted(str(k) for k in v if k not in required and k not in optional)
    if unknown:
        raise BadSnapshotFile(f"{what} has an unknown key {_show(unknown[0])}")
    missing = [k for k in required if k not in v]
    if missing:
        raise BadSnapshotFile(f"{what} lacks {missing[0]!r}")
    return v


def _align(n: int, a: int = ALIGN) -> int:
    return (n + a - 1) // a * a


def hash_range(f: BinaryIO, start: int, end: int) -> str:
    """sha256 of bytes [start, end) of *f*, holes read as zeros without I/O."""
    h = hashlib.sha256()
    fd = f.fileno()
    zeros = bytes(1 << 20)
    pos = start
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:  # no data after pos
            data = end
        data = min(data, end)
        while pos < data:  # a hole
            n = min(len(zeros), data - pos)
            h.update(zeros[:n] if n < len(zeros) else zeros)
            pos += n
        if pos >= end:
            break
        try:
            hole = min(os.lseek(fd, pos, os.SEEK_HOLE), end)
        except OSError:
            hole = end
        while pos < hole:
            chunk = os.pread(fd, min(1 << 22, hole - pos), pos)
            if not chunk:
                raise MigrationError(f"{f.name}: ends before byte {end}")
            h.update(chunk)
            pos += len(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class Part:
    """Where one part of a snapshot file lies (bytes ``[offset, offset+size)``),
    and its sha256."""

    offset: int
    size: int
    sha256: str

    @property
    def end(self) -> int:
        return self.offset + self.size

    @classmethod
    def from_dict(cls, v: object, what: str, max_size: int) -> Part:
        """The part *v* of a header (BadSnapshotFile if it is not one)."""
        d = _object(v, what, ("offset", "size", "sha256"))
        return cls(offset=_int(d, "offset", f"{what} offset", HEADER_SIZE, 1 << 50),
                   size=_int(d, "size", f"{what} size", 0, max_size),
                   sha256=_str(d, "sha256", f"{what} sha256", _SHA256_RE))


@dataclass(frozen=True)
class Header:
    """The manifest at the head of a snapshot file (JSON after :data:`MAGIC`)."""

    name: str                 # the VM that was exported
    created: float            # time.time() of the export
    memory_mib: int
    qemu_version: str         # the QEMU that wrote the stream
    machine: str              # its concrete machine type (alias resolved)
    spec: VMSpec              # the exported VM's spec; an import derives its own
    blobs: dict[str, Part]    # "kernel", "initrd": files the VM booted
    ram: Part                 # QEMU's mapped-ram stream: RAM and device state
    capabilities: dict[str, bool] = field(default_factory=lambda: {"mapped-ram": True})
    format: int = FORMAT

    def to_dict(self) -> dict[str, Any]:
        return {"format": self.format, "name": self.name, "created": self.created,
                "memory_mib": self.memory_mib, "qemu_version": self.qemu_version,
                "machine": self.machine, "spec": json.loads(self.spec.to_json()),
                "capabilities": dict(self.capabilities),
                "blobs": {k: asdict(v) for k, v in self.blobs.items()},
                "ram": asdict(self.ram)}

    @classmethod
    def from_dict(cls, v: object) -> Header:
        """The header *v* (parsed JSON), held to the strict schema; raise
        BadSnapshotFile naming the first field that breaks it."""
        d = _object(v, "the header", _HEADER_KEYS, _OPTIONAL_KEYS)
        fmt = d["format"]
        if fmt != FORMAT or isinstance(fmt, bool):
            raise BadSnapshotFile(f"snapshot format {_show(fmt)} is not supported "
                                  f"(this vmfork reads format {FORMAT})")
        created = d["created"]
        if (not isinstance(created, int | float) or isinstance(created, bool)
                or not math.isfinite(created) or not 0 <= created <= _MAX_CREATED):
            raise BadSnapshotFile(f"invalid creation time {_show(created)}")
        memory_mib = _int(d, "memory_mib", "memory size (MiB)", 1, MAX_MEMORY_MIB)
        caps = _object(d.get("capabilities", {}), "capabilities", (), tuple(CAPABILITIES))
        for cap, want in CAPABILITIES.items():
            if caps.get(cap, want) is not want:
                raise BadSnapshotFile(f"capability {cap} is {_show(caps[cap])}; this vmfork "
                                      f"reads only files with {cap} {want}")
        blobs = _object(d["blobs"], "blobs", (), BLOB_NAMES)
        try:
            spec = VMSpec.from_dict(d["spec"])
        except BadSnapshotFile:
            raise
        except InvalidInput as exc:
            raise BadSnapshotFile(f"its VM spec is refused: {exc}") from exc
        if spec.memory_mib != memory_mib:
            raise BadSnapshotFile(f"memory size {memory_mib} MiB differs from its spec's "
                                  f"{spec.memory_mib} MiB")
        if spec.disks:
            raise BadSnapshotFile("its VM had disks, which a snapshot file does not carry")
        header = cls(
            name=_str(d, "name", "VM name", NAME_RE), created=float(created),
            memory_mib=memory_mib,
            qemu_version=_str(d, "qemu_version", "QEMU version", _VERSION_RE),
            machine=_str(d, "machine", "machine type", MACHINE_RE), spec=spec,
            blobs={k: Part.from_dict(blobs[k], k, MAX_BLOB_SIZE)
                   for k in BLOB_NAMES if k in blobs},
            ram=Part.from_dict(d["ram"], "RAM", memory_mib * MIB + RAM_STREAM_SLACK),
            capabilities={k: bool(x) for k, x in caps.items()}, format=FORMAT)
        if "kernel" not in header.blobs:
            raise BadSnapshotFile("it carries no kernel")
        if ("initrd" in header.blobs) != bool(spec.initrd):
            raise BadSnapshotFile("its blob initrd and its spec disagree (one has an "
                                  "initrd, the other not)")
        header.check_layout()
        return header

    def parts(self) -> list[tuple[str, Part]]:
        """Every part with its name (blobs, then "RAM"), in file order."""
        return sorted((*self.blobs.items(), ("RAM", self.ram)), key=lambda x: x[1].offset)

    def check_layout(self, file_size: int | None = None) -> None:
        """Raise BadSnapshotFile unless the parts are aligned (blobs to
        4 KiB, the RAM stream to :data:`ALIGN`), after the header, do not
        overlap, and (given *file_size*) end inside the file."""
        if self.ram.offset % ALIGN:
            raise BadSnapshotFile(f"RAM offset {self.ram.offset} is not {ALIGN}-aligned")
        pos, prev = HEADER_SIZE, "the header"
        for what, part in self.parts():
            if part.offset % 4096:
                raise BadSnapshotFile(f"{what} offset {part.offset} is not 4096-aligned")
            if part.offset < pos:
                raise BadSnapshotFile(f"{what} (offset {part.offset}) overlaps {prev} "
                                      f"(which ends at {pos})")
            pos, prev = part.end, what
        if file_size is not None and pos > file_size:
            raise BadSnapshotFile(f"truncated: {prev} ends at byte {pos}, the file has "
                                  f"{file_size}")

    def encode(self) -> bytes:
        """The file's first :data:`HEADER_SIZE` bytes: magic, JSON, NUL padding."""
        head = MAGIC + json.dumps(self.to_dict(), indent=1).encode()
        if len(head) >= HEADER_SIZE:
            raise MigrationError(f"snapshot header too large ({len(head)} bytes)")
        return head + b"\0" * (HEADER_SIZE - len(head))


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    d = dict(pairs)
    if len(d) != len(pairs):
        raise BadSnapshotFile("a key appears twice")
    return d


def read_header(path: Path | str) -> Header:
    """The header of snapshot file *path*, held to the strict schema
    (:meth:`Header.from_dict`) and its parts inside the file; raise
    BadSnapshotFile (naming the file and the problem) otherwise."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            st = os.fstat(f.fileno())
            head = f.read(HEADER_SIZE)
    except OSError as exc:
        raise InvalidInput(f"cannot read snapshot file {str(p)!r}: {exc.strerror}") from exc
    if not head.startswith(MAGIC):
        raise BadSnapshotFile(f"{p} is not a vmfork snapshot file (no header)")
    if len(head) < HEADER_SIZE:
        raise BadSnapshotFile(f"{p} is truncated in its header ({len(head)} bytes)")
    body, _, padding = head[len(MAGIC):].partition(b"\0")
    if padding.strip(b"\0"):
        raise BadSnapshotFile(f"{p}: snapshot header is corrupt (data after its JSON)")
    try:
        d = json.loads(body, object_pairs_hook=_no_duplicates)
        header = Header.from_dict(d)
        header.check_layout(st.st_size)
    except BadSnapshotFile as exc:
        raise BadSnapshotFile(f"{p}: snapshot header refused: {exc}") from exc
    except (ValueError, RecursionError) as exc:  # not JSON (or nested without end)
        raise BadSnapshotFile(f"{p}: snapshot header is corrupt ({type(exc).__name__})") from exc
    return header


def check_export(path: Path | str, header: Header | None = None) -> Header:
    """Check every part of a snapshot file against the sha256 in its header;
    return the header. Raise BadSnapshotFile naming the truncated or corrupt
    part."""
    p = Path(path)
    header = header or read_header(p)
    try:
        with open(p, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            for what, part in header.parts():
                if part.end > size:
                    raise BadSnapshotFile(f"{p} is truncated: {what} ends at byte "
                                          f"{part.end}, the file has {size}")
                try:
                    digest = hash_range(f, part.offset, part.end)
                except MigrationError as exc:  # it shrank while read
                    raise BadSnapshotFile(str(exc)) from exc
                if digest != part.sha256:
                    raise BadSnapshotFile(f"{p} is corrupt: the {what} sha256 differs from "
                                          "its header")
    except OSError as exc:
        raise InvalidInput(f"cannot read snapshot file {str(p)!r}: {exc.strerror}") from exc
    return header


def write_tail(tmp: Path, header: Header, blob_files: dict[str, Path]) -> Header:
    """Complete a snapshot file after QEMU wrote its stream into *tmp* at
    ``header.ram.offset``: copy the blobs in, hash the stream, write the
    header, fsync. Return the header as written."""
    with open(tmp, "r+b") as f:
        for key, src in blob_files.items():
            with open(src, "rb") as s:
                f.seek(header.blobs[key].offset)
                shutil.copyfileobj(s, f, 1 << 20)
        f.flush()
        start, end = header.ram.offset, os.fstat(f.fileno()).st_size
        header = replace(header, ram=Part(offset=start, size=end - start,
                                          sha256=hash_range(f, start, end)))
        f.seek(0)
        f.write(header.encode())
        f.flush()
        os.fsync(f.fileno())
    return header


#: The suffix of the temporary file an export writes before renaming it to
#: the target, ``.TARGET.PID-RANDOM.vmfork-tmp`` in the target's directory.
TEMP_SUFFIX = ".vmfork-tmp"


def temp_file(dest: Path) -> Path:
    """Where this process writes the snapshot file *dest* before renaming it."""
    return dest.with_name(f".{dest.name}.{os.getpid()}-{secrets.token_hex(3)}{TEMP_SUFFIX}")


def remove_stale_temp_files(dest: Path) -> None:
    """Delete the temporary files that exports to *dest* killed by SIGKILL left
    (their process is gone); a cancelled export deletes its own."""
    pattern = re.compile(rf"\.{re.escape(dest.name)}\.(\d+)-[0-9a-f]+{re.escape(TEMP_SUFFIX)}")
    with contextlib.suppress(OSError):
        for p in dest.parent.iterdir():
            found = pattern.fullmatch(p.name)
            if found and not process_alive(int(found.group(1))) and p.is_file():
                log.warning("removing %s, left by an interrupted export", p)
                unlink_quietly(p)


def check_exportable(spec: VMSpec) -> None:
    """Raise StateError if a snapshot file cannot carry the VM: it holds RAM,
    device state, kernel and initrd, not disks, and a copy that reopened the
    VM's disks (or its overlays) would write to them behind the VM's back."""
    if spec.disks:
        paths = ", ".join(d.path for d in spec.disks)
        raise StateError(f"{spec.name}: it has disks ({paths}); a snapshot file carries "
                         "RAM and device state only, not disks: use 'vmfork save' and "
                         "'vmfork restore' (the disks stay in place)")


async def export(store: Store, name: str, file: Path | str,
                 timeouts: Timeouts = DEFAULT) -> ExportResult:
    """Write VM *name* (running, paused or saved) with its RAM to one file.

    A running VM is paused for the copy and resumed after; a saved VM is loaded
    into a temporary QEMU that maps its memory file privately (the file is not
    written) and stays saved.
    """
    t0 = time.monotonic()
    dest = Path(file).absolute()
    if dest.exists():
        raise AlreadyExists(f"{dest} exists already")
    if not dest.parent.is_dir():
        raise InvalidInput(f"directory {str(dest.parent)!r} does not exist")
    check_name(name)
    with store.lock(name, wait=False):
        rec = vm.reconcile(store, await recover(store, store.get_vm(name), timeouts))
        spec = rec.spec
        check_exportable(spec)
        blob_files = {k: Path(v) for k, v in (("kernel", spec.kernel),
                                              ("initrd", spec.initrd)) if v}
        for k, p in blob_files.items():
            if not p.is_file():
                raise StateError(f"{name}: its {k} {p} is missing; cannot export")
        blobs: dict[str, Part] = {}
        pos = HEADER_SIZE
        for k, p in blob_files.items():
            size = p.stat().st_size
            blobs[k] = Part(offset=pos, size=size,
                            sha256=await asyncio.to_thread(sha256_file, p))
            pos = _align(pos + size, 4096)
        ram_offset = _align(pos)
        remove_stale_temp_files(dest)
        tmp = temp_file(dest)
        own = rec.state == "saved"  # export from the state file, in a QEMU of its own
        was_running = False
        if own:
            saved = verify(store, rec)
            private = spec.with_(memory=MemorySpec(backend="file", path=spec.memory.path,
                                                   share=False, readonly=True))
            m = await Launch(store, Transient(name), private,
                             timeouts=timeouts).spawn(incoming=("defer",))
        elif rec.state in LIVE_STATES:
            m = await attach(store, rec, timeouts)
        else:
            raise StateError(f"{name} is {rec.state}; only a running, paused or saved VM "
                             "can be exported")
        try:
            if own:
                await load_incoming(m, f"file:{saved.state_file}", timeouts.migrate,
                                    {"mode": saved.mode}, x_ignore_shared=True)
            else:
                was_running = await m.status() == "running"
                if was_running:
                    await m.pause()
            await migration.set_parameters(m, mode="normal")
            ident = await features.qemu_identity(m)
            await migration.set_capabilities(m, x_ignore_shared=False, mapped_ram=True)
            migration.create_private(tmp)
            try:
                stats = await migration.migrate(
                    m, {"uri": f"file:{tmp},offset={ram_offset}"}, timeouts.ram_copy, "export")
            finally:
                with contextlib.suppress(VmforkError):
                    await migration.set_capabilities(m, mapped_ram=False)
            header = Header(name=name, created=time.time(), memory_mib=spec.memory_mib,
                            qemu_version=ident["qemu_version"], machine=ident["machine"],
                            spec=spec, blobs=blobs,
                            ram=Part(offset=ram_offset, size=0, sha256=""))
            await finish_in_thread(write_tail, tmp, header, blob_files)
            await checkpoints.checkpoint("export.written")
            os.replace(tmp, dest)
            fsync_path(dest.parent)
        except BaseException:
            unlink_quietly(tmp)
            if own:
                await m.kill()
            raise
        finally:
            if own:
                await m.shutdown()
            else:
                if was_running:
                    vm.invalidate_save(store, name)
                    with contextlib.suppress(VmforkError):
                        await m.resume()
                await m.disconnect()
    st = dest.stat()
    log.info("%s: exported to %s (%d bytes, %d allocated)", name, dest, st.st_size,
             st.st_blocks * 512)
    return ExportResult(name=name, file=str(dest), size=st.st_size,
                        allocated=st.st_blocks * 512, memory_mib=spec.memory_mib,
                        seconds=time.monotonic() - t0, migration=stats)


__all__ = [
    "ALIGN", "BLOB_NAMES", "CAPABILITIES", "FORMAT", "HEADER_SIZE", "MAGIC", "MAX_BLOB_SIZE",
    "RAM_STREAM_SLACK", "Header", "Part", "check_export",
    "check_exportable", "export", "hash_range", "read_header", "write_tail",
]
