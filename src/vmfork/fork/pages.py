"""Guest RAM pages as the host kernel sees them, and copies of memory files.

Owns three things a fork needs of a QEMU process's RAM without QEMU's help:

* where its guest RAM is mapped (:func:`ram_mapping`: the mapping of the
  memory file, found by device and inode in ``/proc/PID/maps``);
* which pages of a private (copy-on-write) mapping the guest has written
  (:func:`written_runs`): a written page became an anonymous page of the
  process, so for ``/proc/PID/pagemap`` it is present (or swapped out) and
  not a file page; the others still read from the file. The kernel's
  ``PAGEMAP_SCAN`` returns those runs directly, skipping page tables that
  were never populated (~3 ms for 4 GiB); reading 8 bytes per page of
  ``/proc/PID/pagemap`` is the fallback (~20 ms for 4 GiB);
* which pages of a mapping a process has touched at all
  (:func:`used_runs`: a template's working set, :mod:`vmfork.lazy.working_set`);
* copying those pages into a file (:class:`PageCopy`: ``process_vm_readv``
  into a shared mapping of the file, one copy by the kernel, its pages
  mapped before the guest pauses, two threads), and copying a
  memory file without its holes (:func:`sparse_copy`,
  ``SEEK_DATA``/``SEEK_HOLE``), so a copy takes only the memory the guest
  used.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import mmap
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path

from vmfork.errors import StateError
from vmfork.private import FILE_MODE

PAGE = os.sysconf("SC_PAGE_SIZE")

# Byte 7 of a pagemap entry (little endian) holds bits 56-63: 63 present,
# 62 swapped, 61 file page or shared anonymous.
_PRESENT, _SWAPPED, _FILE = 0x80, 0x40, 0x20
_WRITTEN = bytes(1 if (b & _SWAPPED) or (b & _PRESENT and not b & _FILE) else 0
                 for b in range(256))
_USED = bytes(1 if b & (_PRESENT | _SWAPPED) else 0 for b in range(256))
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


class _ScanArg(ctypes.Structure):
    """``struct pm_scan_arg`` of ``<linux/fs.h>``."""

    _fields_ = [(n, ctypes.c_uint64) for n in (
        "size", "flags", "start", "end", "walk_end", "vec", "vec_len", "max_pages",
        "category_inverted", "category_mask", "category_anyof_mask", "return_mask")]


class _IOVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


#: ``_IOWR('f', 16, struct pm_scan_arg)``: Linux >= 6.7.
_PAGEMAP_SCAN = 0xC0606610
_IS_FILE, _IS_PRESENT, _IS_SWAPPED, _IS_PFNZERO = 1 << 2, 1 << 3, 1 << 4, 1 << 5
#: Regions asked for per ``PAGEMAP_SCAN`` call.
_SCAN_REGIONS = 4096
#: Most regions per ``process_vm_readv`` call (the kernel's ``IOV_MAX``).
_IOV_MAX = 1024
_libc = ctypes.CDLL(None, use_errno=True)
_MADV_POPULATE_WRITE = 23  # Linux >= 5.14


def written_runs(pid: int, m: RamMapping) -> list[tuple[int, int]]:
    """(first page, page count) of each run of pages of mapping *m* that
    process *pid* holds privately (written since the mapping was made):
    pages that are not file pages (nor the shared zero page) and are present
    or swapped out."""
    return _runs(pid, m, _WRITTEN, inverted=_IS_FILE | _IS_PFNZERO,
                 mask=_IS_FILE | _IS_PFNZERO)


def used_runs(pid: int, m: RamMapping) -> list[tuple[int, int]]:
    """(first page, page count) of each run of pages of mapping *m* that
    process *pid* has touched: present or swapped out, read or written."""
    return _runs(pid, m, _USED, inverted=0, mask=0)


def _runs(pid: int, m: RamMapping, table: bytes, inverted: int,
          mask: int) -> list[tuple[int, int]]:
    """Runs of pages of *m* in the categories given, through the kernel's
    ``PAGEMAP_SCAN`` (which skips unpopulated page tables: a few ms whatever
    the RAM size), or by reading ``/proc/PID/pagemap`` on kernels without
    it: byte 7 of each entry through *table* (1: wanted)."""
    fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    try:
        try:
            return _scan(fd, m, inverted, mask)
        except OSError as exc:
            if exc.errno not in (errno.ENOTTY, errno.EINVAL, errno.EOPNOTSUPP):
                raise
        os.lseek(fd, m.start // PAGE * 8, os.SEEK_SET)
        data = b""
        want = m.pages * 8
        while len(data) < want:
            chunk = os.read(fd, want - len(data))
            if not chunk:
                break
            data += chunk
    finally:
        os.close(fd)
    flags = data[7::8].translate(table)
    return [(r.start(), r.end() - r.start()) for r in _RUN.finditer(flags)]


def _scan(fd: int, m: RamMapping, inverted: int, mask: int) -> list[tuple[int, int]]:
    vec = (ctypes.c_uint64 * (3 * _SCAN_REGIONS))()
    runs: list[tuple[int, int]] = []
    start = m.start
    while start < m.end:
        arg = _ScanArg(size=ctypes.sizeof(_ScanArg), start=start, end=m.end,
                       vec=ctypes.addressof(vec), vec_len=_SCAN_REGIONS,
                       category_inverted=inverted, category_mask=mask,
                       category_anyof_mask=_IS_PRESENT | _IS_SWAPPED,
                       return_mask=_IS_PRESENT | _IS_SWAPPED)
        n = fcntl.ioctl(fd, _PAGEMAP_SCAN, arg)
        for i in range(n):
            lo, hi = vec[3 * i], vec[3 * i + 1]
            runs.append(((lo - m.start) // PAGE, (hi - lo) // PAGE))
        if n < _SCAN_REGIONS or arg.walk_end >= m.end:
            return runs
        start = arg.walk_end
    return runs


class PageCopy:
    """Copies written pages of a process into the memory file *dst*, through
    a shared mapping of it: :meth:`prefault` (before the guest pauses) maps
    the pages the guest has written so far, so that :meth:`copy` (while it
    is paused) only copies. Use as a context manager."""

    #: Threads of one copy (the paused guest's core is free meanwhile).
    THREADS = 2

    def __init__(self, dst: Path) -> None:
        fd = os.open(dst, os.O_RDWR | os.O_CLOEXEC)
        try:
            self._map = mmap.mmap(fd, os.fstat(fd).st_size, mmap.MAP_SHARED)
        finally:
            os.close(fd)
        self._anchor: ctypes.c_char | None = ctypes.c_char.from_buffer(self._map)
        self._base = ctypes.addressof(self._anchor)

    def __enter__(self) -> PageCopy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._anchor = None  # the mapping cannot close while it is exported
        self._map.close()

    def prefault(self, m: RamMapping, runs: list[tuple[int, int]]) -> None:
        """Map the file pages of *runs* writable now (``MADV_POPULATE_WRITE``);
        best effort."""
        for first, count in runs:
            try:
                self._map.madvise(_MADV_POPULATE_WRITE, m.offset + first * PAGE, count * PAGE)
            except OSError:
                return  # a kernel without it: the copy faults them in

    def copy(self, pid: int, m: RamMapping, runs: list[tuple[int, int]]) -> int:
        """Write the pages of *runs* (from :func:`written_runs`) of process
        *pid*'s mapping *m* into the file at their file offsets, with
        ``process_vm_readv`` (one copy, by the kernel); return the bytes."""
        total = sum(n for _, n in runs)
        if total == 0:
            return 0
        parts: list[list[tuple[int, int]]] = [[]]
        share = total / self.THREADS
        done = 0
        for run in runs:
            if done >= share * len(parts) and len(parts) < self.THREADS:
                parts.append([])
            parts[-1].append(run)
            done += run[1]
        errors: list[BaseException] = []

        def work(part: list[tuple[int, int]]) -> None:
            try:
                self._copy(pid, m, part)
            except BaseException as exc:
                errors.append(exc)
        threads = [threading.Thread(target=work, args=(p,), name="vmfork-copy")
                   for p in parts[1:]]
        for t in threads:
            t.start()
        work(parts[0])
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return total * PAGE

    def _copy(self, pid: int, m: RamMapping, runs: list[tuple[int, int]]) -> None:
        for i in range(0, len(runs), _IOV_MAX):
            part = runs[i:i + _IOV_MAX]
            local = (_IOVec * len(part))(*(
                _IOVec(self._base + m.offset + first * PAGE, count * PAGE)
                for first, count in part))
            remote = (_IOVec * len(part))(*(
                _IOVec(m.start + first * PAGE, count * PAGE) for first, count in part))
            want = sum(count for _, count in part) * PAGE
            got = _libc.process_vm_readv(pid, local, len(part), remote, len(part), 0)
            if got != want:
                err = ctypes.get_errno()
                raise StateError(f"copying the written pages of process {pid} failed "
                                 f"({os.strerror(err) if got < 0 else 'short read'})")


def sparse_copy(src: Path, dst: Path, stop: threading.Event | None = None,
                sync: bool = False) -> int:
    """Copy file *src* to a new file *dst* (0600, refused if it exists)
    without its holes; return the bytes of data copied. By the kernel
    (``copy_file_range``) where it can, else read and written here (across
    file systems that refuse it). StateError once *stop* is set; *sync*:
    flushed to disk before it returns. *dst* is removed if the copy fails."""
    fin = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fin).st_size
        fout = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW,
                       FILE_MODE)
        try:
            os.ftruncate(fout, size)
            copied = _copy_data(fin, fout, size, stop, src)
            if sync:
                os.fsync(fout)
        except BaseException:
            os.close(fout)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(dst)
            raise
        os.close(fout)
        return copied
    finally:
        os.close(fin)


#: Largest piece of one copy step (a stop is seen between two).
_COPY_STEP = 64 << 20
#: ``copy_file_range`` refused between these files: read and write instead.
_NO_KERNEL_COPY = (errno.EXDEV, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS)


def _copy_data(fin: int, fout: int, size: int, stop: threading.Event | None,
               src: Path) -> int:
    copied = 0
    pos = 0
    kernel = True
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
            if stop is not None and stop.is_set():
                raise StateError(f"copying {src} was stopped")
            n = min(end - off, _COPY_STEP)
            if kernel:
                try:
                    n = os.copy_file_range(fin, fout, n, off, off)
                except OSError as exc:
                    if exc.errno not in _NO_KERNEL_COPY:
                        raise
                    kernel = False
                    continue
            else:
                block = os.pread(fin, min(n, 1 << 20), off)
                n = len(block)
                if n:
                    os.pwrite(fout, block, off)
            if n == 0:
                break
            off += n
        copied += off - start
        pos = end
    return copied


__all__ = ["PAGE", "PageCopy", "RamMapping", "ram_mapping", "sparse_copy", "used_runs",
           "written_runs"]
