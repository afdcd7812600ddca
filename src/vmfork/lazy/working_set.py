"""The working set of a template: the chunks of its memory its first clone used.

Owns ``working_set.json`` in a template's directory: :func:`record` writes it
once, at the end of the template's first clone (after the clone answered,
before its hook), and :func:`read` gives it to the publisher
(:mod:`vmfork.lazy.publish`), which ships it in the published manifest so
that a lazy pull fetches those chunks first (REAP-style prefetch).

Which chunks: those holding a page of the template's memory file that the
clone's QEMU has in its mapping of the file — present or swapped out, read
(a file page) or written (a private copy, made from the file's page on the
first write, so the page was read too). Pages the guest never touched are
not in the mapping. The kernel's ``PAGEMAP_SCAN`` returns those runs
directly, skipping page tables never populated (a few milliseconds whatever
the RAM size); reading ``/proc/PID/pagemap`` is the fallback on kernels
without it. The kernel does not tell in which order pages were first used,
so chunks are listed by address.

Recording is best effort: it costs milliseconds, is done once per template,
and never fails a clone (:func:`record_quietly` logs a failure and goes on).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from pathlib import Path

from vmfork.fork.pages import PAGE, RamMapping, ram_mapping, used_runs
from vmfork.lazy.published import CHUNK_SIZE
from vmfork.private import FILE_MODE
from vmfork.records import TemplateManifest

log = logging.getLogger("vmfork.lazy.working_set")

#: The working set's file in a template's directory.
FILE = "working_set.json"
VERSION = 1
#: Largest working_set.json read (a 64 GiB memory has 262144 chunks).
MAX_FILE = 8 << 20


def chunks_of(m: RamMapping, runs: list[tuple[int, int]],
              chunk_size: int = CHUNK_SIZE) -> list[int]:
    """The chunks of the mapped file that *runs* of mapping *m* touch, by address."""
    found: set[int] = set()
    for first, count in runs:
        lo = m.offset + first * PAGE
        hi = lo + count * PAGE
        found.update(range(lo // chunk_size, (hi - 1) // chunk_size + 1))
    return sorted(found)


def record(tdir: Path, manifest: TemplateManifest, pid: int, clone: str) -> list[int] | None:
    """Write ``working_set.json`` of the template in *tdir* from its clone
    *clone* (QEMU process *pid*) unless the template has one already;
    return the chunks recorded (None: it had one)."""
    path = tdir / FILE
    if path.exists():
        return None
    m = ram_mapping(pid, manifest.memory_file)
    chunks = [c for c in chunks_of(m, used_runs(pid, m))
              if c * CHUNK_SIZE < manifest.memory_size]
    data = json.dumps({"version": VERSION, "chunk_size": CHUNK_SIZE, "chunks": chunks,
                       "memory_size": manifest.memory_size, "clone": clone,
                       "recorded": time.time()}).encode()
    # A temporary name and a rename, so that a reader sees all or nothing;
    # no fsync: a working set lost in a crash is recorded by the next clone.
    tmp = tdir / f".{FILE}.{os.getpid()}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW,
                     FILE_MODE)
        with open(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    return chunks


def record_quietly(tdir: Path, manifest: TemplateManifest, pid: int, clone: str) -> None:
    """:func:`record`, for a clone: fork bases have none, and a failure is
    logged, never raised."""
    if manifest.fork_of is not None:
        return
    t0 = time.monotonic()
    try:
        chunks = record(tdir, manifest, pid, clone)
    except Exception as exc:  # best effort: a clone never fails for it
        log.warning("template %s: the working set of clone %s was not recorded: %s",
                    manifest.name, clone, exc)
        return
    if chunks is not None:
        log.info("template %s: working set of %d chunks (%d MiB) recorded from %s in %.1f ms",
                 manifest.name, len(chunks), len(chunks) * CHUNK_SIZE >> 20, clone,
                 (time.monotonic() - t0) * 1000)


def read(tdir: Path, chunk_size: int = CHUNK_SIZE) -> tuple[int, ...]:
    """The working set recorded in *tdir*, as chunks of *chunk_size* in the
    recorded order (empty if there is none or it cannot be read)."""
    try:
        with open(tdir / FILE, "rb") as f:
            data = f.read(MAX_FILE + 1)
        if len(data) > MAX_FILE:
            raise ValueError("too large")
        d = json.loads(data)
        recorded = int(d["chunk_size"])
        chunks = [int(c) for c in d["chunks"]]
        if recorded <= 0 or any(c < 0 for c in chunks):
            raise ValueError("negative chunk")
    except FileNotFoundError:
        return ()
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("%s is unreadable, ignored: %s", tdir / FILE, exc)
        return ()
    out: dict[int, None] = {}
    for c in chunks:
        lo, hi = c * recorded, (c + 1) * recorded
        for i in range(lo // chunk_size, (hi - 1) // chunk_size + 1):
            out.setdefault(i, None)
    return tuple(out)


__all__ = ["FILE", "chunks_of", "read", "record", "record_quietly", "used_runs"]
