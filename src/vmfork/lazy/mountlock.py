"""The lock between a lazy template's memory server and whoever starts a
process on the memory it serves.

Owns ``mount.lock`` in the template's directory. A complete server with
nothing open on its mount may unmount and exit (:mod:`vmfork.lazy.server`);
it takes the lock exclusively first, and gives up for now if it cannot. A
launcher holds it shared (:func:`exit_lock`) from looking whether the mount
is live until its process has ``mnt/memory`` open: the server then sees the
open file and stays. Imports no FUSE binding.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from pathlib import Path

from vmfork.errors import TemplateError
from vmfork.private import FILE_MODE

LOCK_FILE = "mount.lock"


def open_lock(template_dir: Path) -> int:
    """A descriptor of *template_dir*'s ``mount.lock`` (created 0600)."""
    return os.open(template_dir / LOCK_FILE,
                   os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, FILE_MODE)


@contextlib.contextmanager
def exit_lock(template_dir: Path, timeout: float) -> Iterator[None]:
    """Hold ``mount.lock`` shared: the server of *template_dir* does not
    unmount meanwhile. TemplateError after *timeout* seconds (a server holds
    it exclusively only while it unmounts)."""
    fd = open_lock(template_dir)
    try:
        end = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= end:
                    raise TemplateError(f"the memory server of {template_dir} holds "
                                        f"{LOCK_FILE} for more than {timeout:g} s") from None
                time.sleep(0.02)
        yield
    finally:
        os.close(fd)


__all__ = ["LOCK_FILE", "exit_lock", "open_lock"]
