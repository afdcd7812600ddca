"""The sha256 of each chunk of a memory file, read plainly: what a published
manifest's ``chunks`` must hold (None for a chunk of zeros), computed here
independently of vmfork's own hashing (:func:`vmfork.lazy.pack.build`)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from vmfork.lazy.published import CHUNK_SIZE


def chunk_sha256s(path: Path, chunk_size: int = CHUNK_SIZE) -> tuple[str | None, ...]:
    out: list[str | None] = []
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            out.append(None if not any(chunk) else hashlib.sha256(chunk).hexdigest())
    return tuple(out)
