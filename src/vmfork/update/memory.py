"""Host memory of a VM's QEMU processes, measured while an update runs.

Owns the accounting an update reports and checks: the private resident
memory of each QEMU plus the guest memory they share (memory files, memfds),
each shared file counted once however many processes map it
(:func:`host_memory`); a sampler thread that keeps the peak during the move
(:class:`MemorySampler`); and the refusal of a copy update that would not fit
(:func:`check_copy_headroom`, by the rules of :mod:`vmfork.admission`).
"""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path

from vmfork.admission import check_memory
from vmfork.spec import MIB, MemorySpec, VMSpec

#: Seconds between two samples of :class:`MemorySampler`.
SAMPLE_INTERVAL = 0.005


def rss_anon(pid: int) -> int:
    """Private (anonymous) resident memory of *pid*; shared memory is counted
    once per file by :func:`shared_memory`, not per process."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def shared_memory(pids: tuple[int, ...], files: tuple[str, ...]) -> int:
    """Allocated bytes of the memory files and of the processes' memfds, each once."""
    seen: set[tuple[int, int]] = set()
    total = 0

    def add(path: str) -> None:
        nonlocal total
        with contextlib.suppress(OSError):
            st = os.stat(path)
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    for f in files:
        add(f)
    for pid in pids:
        fd_dir = f"/proc/{pid}/fd"
        with contextlib.suppress(OSError):
            for fd in os.listdir(fd_dir):
                with contextlib.suppress(OSError):
                    if os.readlink(f"{fd_dir}/{fd}").startswith("/memfd:"):
                        add(f"{fd_dir}/{fd}")
    return total


def host_memory(pids: tuple[int, ...], files: tuple[str, ...]) -> int:
    """Host memory of a VM's QEMU processes: their private RSS plus the guest
    memory they share (files, memfds), counted once."""
    return sum(rss_anon(p) for p in pids) + shared_memory(pids, files)


def memory_files(spec: VMSpec) -> tuple[str, ...]:
    """The memory file of a VM with *spec* (none for a memfd)."""
    mem = spec.memory
    return (mem.path,) if mem.backend == "file" and mem.path else ()


def check_copy_headroom(spec: VMSpec, pid: int, new_memory: MemorySpec) -> None:
    """Refuse a copy update that would not fit (ResourceError): it needs the
    guest's memory twice, the second copy in the new memory file's directory
    (for a memory file) and in RAM (:mod:`vmfork.admission`)."""
    need = min(spec.memory_mib * MIB, host_memory((pid,), memory_files(spec)))
    in_file = new_memory.backend == "file" and new_memory.path
    mdir = Path(str(new_memory.path)).parent if in_file else None
    check_memory(spec.name, need, mdir, purpose="a copy update's second copy of guest memory")


class MemorySampler:
    """Samples :func:`host_memory` in a thread every *interval* s; keeps the peak.

    Use as a context manager: the first sample is taken on entry, the last
    on exit."""

    def __init__(self, pids: tuple[int, ...], files: tuple[str, ...],
                 interval: float = SAMPLE_INTERVAL) -> None:
        self.pids = pids
        self.files = files
        self.interval = interval
        self.peak = 0
        self.first = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="vmfork-mem", daemon=True)

    def watch(self, pids: tuple[int, ...], files: tuple[str, ...]) -> None:
        """Sample these processes and files from now on."""
        self.pids, self.files = pids, files
        self.sample()

    def sample(self) -> int:
        value = host_memory(self.pids, self.files)
        self.peak = max(self.peak, value)
        self.samples += 1
        return value

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> MemorySampler:
        self.first = self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()  # at most one sample (a few /proc reads) away
        self.sample()


__all__ = ["MemorySampler", "check_copy_headroom", "host_memory", "memory_files",
           "rss_anon", "shared_memory"]
