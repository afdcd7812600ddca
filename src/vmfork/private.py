"""Private by default: the modes of what vmfork creates, the directories it
keeps files in, and the identity of a guest's memory file.

Owns three rules.

* **Modes.** Every file vmfork creates is 0600 (a template's memory, state
  and disk files 0400: :data:`READONLY_MODE`), every directory 0700. The
  library never changes the umask of the program that embeds it: it creates
  files and directories with explicit modes (:func:`opener`,
  :func:`make_dirs`), and the processes it starts (QEMU, qemu-img) run with
  :data:`UMASK` (``Popen(umask=UMASK)``), so that what QEMU creates — memory
  files, sockets, state files, the console log — is private too. The
  ``vmfork`` command sets its own process's umask to :data:`UMASK` as well.
* **Directories** (:func:`private_dir`): the home (``$VMFORK_HOME``) and every
  memory directory are created 0700. An existing one is refused
  (:class:`~vmfork.errors.UnsafePath`, one line, nothing written into it)
  when it is a symbolic link, belongs to another user, or is writable by
  group or others. One that is only readable or searchable by others (what
  earlier versions of vmfork made, 0755) is tightened to 0700 (logged at
  INFO): nobody else could have written into it, and refusing it would lock
  its owner out of their VMs.
* **Memory file identity** (:class:`FileId`): a memory file is reopened by
  its path (a restore, an ``ignore-shared`` update), so a file put in its
  place would become the guest's RAM. :func:`check_open_by` checks that the
  file at the path is the one the running QEMU has open (device and inode,
  from ``/proc/PID/fd``); a save records that identity and a restore
  compares it (:func:`check_same`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from vmfork.errors import MigrationError, UnsafePath

#: The umask of vmfork's processes and of the processes it starts.
UMASK = 0o077
#: Mode of the files vmfork creates.
FILE_MODE = 0o600
#: Mode of a template's memory, state and disk files (never written again).
READONLY_MODE = 0o400
#: Mode of the directories vmfork creates.
DIR_MODE = 0o700


def opener(path: str, flags: int) -> int:
    """``open(path, mode, opener=opener)``: a new file is created 0600."""
    return os.open(path, flags | os.O_CLOEXEC, FILE_MODE)


def write_file(path: Path | str, data: bytes) -> None:
    """Write *data* to *path* (created 0600; not atomic: see
    :func:`vmfork.files.write_atomic`)."""
    with open(path, "wb", opener=opener) as f:
        f.write(data)


def make_dirs(path: Path | str) -> Path:
    """Create *path* and its missing parents, each 0700; an existing
    directory is left as it is (see :func:`private_dir` for one that must be
    checked)."""
    p = Path(path)
    missing: list[Path] = []
    while not os.path.lexists(p) and p != p.parent:
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        with contextlib.suppress(FileExistsError):
            d.mkdir(mode=DIR_MODE)
    return Path(path)


def private_dir(path: Path | str, what: str) -> Path:
    """Create directory *path* (0700) or check an existing one; return it.

    Raise :class:`UnsafePath` naming *what* it is for (``"memory dir"``)
    if it is a symbolic link, not a directory, another user's, or writable
    by group or others. An existing directory of the user's that others may
    only read or search is tightened to 0700 (earlier vmfork versions made
    their directories 0755)."""
    p = Path(path)
    try:
        make_dirs(p)
    except OSError as exc:
        raise UnsafePath(f"cannot create {what} {str(p)!r}: {exc.strerror}") from exc
    try:
        fd = os.open(p, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if os.path.islink(p):
            raise UnsafePath(f"{what} {str(p)!r} is a symbolic link; vmfork keeps its files "
                             "only in a real directory of yours") from exc
        if exc.errno == errno.ENOTDIR:
            raise UnsafePath(f"{what} {str(p)!r} is not a directory") from exc
        raise UnsafePath(f"{what} {str(p)!r} is not a usable directory: "
                         f"{exc.strerror}") from exc
    try:
        st = os.fstat(fd)
        if st.st_uid != os.geteuid():
            raise UnsafePath(f"{what} {str(p)!r} belongs to uid {st.st_uid}, not to you "
                             f"(uid {os.geteuid()}); use a directory of your own")
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o022:
            raise UnsafePath(f"{what} {str(p)!r} is writable by other users (mode "
                             f"{mode:04o}); check what is in it, then 'chmod 700' it")
        if mode & 0o077:
            os.fchmod(fd, DIR_MODE)
            import logging  # here only: listing VMs does not load logging

            logging.getLogger("vmfork.private").info(
                "%s %s was readable by other users (mode %04o): now 0700", what, p, mode)
    finally:
        os.close(fd)
    return p


# -- memory file identity -----------------------------------------------------------
@dataclass(frozen=True)
class FileId:
    """A file's device and inode."""

    dev: int
    ino: int

    @classmethod
    def of(cls, st: os.stat_result) -> FileId:
        return cls(st.st_dev, st.st_ino)

    def __str__(self) -> str:
        return f"device {os.major(self.dev)}:{os.minor(self.dev)} inode {self.ino}"


