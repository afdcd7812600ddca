"""Admission: whether the host has room for a VM's memory, checked before
vmfork starts a QEMU that needs new guest memory.

Owns the rules, and the one-line :class:`~vmfork.errors.ResourceError` that
names what is needed and both numbers it was checked against:

* **A new memory file** (``run``, ``snapshot import``, a copy-mode update):
  the guest's full size must fit in the free space of the memory directory
  (``statvfs``: a full tmpfs kills every VM on it with SIGBUS) and in the
  host's ``MemAvailable`` (``/proc/meminfo``). A memfd (``--memory-backend
  memfd``) is checked against ``MemAvailable`` only.
* **A clone or pool member** maps its template's memory file privately: it
  allocates nothing up front, and at worst (every page written) it holds the
  template's size in anonymous memory. Each one is admitted if
  ``MemAvailable`` holds that worst case when it starts; clones of one call
  are admitted one by one as they start, not as a sum (they share the
  template's pages until they write them).

The check is a snapshot at launch: nothing is reserved, so VMs started
later, or guests that fill their memory later, can still exhaust the host.
"""

from __future__ import annotations

import os
from pathlib import Path

from vmfork.errors import InvalidInput, ResourceError

MIB = 1024 * 1024


def mem_available() -> int:
    """The host's ``MemAvailable`` in bytes (``/proc/meminfo``)."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise ResourceError("/proc/meminfo has no MemAvailable line")  # kernels before 3.14


def free_space(directory: Path | str) -> int:
    """Bytes an unprivileged writer can still allocate in the file system
    holding *directory* (or its nearest existing parent)."""
    p = Path(directory).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    st = os.statvfs(p)
    return st.f_bavail * st.f_frsize


def _memory_dir_ready(memory_dir: Path) -> None:
    """Create *memory_dir* if missing (as the launch would), so that its own
    file system is the one measured; InvalidInput if it cannot be."""
    try:
        memory_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InvalidInput(f"cannot create memory dir {str(memory_dir)!r}: "
                           f"{exc.strerror}") from exc


def check_memory(name: str, need: int, memory_dir: Path | str | None,
                 purpose: str = "guest memory") -> None:
    """Raise ResourceError unless *need* bytes of *purpose* for VM *name*
    fit in ``MemAvailable`` and, with *memory_dir* (a new memory file),
    in that directory's free space."""
    avail = mem_available()
    if memory_dir is None:
        if need > avail:
            raise ResourceError(f"{name}: {need // MIB} MiB of {purpose} do not fit: "
                                f"MemAvailable is {avail // MIB} MiB")
        return
    _memory_dir_ready(Path(memory_dir))
    free = free_space(memory_dir)
    if need > avail or need > free:
        raise ResourceError(f"{name}: {need // MIB} MiB of {purpose} do not fit: "
                            f"{memory_dir} has {free // MIB} MiB free, MemAvailable is "
                            f"{avail // MIB} MiB")


def check_new_vm(name: str, memory_mib: int, memory_dir: Path | str | None) -> None:
    """Admit a VM of *memory_mib* whose new memory file goes to *memory_dir*
    (None: a memfd)."""
    check_memory(name, memory_mib * MIB, memory_dir)


def check_clone(name: str, template: str, memory_mib: int) -> None:
    """Admit a clone (or pool member) *name* of *template*: its worst case,
    the template's whole memory written, must fit in ``MemAvailable``."""
    check_memory(name, memory_mib * MIB, None,
                 purpose=f"private memory (worst case of a clone of {template})")


__all__ = ["check_clone", "check_memory", "check_new_vm", "free_space", "mem_available"]
