"""``vmfork bench update``: live update in every mode at several RAM sizes.

One demo VM per size, its RAM filled to a share with incompressible data, then
``repeat`` rounds of one update per mode (interleaved, so host noise hits
every mode alike); the median of each figure is reported, with ratios to
``copy`` measured in the same run, and the issue's targets checked.
"""

from __future__ import annotations

import contextlib
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

from rich.console import Console

from vmfork import vm
from vmfork.bench import print_table, ratio
from vmfork.errors import GuestError
from vmfork.guest.serial import CutShort
from vmfork.names import internal
from vmfork.results import UpdateReport
from vmfork.store import Store
from vmfork.timeouts import DEFAULT, Timeouts
from vmfork.update.live import update
from vmfork.update.modes import NO_COPY

MB = 1_000_000
MIB = 1024 * 1024
#: Like bench.FILL_CMD but without the md5 at the end (hashing GBs under TCG
#: takes minutes): MB MiB of non-zero, distinct pages. The demo guest's root is
#: a tmpfs capped at half the RAM; it is let grow first.
FILL_CMD = ("mount -o remount,size=95% / && head -c 1048576 /dev/urandom > /run/blk && i=0 && "
            "while [ $i -lt {mb} ]; do echo $i; cat /run/blk; i=$((i+1)); done > {file} && "
            "rm /run/blk")
SIZE_CMD = "ls -l /root/data | awk '{print $5}'"
#: Guest RAM left free for the kernel and the demo guest's own files.
GUEST_RESERVE_MIB = 100
FIGURES = ("pause_host_ms", "pause_qemu_ms", "total_seconds", "switch_seconds",
           "bytes_transferred", "ram_bytes_copied", "peak_memory_bytes",
           "memory_before_bytes", "peak_memory_ratio")


def _say(progress: bool, msg: str) -> None:
    if progress:
        print(msg, file=sys.stderr, flush=True)


def _median(reports: Sequence[UpdateReport], key: str) -> float | None:
    vals = [v for v in (r.to_dict()[key] for r in reports) if v is not None]
    return statistics.median(vals) if vals else None


#: Tries of an idempotent guest command whose output the serial agent lost.
EXEC_TRIES = 3


async def _exec(store: Store, name: str, command: str, timeout: float) -> str:
    """Run an idempotent guest command; again if the serial agent lost its output."""
    for _ in range(EXEC_TRIES - 1):
        with contextlib.suppress(CutShort):
            return await _exec_once(store, name, command, timeout)
    return await _exec_once(store, name, command, timeout)


async def _exec_once(store: Store, name: str, command: str, timeout: float) -> str:
    r = await vm.exec_(store, name, command, timeout=timeout)
    if r.exit_code != 0:
        raise GuestError(f"{name}: {command[:40]!r} failed: "
                         f"{(r.stderr or r.stdout).strip()[-200:]}")
    return r.stdout.strip()


async def _fill(store: Store, name: str, mb: int, timeouts: Timeouts) -> None:
    try:
        # Writing guest RAM under TCG runs at a few MB/s: the deadline grows with mb.
        r = await vm.exec_(store, name, FILL_CMD.format(mb=mb, file="/root/data"),
                           timeout=timeouts.exec * (2 + mb / 240))
        if r.exit_code != 0:
            raise GuestError(f"{name}: filling guest memory failed: "
                             f"{(r.stderr or r.stdout).strip()[-200:]}")
    except CutShort:  # lost output is fine: the size check below decides
        pass
    size = await _exec(store, name, SIZE_CMD, timeouts.exec)
    if not size.isdigit() or int(size) < mb * MIB:
        raise GuestError(f"{name}: filling guest memory failed (/root/data: {size})")


async def measure_size(store: Store, memory_mib: int, modes: Sequence[str], fill: float,
                       repeat: int, progress: bool,
                       timeouts: Timeouts = DEFAULT) -> dict[str, Any]:
    name = internal("bench", f"update-{memory_mib}")
    if store.has_vm(name):
        await vm.stop(store, name, force=True, timeouts=timeouts)
    t0 = time.monotonic()
    _say(progress, f"{memory_mib} MiB: booting")
    await vm.run(store, vm.RunOptions(name=name, demo=True, memory_mib=memory_mib), timeouts)
    reports: dict[str, list[UpdateReport]] = {m: [] for m in modes}
    try:
        # The guest's files live in its RAM next to the kernel: leave it room.
        fill_mb = min(int(memory_mib * fill), memory_mib - GUEST_RESERVE_MIB)
        _say(progress, f"{memory_mib} MiB: writing {fill_mb} MiB of guest data")
        t_fill = time.monotonic()
        await _fill(store, name, fill_mb, timeouts)
        fill_s = time.monotonic() - t_fill
        for rnd in range(repeat):
            for mode in modes:
                r = await update(store, name, mode=mode, timeouts=timeouts)
                reports[mode].append(r)
                _say(progress, f"{memory_mib} MiB: round {rnd + 1} {mode}: "
                     f"pause {r.pause_host_ms} ms, total {r.total_seconds:.3f} s, "
                     f"sent {r.bytes_transferred / MB:.2f} MB, "
                     f"peak {r.peak_memory_bytes / MB:.0f} MB")
        size = await _exec(store, name, SIZE_CMD, timeouts.exec)
        if not size.isdigit() or int(size) < fill_mb * MIB:
            raise GuestError(f"{name}: the guest data is gone after the updates: {size}")
    finally:
        await vm.stop(store, name, timeouts=timeouts)
    return {
        "memory_mib": memory_mib, "data_mib": fill_mb, "fill_seconds": round(fill_s, 1),
        "seconds": round(time.monotonic() - t0, 1),
        "modes": {m: {**{k: _median(rs, k) for k in FIGURES}, "runs": len(rs),
                      "reason": rs[0].reason if rs else ""}
                  for m, rs in reports.items()},
    }