def file_id(path: Path | str, who: str) -> FileId:
    """The identity of memory file *path* of VM *who*; MigrationError if it
    is missing, a symbolic link or not a regular file."""
    try:
        st = os.lstat(path)
    except OSError as exc:
        raise MigrationError(f"{who}: memory file {path} is unusable: {exc.strerror}") from exc
    if not stat.S_ISREG(st.st_mode):
        kind = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a regular file"
        raise MigrationError(f"{who}: memory file {path} is {kind}; refusing to use it")
    return FileId.of(st)


def open_files(pid: int) -> set[FileId]:
    """The regular files process *pid* has open (from ``/proc/PID/fd``)."""
    fd_dir = f"/proc/{pid}/fd"
    found: set[FileId] = set()
    for fd in os.listdir(fd_dir):
        with contextlib.suppress(OSError):
            st = os.stat(f"{fd_dir}/{fd}")
            if stat.S_ISREG(st.st_mode):
                found.add(FileId.of(st))
    return found


def check_open_by(pid: int, path: Path | str, who: str) -> FileId:
    """The identity of memory file *path*, after checking that it is the file
    QEMU *pid* has open (its guest's RAM); MigrationError if another file
    has taken its place."""
    fid = file_id(path, who)
    try:
        ids = open_files(pid)
    except OSError as exc:
        raise MigrationError(f"{who}: cannot see the files of its QEMU (pid {pid}): "
                             f"{exc.strerror}") from exc
    if fid not in ids:
        raise MigrationError(f"{who}: memory file {path} ({fid}) is not the file its QEMU "
                             f"(pid {pid}) holds the guest's RAM in: it was replaced; "
                             "refusing to use it")
    return fid


def boot_id() -> str:
    """This boot's id (device numbers can change across a reboot)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def check_same(path: Path | str, who: str, ino: int, dev: int | None,
               boot: str | None) -> None:
    """Raise MigrationError unless memory file *path* is the file recorded
    as inode *ino* on device *dev* during boot *boot* (the device is only
    compared within the same boot: device numbers are given at mount time)."""
    fid = file_id(path, who)
    same_dev = dev is None or boot != boot_id() or fid.dev == dev
    if fid.ino != ino or not same_dev:
        recorded = FileId(dev if dev is not None else fid.dev, ino)
        raise MigrationError(f"{who}: memory file {path} ({fid}) is not the file the VM was "
                             f"saved with ({recorded}): it was replaced; refusing to use it")


__all__ = [
    "DIR_MODE", "FILE_MODE", "READONLY_MODE", "UMASK", "FileId", "boot_id", "check_open_by",
    "check_same", "file_id", "make_dirs", "open_files", "opener", "private_dir", "write_file",
]
