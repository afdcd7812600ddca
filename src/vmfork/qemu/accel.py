"""Choosing the accelerator: KVM only where it really runs a guest.

``/dev/kvm`` existing is not enough (on these hosts it opens, yet a stock
kernel dies with an emulation failure), so ``auto`` boots the demo kernel once
under KVM with ``vmfork.probe=1`` (its init prints a marker and powers off)
and caches the verdict per QEMU binary, kernel and host.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
from pathlib import Path

from vmfork.errors import InvalidInput

log = logging.getLogger("vmfork.accel")
PROBE_MARKER = b"VMFORK-PROBE-OK"
PROBE_SECONDS = 20.0


def kvm_usable_device() -> bool:
    try:
        fd = os.open("/dev/kvm", os.O_RDWR)
    except OSError:
        return False
    os.close(fd)
    return True


def probe_kvm(qemu: str, kernel: str, initrd: str, seconds: float = PROBE_SECONDS) -> bool:
    """Boot *kernel* under KVM; True if its init reached user space."""
    argv = [qemu, "-nodefaults", "-no-user-config", "-nographic", "-accel", "kvm",
            "-cpu", "host", "-m", "256M", "-serial", "stdio", "-no-reboot",
            "-kernel", kernel, "-initrd", initrd,
            "-append", "console=ttyS0 loglevel=4 rdinit=/init vmfork.probe=1"]
    try:
        out = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True,
                             timeout=seconds).stdout
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout or b""
    except OSError:
        return False
    return PROBE_MARKER in out


def resolve_accel(choice: str, qemu: str, kernel: str, initrd: str, cache_dir: Path) -> str:
    """Turn ``auto|kvm|tcg`` into ``kvm`` or ``tcg``."""
    if choice in ("kvm", "tcg"):
        return choice
    if choice != "auto":
        raise InvalidInput(f"invalid accelerator {choice!r}: use auto, kvm or tcg")
    if not kvm_usable_device():
        log.info("accel: /dev/kvm unusable, using tcg")
        return "tcg"
    cache = cache_dir / "accel.json"
    key = f"{qemu}|{os.path.realpath(kernel)}|{os.stat(kernel).st_size}|{os.uname().release}"
    try:
        data = json.loads(cache.read_text())
        if data.get("key") == key:
            return str(data["accel"])
    except (OSError, ValueError, KeyError):
        pass
    accel = "kvm" if probe_kvm(qemu, kernel, initrd) else "tcg"
    log.info("accel: probe boot under KVM %s, using %s",
             "succeeded" if accel == "kvm" else "failed", accel)
    cache_dir.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({"key": key, "accel": accel}))
    return accel
