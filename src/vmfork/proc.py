"""Host processes by pid, read from ``/proc`` (cheap: no third-party import,
so that listing VMs stays fast).

A pid alone is not an identity (the kernel reuses pids): vmfork records each
QEMU's start time with its pid and compares both."""

from __future__ import annotations

import functools
import os

#: Two start times closer than this are the same process (the kernel keeps
#: them in clock ticks, 10 ms).
SAME_START = 0.5


@functools.cache
def _boot_time() -> float:
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("btime "):
                return float(line.split()[1])
    return 0.0


def _stat(pid: int) -> list[str] | None:
    """The fields of ``/proc/PID/stat`` after the command name, or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except OSError:
        return None
    return data[data.rindex(")") + 2:].split()


def process_start_time(pid: int) -> float | None:
    """When *pid* started (seconds since the epoch), or None if it is gone."""
    fields = _stat(pid)
    if fields is None:
        return None
    return _boot_time() + int(fields[19]) / os.sysconf("SC_CLK_TCK")


def blocked_in_kernel(pid: int) -> bool:
    """True if a thread of *pid* sleeps uninterruptibly in the kernel (state
    D): killed, it ends only once that call returns — e.g. a read of a file
    whose FUSE server has not answered yet."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return False
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                data = f.read()
        except OSError:
            continue
        if data[data.rindex(")") + 2:].startswith("D"):
            return True
    return False


def process_alive(pid: int | None, start_time: float | None = None) -> bool:
    """True if *pid* runs (not a zombie) and, if given, started at *start_time*."""
    if not pid:
        return False
    fields = _stat(pid)
    if fields is None or fields[0] in ("Z", "X"):
        return False
    if start_time is None:
        return True
    started = _boot_time() + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    return abs(started - start_time) < SAME_START