def _targets(sizes: list[dict[str, Any]], modes: Sequence[str]) -> list[dict[str, Any]]:
    """The issue's targets for the no-copy modes, checked on the numbers."""
    out: list[dict[str, Any]] = []
    if not sizes:
        return out
    small, big = sizes[0], sizes[-1]
    for mode in (m for m in modes if m in NO_COPY):
        worst_bytes = max(s["modes"][mode]["bytes_transferred"] for s in sizes)
        out.append({"mode": mode, "target": "copies <= 1 MB at every size",
                    "value": f"{worst_bytes / MB:.3f} MB", "ok": worst_bytes <= MB})
        p = big["modes"][mode]["pause_host_ms"]
        out.append({"mode": mode, "target": f"pause <= 50 ms at {big['memory_mib']} MiB",
                    "value": f"{p:.1f} ms" if p is not None else "-",
                    "ok": p is not None and p <= 50})
        t_small = small["modes"][mode]["total_seconds"]
        t_big = big["modes"][mode]["total_seconds"]
        out.append({"mode": mode, "target": f"total at {big['memory_mib']} MiB within 2x of "
                    f"{small['memory_mib']} MiB", "value": f"{t_big / t_small:.2f}x",
                    "ok": t_big <= 2 * t_small})
        worst_ratio = max(s["modes"][mode]["peak_memory_ratio"] for s in sizes)
        at_big = big["modes"][mode]["peak_memory_ratio"]
        out.append({"mode": mode, "target": "peak memory <= 1.1x one VM",
                    "value": f"{at_big:.3f}x at {big['memory_mib']} MiB "
                             f"(worst {worst_ratio:.3f}x)",
                    "ok": at_big <= 1.1})
    if "copy" in modes:
        r = big["modes"]["copy"]["peak_memory_ratio"]
        out.append({"mode": "copy", "target": "needs about 2x memory",
                    "value": f"{r:.2f}x at {big['memory_mib']} MiB", "ok": True})
    return out


async def run(store: Store, sizes_mib: Sequence[int], modes: Sequence[str],
              fill: float = 0.55, repeat: int = 3, progress: bool = True,
              timeouts: Timeouts = DEFAULT) -> dict[str, Any]:
    """Measure every mode at every size; return the medians, ratios and targets."""
    t0 = time.monotonic()
    sizes = [await measure_size(store, m, modes, fill, repeat, progress, timeouts)
             for m in sizes_mib]
    return {"sizes": sizes, "targets": _targets(sizes, modes), "repeat": repeat,
            "fill": fill, "seconds": round(time.monotonic() - t0, 1)}


def _vs_copy(mode: str, f: dict[str, Any], copy: dict[str, Any] | None, key: str) -> str:
    if mode == "copy":
        return "1"
    if not copy or not f[key] or copy[key] is None:
        return "-"
    return f"{ratio(copy[key], f[key]):.1f}x"


def print_result(result: dict[str, Any]) -> None:
    console = Console(width=max(150, Console().width), highlight=False)
    rows = []
    for s in result["sizes"]:
        copy = s["modes"].get("copy")
        for mode, f in s["modes"].items():
            def x(key: str, mode: str = mode, f: dict[str, Any] = f,
                  copy: dict[str, Any] | None = copy) -> str:
                return _vs_copy(mode, f, copy, key)
            rows.append([
                f"{s['memory_mib']}M ({s['data_mib']}M data)", mode,
                f"{f['pause_host_ms']:.1f}" if f["pause_host_ms"] is not None else "-",
                f"{f['pause_qemu_ms']:.0f}" if f["pause_qemu_ms"] is not None else "-",
                f"{f['total_seconds']:.3f}", f"{f['bytes_transferred'] / MB:.2f}",
                f"{f['peak_memory_bytes'] / MB:.0f} ({f['peak_memory_ratio']:.2f}x)",
                x("pause_host_ms"), x("total_seconds"), x("bytes_transferred"),
                x("peak_memory_bytes")])
    print_table(f"vmfork live update (median of {result['repeat']}; "
                "ratios: how many times smaller than copy)",
                ["RAM", "mode", "pause ms (host)", "pause ms (QEMU)", "total s", "sent MB",
                 "peak MB (x one VM)", "pause vs copy", "time vs copy", "bytes vs copy",
                 "memory vs copy"], rows, console)
    print_table("targets", ["mode", "target", "measured", "met"],
                [[t["mode"], t["target"], t["value"], "yes" if t["ok"] else "NO"]
                 for t in result["targets"]], console)
