"""Guest RAM pages as the host kernel sees them, and copies of memory files.

Owns three things a fork needs of a QEMU process's RAM without QEMU's help:

* where its guest RAM is mapped (:func:`ram_mapping`: the mapping of the
  memory file, found by device and inode in ``/proc/PID/maps``);
* which pages of a private (copy-on-write) mapping the guest has written
  (:func:`written_runs`): a written page became an anonymous page of the
  process, so in ``/proc/PID/pagemap`` it is present and not file-backed (or
  swapped out); the others still read from the file. The scan reads 8 bytes
  per page and looks at one of them, in C (``bytes.translate`` and a regular
  expression), so 4 GiB of RAM (a million pages) take a few milliseconds;
* copying those pages into a file (:func:`copy_runs`, through
  ``/proc/PID/mem``), and copying a memory file without its holes
  (:func:`sparse_copy`, ``SEEK_DATA``/``SEEK_HOLE``), so a copy takes only
  the memory the guest used.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
from dataclasses import dataclass
from pathlib import Path

from vmfork.errors import StateError
from vmfork.private import FILE_MODE

PAGE = os.sysconf("SC_PAGE_SIZE")
#: Largest single read from ``/proc/PID/mem`` (a run of written pages is
#: copied in pieces of at most this).
COPY_CHUNK = 8 << 20

# Byte 7 of a pagemap entry (little endian) holds bits 56-63: 63 present,
# 62 swapped, 61 file page or shared anonymous.
_PRESENT, _SWAPPED, _FILE = 0x80, 0x40, 0x20
_WRITTEN = bytes(1 if (b & _SWAPPED) or (b & _PRESENT and not b & _FILE) else 0
                 for b in range(256))
_RUN = re.compile(b"\x01+")


@dataclass(frozen=True)
class RamMapping:
    """Where a memory file is mapped in a process: virtual addresses
    [start, end) show the file from *offset*."""

    start: int
    end: int
    offset: int

    @property
    def pages(self) -> int:
        return (self.end - self.start) // PAGE


def ram_mapping(pid: int, path: str | Path) -> RamMapping:
    """The largest mapping of file *path* in process *pid* (StateError if
    none): matched by device and inode, so a renamed file is found too."""
    st = os.stat(path)
    best: RamMapping | None = None
    try:
        with open(f"/proc/{pid}/maps") as f:
            for line in f:
                parts = line.split(maxsplit=5)
                if len(parts) < 5 or int(parts[4]) != st.st_ino:
                    continue
                major, minor = (int(x, 16) for x in parts[3].split(":"))
                if os.makedev(major, minor) != st.st_dev:
                    continue
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                if best is None or hi - lo > best.end - best.start:
                    best = RamMapping(lo, hi, int(parts[2], 16))
    except OSError as exc:
        raise StateError(f"cannot read the memory map of process {pid}: {exc}") from exc
    if best is None:
        raise StateError(f"process {pid} does not map {path}")
    return best


def written_runs(pid: int, m: RamMapping) -> list[tuple[int, int]]:
    """(first page, page count) of each run of pages of mapping *m* that
    process *pid* holds privately (written since the mapping was made)."""
    with open(f"/proc/{pid}/pagemap", "rb", buffering=0) as f:
        f.seek(m.start // PAGE * 8)
        data = f.read(m.pages * 8)
    flags = data[7::8].translate(_WRITTEN)
    return [(r.start(), r.end() - r.start()) for r in _RUN.finditer(flags)]


def copy_runs(pid: int, m: RamMapping, runs: list[tuple[int, int]], dst: Path) -> int:
    """Write the pages of *runs* (from :func:`written_runs`) of process
    *pid*'s mapping *m* into file *dst* at their file offsets; return the
    bytes copied."""
    total = 0
    src = os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
    try:
        out = os.open(dst, os.O_WRONLY | os.O_CLOEXEC)
        try:
            for first, count in runs:
                addr = m.start + first * PAGE
                off = m.offset + first * PAGE
                left = count * PAGE
                while left:
                    n = min(left, COPY_CHUNK)
                    buf = os.pread(src, n, addr)
                    if len(buf) != n:
                        raise StateError(f"short read of process {pid}'s memory")
                    os.pwrite(out, buf, off)
                    addr += n
                    off += n
                    left -= n
                    total += n
        finally:
            os.close(out)
    finally:
        os.close(src)
    return total


def sparse_copy(src: Path, dst: Path) -> int:
    """Copy file *src* to a new file *dst* (0600, refused if it exists)
    without its holes; return the bytes of data copied. *dst* is removed if
    the copy fails."""
    fin = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fin).st_size
        fout = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
        try:
            os.ftruncate(fout, size)
            copied = _copy_data(fin, fout, size)
        except BaseException:
            os.close(fout)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(dst)
            raise
        os.close(fout)
        return copied
    finally:
        os.close(fin)


def _copy_data(fin: int, fout: int, size: int) -> int:
    copied = 0
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fin, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole is left
                break
            raise
        end = os.lseek(fin, start, os.SEEK_HOLE)
        off = start
        while off < end:
            n = os.copy_file_range(fin, fout, end - off, off, off)
            if n == 0:
                break
            off += n
        copied += off - start
        pos = end
    return copied


__all__ = ["PAGE", "RamMapping", "copy_runs", "ram_mapping", "sparse_copy", "written_runs"]
