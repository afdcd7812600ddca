"""The published layout of a template: what a daemon serves and ``template
publish`` writes, and what ``template pull`` reads.

Owns :class:`Published` (``manifest.json`` of the layout) and the names of
the files beside it. Under one base URL (a daemon's
``/v1/templates/NAME/files``, or any static HTTP server's directory)::

    manifest.json   this record: the template's manifest, each file's size and
                    sha256, the memory's chunk size and one sha256 per chunk,
                    the working set
    state           the device state
    memory          the memory file (holes read as zeros)
    memory.zst      the same, each non-zero chunk compressed on its own
                    (:mod:`vmfork.lazy.pack`), if the manifest lists ``packed``
    kernel, initrd  the boot files the template's QEMU was started with (QEMU
                    opens them when a clone starts), if it had them
    disk0.qcow2 ... each template disk, flattened into one standalone image

Memory is split into chunks of :data:`CHUNK_SIZE` bytes; ``chunks[i]`` is
the sha256 of chunk *i*, or None for a chunk that is all zeros (never
fetched: a puller fills it with zeros); ``packed[i]``, if the manifest has
it, the length of chunk *i* in ``memory.zst`` (0 for a zero chunk), where a
puller fetches it from. ``working_set`` lists the chunks the
template's first clone read in its first seconds, in the order to fetch
them first.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vmfork.errors import TemplateError

if TYPE_CHECKING:
    from vmfork.records import TemplateManifest

#: Layout version this vmfork writes and reads.
VERSION = 1
#: Bytes of memory per chunk: what one lazy fetch brings and one sha256 covers.
CHUNK_SIZE = 256 << 10
MANIFEST = "manifest.json"
STATE = "state"
MEMORY = "memory"
MEMORY_PACK = "memory.zst"
KERNEL = "kernel"
INITRD = "initrd"
#: Largest manifest.json a puller accepts (a 64 GiB memory is ~17 MB of it).
MAX_MANIFEST = 64 << 20


def disk_file(index: int) -> str:
    return f"disk{index}.qcow2"


@dataclass(frozen=True)
class PublishedFile:
    """A whole file of the layout (not the memory): its size and sha256."""

    size: int
    sha256: str


@dataclass(frozen=True)
class PublishedMemory:
    """The memory's part of ``manifest.json``: what a lazy pull's FUSE
    server reads (:meth:`from_json` parses no template manifest, so the
    server need not import vmfork's records)."""

    memory_size: int
    chunk_size: int
    #: One sha256 per chunk; None for a chunk of zeros (never fetched).
    chunks: tuple[str | None, ...]
    #: Chunks a clone reads first, in that order.
    working_set: tuple[int, ...] = ()
    #: Length of each chunk in ``memory.zst`` (0: zero chunk); () if there
    #: is no pack.
    packed: tuple[int, ...] = ()

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PublishedMemory:
        """The memory fields of manifest *d* (ValueError, KeyError or
        TypeError if they are not consistent)."""
        chunk_size = int(d["chunk_size"])
        memory_size = int(d["memory_size"])
        chunks = tuple(None if c is None else _hex(c) for c in d["chunks"])
        if chunk_size <= 0 or chunk_size % 4096:
            raise ValueError(f"bad chunk size {chunk_size}")
        if len(chunks) != -(-memory_size // chunk_size):
            raise ValueError("chunk count does not match the memory size")
        ws = tuple(int(i) for i in d.get("working_set") or ())
        if any(not 0 <= i < len(chunks) for i in ws):
            raise ValueError("working set names a chunk out of range")
        packed = tuple(int(n) for n in d.get("packed") or ())
        if packed:
            if len(packed) != len(chunks):
                raise ValueError("packed lengths do not match the chunk count")
            # A frame is at most a little longer than its chunk.
            most = chunk_size + (chunk_size >> 7) + 512
            if any((n == 0) != (c is None) or not 0 <= n <= most
                   for n, c in zip(packed, chunks, strict=True)):
                raise ValueError("a packed length does not fit its chunk")
        return cls(memory_size=memory_size, chunk_size=chunk_size, chunks=chunks,
                   working_set=ws, packed=packed)

    @classmethod
    def from_json(cls, data: bytes) -> PublishedMemory:
        """Read the memory's part of a manifest from elsewhere (TemplateError,
        one line, if it is not a consistent layout of this version)."""
        try:
            return cls.from_dict(_manifest_dict(data))
        except (KeyError, TypeError, ValueError) as exc:
            raise TemplateError(f"published manifest is invalid: {exc}") from exc


def _manifest_dict(data: bytes) -> dict[str, Any]:
    if len(data) > MAX_MANIFEST:
        raise TemplateError(f"published manifest too large ({len(data)} bytes)")
    d = json.loads(data)
    if not isinstance(d, dict):
        raise ValueError("not a JSON object")
    if d.get("version") != VERSION:
        raise ValueError(f"layout version {d.get('version')!r}, this vmfork reads {VERSION}")
    return d


@dataclass(frozen=True)
class Published:
    """``manifest.json`` of a published template."""

    name: str
    #: The template's own manifest (its paths are the publisher's; a puller
    #: rewrites them).
    template: TemplateManifest
    #: Every whole file by its name in the layout: ``state`` always,
    #: ``kernel``/``initrd`` if the template has them, ``disk{i}.qcow2`` for
    #: each template disk (its index in the spec's disks).
    files: dict[str, PublishedFile]
    memory_size: int
    chunk_size: int
    chunks: tuple[str | None, ...]
    working_set: tuple[int, ...] = ()
    packed: tuple[int, ...] = ()
    version: int = VERSION

    def to_dict(self) -> dict[str, Any]:
        d = {"version": self.version, "name": self.name,
             "template": self.template.to_dict(),
             "files": {k: {"size": f.size, "sha256": f.sha256}
                       for k, f in self.files.items()},
             "memory_size": self.memory_size, "chunk_size": self.chunk_size,
             "chunks": list(self.chunks), "working_set": list(self.working_set)}
        if self.packed:
            d["packed"] = list(self.packed)
        return d

    @property
    def memory(self) -> PublishedMemory:
        """The memory's part of this manifest."""
        return PublishedMemory(memory_size=self.memory_size, chunk_size=self.chunk_size,
                               chunks=self.chunks, working_set=self.working_set,
                               packed=self.packed)

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict()).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Published:
        """Read and check a manifest from elsewhere (TemplateError, one line,
        for anything that is not a consistent layout of this version)."""
        # Here, not at the top: the FUSE server reads PublishedMemory only.
        from vmfork.records import TemplateManifest

        try:
            d = _manifest_dict(data)
            mem = PublishedMemory.from_dict(d)
            files = {_file(k): PublishedFile(int(v["size"]), _hex(v["sha256"]))
                     for k, v in dict(d["files"]).items()}
            if STATE not in files:
                raise ValueError("no state file")
            return cls(name=str(d["name"]), template=TemplateManifest.from_dict(d["template"]),
                       files=files, memory_size=mem.memory_size, chunk_size=mem.chunk_size,
                       chunks=mem.chunks, working_set=mem.working_set, packed=mem.packed)
        except TemplateError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise TemplateError(f"published manifest is invalid: {exc}") from exc


def _hex(value: Any) -> str:
    s = str(value)
    if len(s) != 64 or any(c not in "0123456789abcdef" for c in s):
        raise ValueError(f"not a sha256: {s[:80]!r}")
    return s


def _file(value: Any) -> str:
    """*value* if it is the name of a whole file of the layout."""
    s = str(value)
    if s in (STATE, KERNEL, INITRD):
        return s
    if (s.startswith("disk") and s.endswith(".qcow2") and s[4:-6].isdigit()
            and len(s) <= 16):
        return s
    raise ValueError(f"bad file name {s[:80]!r}")


def data_chunks(fd: int, size: int, chunk_size: int) -> list[int]:
    """Indexes of the chunks of the *size* bytes of file *fd* that hold data
    (not only holes), in order."""
    out: list[int] = []
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:
            break  # only a hole is left
        end = os.lseek(fd, start, os.SEEK_HOLE)
        first, last = start // chunk_size, -(-end // chunk_size)
        out.extend(range(max(first, out[-1] + 1 if out else 0), last))
        pos = last * chunk_size
    return out


__all__ = ["CHUNK_SIZE", "INITRD", "KERNEL", "MANIFEST", "MEMORY", "MEMORY_PACK", "STATE",
           "VERSION", "Published", "PublishedFile", "PublishedMemory", "data_chunks",
           "disk_file"]
