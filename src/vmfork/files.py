"""Small file operations with crash-safe semantics: atomic writes, fsync of a
directory entry, checksums. Nothing here knows about VMs."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

from vmfork.private import FILE_MODE


def fsync_path(path: Path | str) -> None:
    """fsync a file or directory by path (a directory: its entries are durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Write *data* to *path* via a temporary name, fsync and rename; the file
    is 0600 (readable by its owner only)."""
    tmp = path.with_name(f".{path.name}.{os.urandom(3).hex()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
        with open(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    fsync_path(path.parent)


def sha256_file(path: Path | str) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_json(path: Path | str, cap: int) -> Any:
    """The JSON in *path*, read up to *cap* bytes; None if the file is
    missing, larger than that, unreadable or not JSON."""
    try:
        with open(path, "rb") as f:
            data = f.read(cap + 1)
        if len(data) > cap:
            return None
        return json.loads(data)
    except (OSError, ValueError):
        return None


def unlink_quietly(*paths: Path | str) -> None:
    """Remove each file that exists."""
    for p in paths:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(p)
