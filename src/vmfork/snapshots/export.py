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
import os
import secrets
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, BinaryIO

from vmfork import vm
from vmfork.errors import AlreadyExists, InvalidInput, MigrationError, StateError, VmforkError
from vmfork.files import fsync_path, sha256_file, unlink_quietly
from vmfork.launch import Launch, Transient, attach
from vmfork.listing import LIVE_STATES
from vmfork.names import check_name
from vmfork.qemu import features, migration
from vmfork.results import ExportResult
from vmfork.snapshots.save import load_incoming, recover, verify
from vmfork.spec import MIB, MemorySpec, VMSpec
from vmfork.store import Store
from vmfork.timeouts import DEFAULT, Timeouts

log = logging.getLogger("vmfork.snapshot")

MAGIC = b"VMFORK-SNAPSHOT\n"
FORMAT = 1
HEADER_SIZE = 64 * 1024
ALIGN = MIB


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
    def from_dict(cls, d: dict[str, Any]) -> Header:
        """Raise KeyError, TypeError or ValueError if *d* is not a header."""
        return cls(name=str(d["name"]), created=float(d["created"]),
                   memory_mib=int(d["memory_mib"]), qemu_version=str(d["qemu_version"]),
                   machine=str(d["machine"]), spec=VMSpec.from_dict(d["spec"]),
                   blobs={str(k): Part(**v) for k, v in d["blobs"].items()},
                   ram=Part(**d["ram"]), capabilities=dict(d.get("capabilities", {})),
                   format=int(d["format"]))

    def encode(self) -> bytes:
        """The file's first :data:`HEADER_SIZE` bytes: magic, JSON, NUL padding."""
        head = MAGIC + json.dumps(self.to_dict(), indent=1).encode()
        if len(head) >= HEADER_SIZE:
            raise MigrationError(f"snapshot header too large ({len(head)} bytes)")
        return head + b"\0" * (HEADER_SIZE - len(head))


def read_header(path: Path | str) -> Header:
    """The header of a snapshot file; raise MigrationError if it is not one
    (or of a format this vmfork does not read)."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            head = f.read(HEADER_SIZE)
    except OSError as exc:
        raise InvalidInput(f"cannot read snapshot file {str(p)!r}: {exc.strerror}") from exc
    if not head.startswith(MAGIC):
        raise MigrationError(f"{p} is not a vmfork snapshot file (no header)")
    body = head[len(MAGIC):].split(b"\0", 1)[0]
    try:
        d = json.loads(body)
    except ValueError as exc:
        raise MigrationError(f"{p}: snapshot header is corrupt ({exc})") from exc
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        fmt = d.get("format") if isinstance(d, dict) else None
        raise MigrationError(f"{p}: snapshot format {fmt!r} is not supported "
                             f"(this vmfork reads format {FORMAT})")
    try:
        return Header.from_dict(d)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise MigrationError(f"{p}: snapshot header is corrupt ({exc!r})") from exc


def check_export(path: Path | str, header: Header | None = None) -> Header:
    """Check every part of a snapshot file against the sha256 in its header;
    return the header. Raise MigrationError naming the truncated or corrupt
    part."""
    p = Path(path)
    header = header or read_header(p)
    size = p.stat().st_size
    with open(p, "rb") as f:
        for what, part in (*header.blobs.items(), ("RAM", header.ram)):
            if part.end > size:
                raise MigrationError(f"{p} is truncated: {what} ends at byte {part.end}, "
                                     f"the file has {size}")
            if hash_range(f, part.offset, part.end) != part.sha256:
                raise MigrationError(f"{p} is corrupt: the {what} sha256 differs from its "
                                     "header")
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
        tmp = dest.with_name(f".{dest.name}.{secrets.token_hex(3)}.tmp")
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
            await asyncio.to_thread(write_tail, tmp, header, blob_files)
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
    "ALIGN", "FORMAT", "HEADER_SIZE", "MAGIC", "Header", "Part", "check_export",
    "check_exportable", "export", "hash_range", "read_header", "write_tail",
]
