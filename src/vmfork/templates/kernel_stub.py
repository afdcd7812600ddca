"""The kernel a clone's QEMU is given: the template's, cut to its header.

With ``-kernel`` (and ``-initrd``) QEMU reads the whole files into its own
memory and keeps them there for the guest's firmware (fw_cfg), in every
process: 11 MiB for the demo guest's kernel and 2.4 MiB for its initrd, a
quarter of what an idle clone costs of its own. A clone never boots: its
guest is the template's, already running, loaded with the device state. So
its QEMU gets a *stub* (:func:`stub_for`): the kernel's boot sector and setup
header (what QEMU parses to place a kernel: it adds the same option ROM and
the same devices) with one page of what follows, and no initrd. Nothing of
the stub reaches the running guest; only a guest that reboots would read it,
and a clone's QEMU ends at a guest reboot (``-action reboot=shutdown``).

Stubs live in one cache directory, named by the kernel's size and the
sha256 of its header, written atomically; a file that is not a Linux bzImage
(no ``HdrS`` magic) gets no stub and the clone keeps the whole kernel.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from vmfork.files import write_atomic
from vmfork.private import make_dirs

#: Offsets in a bzImage: setup sectors (0 means 4), the ``HdrS`` magic.
_SETUP_SECTS = 0x1F1
_MAGIC_AT, _MAGIC = 0x202, b"HdrS"
#: Bytes of the kernel proper kept after the setup code.
_TAIL = 4096


def stub_for(cache: Path, kernel: str) -> str | None:
    """Path of the stub of *kernel* in directory *cache* (made if missing),
    or None if *kernel* is not a bzImage or cannot be read."""
    try:
        with open(kernel, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(64 * 1024)
    except OSError:
        return None
    if len(head) < _MAGIC_AT + 4 or head[_MAGIC_AT:_MAGIC_AT + 4] != _MAGIC:
        return None
    setup = ((head[_SETUP_SECTS] or 4) + 1) * 512
    keep = setup + _TAIL
    if keep >= size or keep > len(head):
        return None
    digest = hashlib.sha256(head[:keep] + str(size).encode()).hexdigest()[:20]
    path = cache / f"kernel-{digest}.stub"
    if not path.exists():
        make_dirs(cache)
        write_atomic(path, head[:keep])
    return str(path)


__all__ = ["stub_for"]
