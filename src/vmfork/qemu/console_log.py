"""A VM's ``console.log``: what its serial console printed, capped on disk.

Owns the file and its cap. QEMU does not write the file: a guest could then
grow it without limit (``yes > /dev/ttyS0``). The serial console goes through
a hub to the console socket and to a ring buffer in QEMU that keeps the
latest :data:`vmfork.spec.CONSOLE_RING` bytes (:func:`vmfork.spec.build_argv`).
vmfork drains that buffer into the file whenever it talks to the VM's QEMU
anyway (:meth:`vmfork.qemu.machine.Machine.drain_console`: during the
readiness wait, before QEMU is told to quit, when a guest command hangs, when
``vmfork console`` attaches). What the guest prints beyond the ring's size
between two drains is lost, oldest first.

:func:`append` keeps the file under :data:`LOG_CAP` bytes: an append that
would take ``console.log`` over the cap first renames it to ``console.log.1``
(replacing the one before), so the console takes at most ``2 * LOG_CAP`` of
disk however much the guest prints. Appends from several vmfork processes are
serialised by an ``flock`` on the file itself. Both files are 0600.
"""

from __future__ import annotations

import errno
import fcntl
import os
import time
from pathlib import Path

from vmfork.errors import StateError
from vmfork.private import opener

#: Most bytes in ``console.log`` (and in ``console.log.1``, the one before):
#: room for a whole boot of the Debian guest with its kernel messages.
LOG_CAP = 1 << 20
#: Suffix of the rotated file.
ROTATED = ".1"
#: How long an append waits for another process's append (local file writes
#: of at most LOG_CAP bytes).
LOCK_WAIT = 5.0


def rotated(path: str | Path) -> Path:
    """The file ``console.log`` rotates to."""
    return Path(f"{path}{ROTATED}")


def append(path: str | Path, data: bytes, cap: int = LOG_CAP,
           lock_wait: float = LOCK_WAIT) -> None:
    """Append *data* to the log at *path*, rotating first if the file would
    grow over *cap* bytes; of *data* over *cap*, only its last *cap* bytes
    are kept. Raises OSError, or StateError if another append holds the file
    for *lock_wait* seconds."""
    if not data:
        return
    data = data[-cap:]
    end = time.monotonic() + lock_wait
    while True:
        fd = opener(str(path), os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW)
        try:
            _lock(fd, end, path)
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                continue  # another append rotated it: open the new one
            size = os.fstat(fd).st_size
            if size and size + len(data) > cap:
                os.replace(path, rotated(path))
                continue
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            return
        finally:
            os.close(fd)


def _lock(fd: int, end: float, path: str | Path) -> None:
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EWOULDBLOCK):
                raise
        if time.monotonic() >= end:
            raise StateError(f"{path}: another vmfork process keeps writing it")
        time.sleep(0.01)
