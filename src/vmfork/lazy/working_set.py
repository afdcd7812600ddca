"""The working set of a template: the chunks of its memory its first clone used.

Owns ``working_set.json`` in a template's directory: a :class:`Recorder`
writes it once, from the template's first clone (sampled from its QEMU's
start until it answered, before its hook), and :func:`read` gives it to
the publisher (:mod:`vmfork.lazy.publish`), which ships it in the published
manifest so that a lazy pull fetches those chunks first, in that order
(REAP-style prefetch).

Which chunks: those holding a page of the template's memory file that the
clone's QEMU has in its mapping of the file — present or swapped out, read
(a file page) or written (a private copy, made from the file's page on the
first write, so the page was read too). Pages the guest never touched are
not in the mapping. The kernel's ``PAGEMAP_SCAN`` returns those runs
directly, skipping page tables never populated (a few milliseconds whatever
the RAM size); reading ``/proc/PID/pagemap`` is the fallback on kernels
without it. The kernel does not tell in which order pages were first used:
the recorder samples the mapping every few tens of milliseconds, and lists
the chunks of each sample (by address) after those of the samples before.

Recording is best effort: it costs a few milliseconds per sample, is done
once per template, and never fails a clone (a failure is logged).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
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


#: Seconds between two samples of the clone's pages while it starts.
SAMPLE_EVERY = 0.02
#: Most samples (the first clone stops being sampled after this many).
MAX_SAMPLES = 1000


class Recorder:
    """The working set of a template's first clone, in the order it was used.

    :meth:`start` samples the pages the clone's QEMU (process *pid*) has in
    its mapping of the template's memory file every :data:`SAMPLE_EVERY`
    seconds, from QEMU's start (its device state touches memory as it
    loads) until :meth:`finish`, when the clone answers: each chunk is
    listed after those seen in earlier samples, so a lazy pull fetches
    first what a clone reads first. :meth:`finish` takes a last sample and
    writes ``working_set.json`` unless the template has one already.
    Best effort: a failure is logged, never raised; a clone that fails
    calls :meth:`cancel` (nothing written).
    """

    def __init__(self, tdir: Path, manifest: TemplateManifest, pid: int, clone: str) -> None:
        self.tdir = tdir
        self.manifest = manifest
        self.pid = pid
        self.clone = clone
        self.order: list[int] = []
        self._seen: set[int] = set()
        self._mapping: RamMapping | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._failure: str | None = None

    @classmethod
    def start_for(cls, tdir: Path, manifest: TemplateManifest, pid: int,
                  clone: str) -> Recorder | None:
        """A started recorder for clone *clone* of the template in *tdir*,
        or None if there is nothing to record (the template has a working
        set, or is a fork base)."""
        if manifest.fork_of is not None or (tdir / FILE).exists():
            return None
        r = cls(tdir, manifest, pid, clone)
        r._thread = threading.Thread(target=r._run, daemon=True, name=f"working set {clone}")
        r._thread.start()
        return r

    def _sample(self) -> None:
        if self._mapping is None:
            self._mapping = ram_mapping(self.pid, self.manifest.memory_file)
        m = self._mapping
        with self._lock:
            for c in chunks_of(m, used_runs(self.pid, m)):
                if c not in self._seen and c * CHUNK_SIZE < self.manifest.memory_size:
                    self._seen.add(c)
                    self.order.append(c)

    def _run(self) -> None:
        for _ in range(MAX_SAMPLES):
            try:
                self._sample()
            except Exception as exc:  # not mapped yet, or QEMU gone: next sample
                self._failure = str(exc)
            if self._stop.wait(SAMPLE_EVERY):
                return

    def _end(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5.0)

    def cancel(self) -> None:
        """Stop sampling; nothing is written."""
        self._end()

    def finish(self) -> list[int] | None:
        """Stop sampling, take a last sample and write the working set;
        return it (None: not written)."""
        t0 = time.monotonic()
        self._end()
        try:
            self._sample()
            written = _write(self.tdir, self.order, self.manifest, self.clone)
        except Exception as exc:  # best effort: a clone never fails for it
            log.warning("template %s: the working set of clone %s was not recorded: %s",
                        self.manifest.name, self.clone, self._failure or exc)
            return None
        if written:
            log.info("template %s: working set of %d chunks (%d MiB) recorded from %s "
                     "(last sample %.1f ms)", self.manifest.name, len(self.order),
                     len(self.order) * CHUNK_SIZE >> 20, self.clone,
                     (time.monotonic() - t0) * 1000)
            return self.order
        return None


def _write(tdir: Path, chunks: list[int], manifest: TemplateManifest, clone: str) -> bool:
    """Write ``working_set.json`` in *tdir* unless it exists; whether it was."""
    path = tdir / FILE
    if path.exists():
        return False
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
    return True


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


__all__ = ["FILE", "Recorder", "chunks_of", "read", "used_runs"]
