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

from vmfork.errors import InvalidInput, SetupError
from vmfork.private import UMASK, make_dirs, write_file
from vmfork.timeouts import DEFAULT, Timeouts

log = logging.getLogger("vmfork.accel")
PROBE_MARKER = b"VMFORK-PROBE-OK"


def kvm_usable_device() -> bool:
    try:
        fd = os.open("/dev/kvm", os.O_RDWR)
    except OSError:
        return False
    os.close(fd)
    return True


def probe_kvm(qemu: str, kernel: str, initrd: str, seconds: float = DEFAULT.accel_probe) -> bool:
    """Boot *kernel* under KVM; True if its init reached user space within
    *seconds*."""
    argv = [qemu, "-nodefaults", "-no-user-config", "-nographic", "-accel", "kvm",
            "-cpu", "host", "-m", "256M", "-serial", "stdio", "-no-reboot",
            "-kernel", kernel, "-initrd", initrd,
            "-append", "console=ttyS0 loglevel=4 rdinit=/init vmfork.probe=1"]
    try:
        out = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True,
                             timeout=seconds, umask=UMASK).stdout
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout or b""
    except OSError:
        return False
    return PROBE_MARKER in out


def resolve_accel(choice: str, qemu: str, kernel: str, initrd: str, cache_dir: Path,
                  timeouts: Timeouts = DEFAULT) -> str:
    """Turn ``auto|kvm|tcg`` into ``kvm`` or ``tcg`` (``auto`` may boot a
    probe for up to ``timeouts.accel_probe`` seconds, once per cache key)."""
    if choice in ("kvm", "tcg"):
        return choice
    if choice != "auto":
        raise InvalidInput(f"invalid accelerator {choice!r}: use auto, kvm or tcg")
    if not kvm_usable_device():
        log.info("accel: /dev/kvm unusable, using tcg")
        return "tcg"
    cache = cache_dir / "accel.json"
    try:
        size = os.stat(kernel).st_size
    except OSError as exc:
        raise SetupError(f"the probe kernel {kernel} is unreadable: {exc.strerror}") from exc
    key = f"{qemu}|{os.path.realpath(kernel)}|{size}|{os.uname().release}"
    try:
        data = json.loads(cache.read_text())
        fresh = isinstance(data, dict) and data.get("key") == key
        if fresh and data.get("accel") in ("kvm", "tcg"):
            return str(data["accel"])
    except (OSError, ValueError):
        pass
    accel = "kvm" if probe_kvm(qemu, kernel, initrd, timeouts.accel_probe) else "tcg"
    log.info("accel: probe boot under KVM %s, using %s",
             "succeeded" if accel == "kvm" else "failed", accel)
    try:
        make_dirs(cache_dir)
        write_file(cache, json.dumps({"key": key, "accel": accel}).encode())
    except OSError as exc:  # the verdict holds; the next run probes again
        log.warning("accel: cannot cache the probe verdict in %s: %s", cache, exc.strerror)
    return accel
