"""Which live-update modes a VM and a pair of QEMU binaries allow, and why not.

Owns the choice alone, as pure functions of the VM's spec and what both
binaries support (:class:`vmfork.qemu.features.QemuFeatures`):

- ``cpr-transfer`` (QEMU >= 10): guest RAM (a memfd or a ``share=on`` file,
  with ``aux-ram-share=on``) passes to the new process as file descriptors
  over a UNIX socket; only device state is sent.
- ``ignore-shared``: local migration with ``x-ignore-shared``; the new QEMU
  maps the same ``share=on`` memory file, only device state is sent.
- ``copy``: classic local migration that copies RAM into a fresh memory file
  (or memfd) of the new QEMU; for VMs whose RAM is private (clones). It needs
  twice the guest's memory while it runs.

``auto`` picks the best mode that the VM's memory and both binaries support.
"""

from __future__ import annotations

from typing import Literal

from vmfork.errors import InvalidInput
from vmfork.qemu.features import QemuFeatures
from vmfork.spec import MemorySpec, VMSpec

Mode = Literal["auto", "cpr-transfer", "ignore-shared", "copy"]
MODES: tuple[str, ...] = ("auto", "cpr-transfer", "ignore-shared", "copy")
#: The modes that send device state only.
NO_COPY: tuple[str, ...] = ("cpr-transfer", "ignore-shared")

MemoryKind = Literal["memfd", "shared-file", "private"]
_KIND_TEXT = {"memfd": "a memfd", "shared-file": "a share=on memory file",
              "private": "private (mapped copy-on-write from a template)"}


def memory_kind(mem: MemorySpec) -> MemoryKind:
    if mem.backend == "memfd":
        return "memfd"
    return "shared-file" if mem.share and not mem.readonly else "private"


def check_mode(mode: str) -> None:
    """Raise InvalidInput unless *mode* is one of :data:`MODES`."""
    if mode not in MODES:
        raise InvalidInput(f"invalid update mode {mode!r}: use {', '.join(MODES)}")


def why_not(mode: str, spec: VMSpec, old: QemuFeatures, new: QemuFeatures) -> str | None:
    """Why *mode* cannot update a VM with *spec* between these binaries (None: it can)."""
    check_mode(mode)
    kind = memory_kind(spec.memory)
    if mode == "ignore-shared":
        if kind != "shared-file":
            return f"its RAM is {_KIND_TEXT[kind]}, not a share=on memory file"
        for who, f in (("running", old), ("new", new)):
            if not f.ignore_shared:
                return f"the {who} QEMU ({f.version}) lacks the x-ignore-shared capability"
        return None
    if mode == "cpr-transfer":
        if kind == "private":
            return f"its RAM is {_KIND_TEXT[kind]}; cpr-transfer needs shared memory"
        if not spec.aux_ram_share:
            return "it was started without -machine aux-ram-share=on"
        for who, f in (("running", old), ("new", new)):
            if not f.cpr_transfer:
                return f"the {who} QEMU ({f.version}) lacks migration mode cpr-transfer"
            if not f.aux_ram_share:
                return f"the {who} QEMU ({f.version}) lacks -machine aux-ram-share"
        return None
    return None  # copy works with any memory; auto is never "impossible"


def choose_mode(requested: str, spec: VMSpec, old: QemuFeatures,
                new: QemuFeatures) -> tuple[str, str]:
    """The mode to use and why; raise InvalidInput if *requested* cannot work."""
    check_mode(requested)
    kind = memory_kind(spec.memory)
    if requested != "auto":
        reason = why_not(requested, spec, old, new)
        if reason is not None:
            raise InvalidInput(f"{spec.name}: cannot update with {requested}: {reason}")
        return requested, "requested" + ("; needs twice the guest memory"
                                         if requested == "copy" else "")
    order = ("cpr-transfer",) if kind == "memfd" else ("ignore-shared", "cpr-transfer")
    skipped: list[str] = []
    for mode in order:
        reason = why_not(mode, spec, old, new)
        if reason is None:
            return mode, f"RAM is {_KIND_TEXT[kind]}"
        skipped.append(f"{mode}: {reason}")
    why = f"RAM is {_KIND_TEXT[kind]}; RAM is copied, which needs twice the guest memory"
    return "copy", why + f" (no-copy impossible: {skipped[0]})"


__all__ = ["MODES", "NO_COPY", "Mode", "check_mode", "choose_mode", "memory_kind", "why_not"]
