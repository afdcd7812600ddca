"""``vmfork bench fork``: live fork against a fork by full copy, in one run.

Owns the measurements of issue 15's targets, on demo guests holding data in
RAM (``data_mb``, at most the guest's RAM less :data:`GUEST_RESERVE_MIB`):

* **baseline**, at each RAM size: a fork by full copy of the same VM — QMP
  ``stop``, a copy of its memory file's data into a new file next to it
  (holes skipped: :func:`vmfork.fork.pages.sparse_copy`, the fork's own),
  ``cont``. Its pause is the time between QEMU's ``STOP`` and
  ``RESUME`` events (their timestamps, host clock, microseconds); the time
  around the two QMP calls (host monotonic clock) is reported too. The
  device state is not saved, so the baseline is a lower bound of a real
  full-copy fork and its ratios are on the safe side.
* **first fork** (:func:`vmfork.fork.fork`, one child) of the same fresh VM at
  each size: the parent's pause (``ForkReport.parent_pause_ms``), the child's
  ``running_ms``; ratios to the baseline at the same size and of the largest
  size to the smallest.
* **repeated forks** of the parent of ``repeat_mib``: after its first fork,
  D MB dirtied in the guest (a file rewritten), then another fork, for each D;
  the pause and the bytes captured and copied per fork. One more repeated
  fork of the largest parent (``big_dirty_mb`` dirtied) shows that the pause
  follows what was dirtied, not the RAM size.
* **memory**: a fresh VM of ``memory_mib`` forked into ``children`` children
  at once, against ``children + 1`` independent VMs holding the same amount
  of data: host memory of their QEMU processes (private resident memory plus
  the memory files they map, each file counted once:
  :func:`vmfork.update.memory.host_memory`), and their summed PSS.

Every VM, child and fork base the run makes has a name in vmfork's own
namespace (``_bench.fork-<tag>...``) and is removed at the end, also when the
run fails or is cancelled. First forks are one sample each (a VM is forked
for the first time once); the figures of one run are compared with each
other, never with fixed times, except for the issue's targets.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qemu.qmp import EventListener
from rich.console import Console

from vmfork import vm
from vmfork.bench import fill_guest, print_table, pss_bytes, ratio
from vmfork.errors import GuestError, InvalidInput, VmforkError
from vmfork.fork.pages import sparse_copy
from vmfork.fork.run import fork
from vmfork.names import derived, internal
from vmfork.qemu.machine import deadline
from vmfork.qemu.pause import pause_ms
from vmfork.results import ForkReport
from vmfork.store import Store
from vmfork.tasks import finish_in_thread, run_to_end
from vmfork.templates import catalog
from vmfork.timeouts import DEFAULT, Timeouts
from vmfork.update.memory import host_memory

log = logging.getLogger("vmfork.bench")

#: Guest RAM left to the demo guest's kernel and files, besides the data
#: (a 256 MiB demo guest has ~185 MiB free after boot).
GUEST_RESERVE_MIB = 100
#: The demo guest's root (where the data goes) is a tmpfs capped at half
#: its RAM: the cap is lifted first.
GROW_ROOT = "mount -o remount,size=95% /"
#: The file the repeated forks' dirtying rewrites.
DIRTY_FILE = "/root/dirty"
#: The data file (:func:`vmfork.bench.fill_guest`'s default).
DATA_FILE = "/root/data"

#: Targets of issue 15.
PAUSE_TARGET_MS = 50.0        # first fork at PAUSE_TARGET_MIB; repeated forks
PAUSE_TARGET_MIB = 512
FLAT_TARGET = 1.5             # pause at the largest size / at the smallest
REPEAT_DIRTY_TARGET_MB = 32   # repeated forks within PAUSE_TARGET_MS up to this
MEMORY_TARGET = 0.35          # fork family / independent VMs
#: Child running within this many seconds of the request, up to a RAM size.
RUNNING_TARGETS = ((512, 1.0), (4096, 4.0))

@dataclass
class ForkBench:
    """Parameters of one run."""

    sizes_mib: tuple[int, ...] = (256, 512, 4096)
    data_mb: int = 200
    #: The size whose parent is forked again after dirtying each of *dirty_mb*.
    repeat_mib: int = 512
    dirty_mb: tuple[int, ...] = (0, 8, 32, 128)
    #: MB dirtied before the repeated fork of the largest size's parent.
    big_dirty_mb: int = 8
    #: RAM of the VM forked into *children* for the memory comparison.
    memory_mib: int = 512
    children: int = 10
    accel: str = "auto"
    progress: Callable[[str], None] = field(default=lambda _msg: None)

    def check(self) -> None:
        if not self.sizes_mib or list(self.sizes_mib) != sorted(set(self.sizes_mib)):
            raise InvalidInput(f"invalid sizes {self.sizes_mib}: ascending, each once")
        if self.repeat_mib not in self.sizes_mib:
            raise InvalidInput(f"the repeated forks' size {self.repeat_mib} MiB is not one of "
                               f"the sizes {', '.join(f'{s}M' for s in self.sizes_mib)}")
        if self.data_mb < 1:
            raise InvalidInput(f"invalid data size {self.data_mb} MB: at least 1")
        if not self.dirty_mb or min(self.dirty_mb) < 0 or self.big_dirty_mb < 0:
            raise InvalidInput(f"invalid dirty sizes {self.dirty_mb}: MB, 0 or more")
        if self.children < 1:
            raise InvalidInput(f"invalid children count {self.children}: at least 1")
        for mib in (*self.sizes_mib, self.memory_mib):
            if mib - GUEST_RESERVE_MIB < 1:
                raise InvalidInput(f"{mib} MiB leaves no room for guest data")
        room = self.repeat_mib - GUEST_RESERVE_MIB - self.data_at(self.repeat_mib)
        big = max(self.sizes_mib)
        big_room = big - GUEST_RESERVE_MIB - self.data_at(big)
        if max(self.dirty_mb) > room or (big > self.repeat_mib and self.big_dirty_mb > big_room):
            raise InvalidInput(f"dirtying {max(self.dirty_mb)} MB does not fit in a "
                               f"{self.repeat_mib} MiB guest holding "
                               f"{self.data_at(self.repeat_mib)} MB of data")

    def data_at(self, mib: int) -> int:
        """MB of data a guest of *mib* MiB holds."""
        return min(self.data_mb, mib - GUEST_RESERVE_MIB)

    def options(self, name: str, mib: int) -> vm.RunOptions:
        return vm.RunOptions(name=name, memory_mib=mib, image="demo", accel=self.accel)


@dataclass
class _Made:
    """What a run has made, to be removed at its end whatever happens."""

    children: list[str] = field(default_factory=list)
    parents: list[str] = field(default_factory=list)
    bases: list[str] = field(default_factory=list)

    async def remove(self, store: Store, timeouts: Timeouts) -> None:
        """Stop the VMs, then remove the fork bases left; a failure is logged
        and the rest still removed."""
        for name in [*self.children, *self.parents]:
            if store.has_vm(name):
                try:
                    await vm.stop(store, name, force=True, timeouts=timeouts)
                except VmforkError as exc:
                    log.warning("%s: not stopped: %s", name, exc)
        for base in reversed(self.bases):  # newest first: a base may hold an older one
            if store.has_template(base):
                try:
                    await catalog.remove(store, base, force=True, timeouts=timeouts)
                except VmforkError as exc:
                    log.warning("fork base %s: not removed: %s", base, exc)


# -- the baseline: a fork by full copy ----------------------------------------------


async def full_copy_fork(store: Store, name: str, timeouts: Timeouts) -> dict[str, Any]:
    """Pause VM *name*, copy its memory file's data next to it, resume it;
    the copy is removed. Returns the pause by QEMU's events
    (``pause_ms``), by the host's monotonic clock around the QMP calls
    (``pause_call_ms``), and the bytes copied."""
    mem = store.get_vm(name).spec.memory.path
    if not mem:
        raise InvalidInput(f"{name}: has no memory file to copy")
    copy = f"{mem}.bench-copy-{secrets.token_hex(2)}"
    stops, resumes = EventListener("STOP"), EventListener("RESUME")
    try:
        async with vm.attached(store, name, timeouts) as (_rec, m):
            with m.events.listen(stops, resumes):
                t0 = time.monotonic()
                await m.qmp("stop")
                try:
                    copied = await finish_in_thread(sparse_copy, Path(mem), Path(copy))
                finally:
                    await run_to_end(m.qmp("cont"))
                t1 = time.monotonic()
                # RESUME comes before cont's answer; STOP before stop's.
                await deadline(_wait_event(resumes), timeouts.qmp,
                               f"the RESUME event of {name}")
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(copy)
    return {"pause_ms": pause_ms(stops, resumes), "pause_call_ms": (t1 - t0) * 1000,
            "copied_bytes": copied}


async def _wait_event(listener: EventListener) -> None:
    while not listener.history:
        await asyncio.sleep(0.001)


# -- forks and guest data -------------------------------------------------------------


async def _boot_with_data(store: Store, name: str, mib: int, p: ForkBench,
                          timeouts: Timeouts) -> str:
    """Boot demo VM *name* and fill its RAM with the data; return the data's md5."""
    p.progress(f"{name}: boot ({mib} MiB), {p.data_at(mib)} MB of data")
    await vm.run(store, p.options(name, mib), timeouts)
    await _guest(store, name, GROW_ROOT, timeouts)
    return await fill_guest(store, name, p.data_at(mib), DATA_FILE)


async def _guest(store: Store, name: str, command: str, timeouts: Timeouts) -> str:
    r = await vm.exec_(store, name, command, timeouts=timeouts)
    if r.exit_code != 0:
        raise GuestError(f"{name}: {command!r} failed: {(r.stderr or r.stdout).strip()[-200:]}")
    return r.stdout.strip()


async def _fork(store: Store, parent: str, count: int, made: _Made,
                timeouts: Timeouts) -> ForkReport:
    """Fork *parent* into *count* children, named after it (recorded in
    *made* before the fork, so a failure half-way leaves nothing)."""
    names: list[str] = []
    k = len(made.children)
    while len(names) < count:
        name = derived(parent, f"-c{k}")
        k += 1
        if not store.has_vm(name):
            names.append(name)
    made.children.extend(names)
    report = await fork(store, parent, names=names, timeouts=timeouts)
    made.bases.append(report.base)
    return report


def _fork_figures(r: ForkReport) -> dict[str, Any]:
    running = [c.running_ms for c in r.children]
    return {"parent_pause_ms": r.parent_pause_ms,
            "child_running_ms": max(running) if running else None,
            "child_responsive_ms": max((c.responsive_ms for c in r.children), default=None),
            "captured_bytes": r.captured_bytes, "base_copy_bytes": r.base_copy_bytes,
            "ram_bytes_written": r.ram_bytes_written, "state_bytes": r.state_bytes,
            "prepare_ms": r.prepare_ms, "total_ms": r.total_ms, "children": len(r.children)}


async def _stop_children(store: Store, r: ForkReport, timeouts: Timeouts) -> None:
    for c in r.children:
        await vm.stop(store, c.name, timeouts=timeouts)


async def _dirty(store: Store, name: str, mb: int, timeouts: Timeouts) -> None:
    """Have the guest write *mb* MB anew (the dirty file rewritten)."""
    await _guest(store, name, f"rm -f {DIRTY_FILE}", timeouts)
    if mb:
        await fill_guest(store, name, mb, DIRTY_FILE)


async def _check_md5(store: Store, name: str, md5: str, timeouts: Timeouts) -> None:
    got = (await _guest(store, name, f"md5sum {DATA_FILE}", timeouts)).split()
    if not got or got[0] != md5:
        raise GuestError(f"{name}: {DATA_FILE} has md5 {got[:1]}, the parent's was {md5}")


# -- memory -------------------------------------------------------------------------------


def _mapped_files(pids: Iterable[int], dirs: set[Path]) -> set[str]:
    """Files in *dirs* that processes *pids* map (their guest memory files)."""
    found: set[str] = set()
    for pid in pids:
        with contextlib.suppress(OSError), open(f"/proc/{pid}/maps") as f:
            for line in f:
                parts = line.split(maxsplit=5)
                if len(parts) == 6 and parts[5].startswith("/"):
                    path = Path(parts[5].rstrip("\n"))
                    if path.parent in dirs:
                        found.add(str(path))
    return found


def family_memory(store: Store, names: Sequence[str]) -> dict[str, int]:
    """Host memory of the QEMU processes of VMs *names*: their private
    resident memory plus each memory file they map, once
    (``bytes``), and their summed PSS (``pss_bytes``)."""
    recs = [store.get_vm(n) for n in names]
    pids = tuple(r.pid for r in recs if r.pid)
    files = {r.spec.memory.path for r in recs if r.spec.memory.path}
    dirs = {Path(f).parent for f in files}
    files |= _mapped_files(pids, dirs)
    return {"bytes": host_memory(pids, tuple(sorted(files))), "pss_bytes": pss_bytes(pids),
            "processes": len(pids), "memory_files": len(files)}


async def _memory_part(store: Store, tag: str, p: ForkBench, made: _Made,
                       timeouts: Timeouts) -> dict[str, Any]:
    mib = p.memory_mib
    parent = internal("bench", f"fork-{tag}-mem")
    made.parents.append(parent)
    md5 = await _boot_with_data(store, parent, mib, p, timeouts)
    p.progress(f"{parent}: fork into {p.children} children")
    r = await _fork(store, parent, p.children, made, timeouts)
    await _check_md5(store, r.children[0].name, md5, timeouts)
    family = family_memory(store, [parent, *(c.name for c in r.children)])
    cold: list[str] = []
    for i in range(p.children + 1):
        name = internal("bench", f"fork-{tag}-cold{i}")
        made.parents.append(name)
        await _boot_with_data(store, name, mib, p, timeouts)
        cold.append(name)
    independent = family_memory(store, cold)
    return {"memory_mib": mib, "data_mb": p.data_at(mib), "children": p.children,
            "fork": _fork_figures(r), "family": family, "independent": independent,
            "ratio": family["bytes"] / independent["bytes"] if independent["bytes"] else None,
            "pss_ratio": (family["pss_bytes"] / independent["pss_bytes"]
                          if independent["pss_bytes"] else None)}


# -- the run ------------------------------------------------------------------------------


async def run(store: Store, p: ForkBench, timeouts: Timeouts = DEFAULT) -> dict[str, Any]:
    """Measure everything (see the module); return the figures, their ratios
    and the targets, each with whether it was met."""
    p.check()
    t0 = time.monotonic()
    tag = secrets.token_hex(2)
    made = _Made()
    sizes: list[dict[str, Any]] = []
    repeated: list[dict[str, Any]] = []
    try:
        for mib in p.sizes_mib:
            parent = internal("bench", f"fork-{tag}-{mib}")
            made.parents.append(parent)
            await _boot_with_data(store, parent, mib, p, timeouts)
            p.progress(f"{parent}: fork by full copy (baseline)")
            base = await full_copy_fork(store, parent, timeouts)
            p.progress(f"{parent}: first fork")
            r = await _fork(store, parent, 1, made, timeouts)
            first = _fork_figures(r)
            await _stop_children(store, r, timeouts)
            sizes.append({"memory_mib": mib, "data_mb": p.data_at(mib), "baseline": base,
                          "first_fork": first,
                          "pause_vs_baseline": _ratio(base["pause_ms"],
                                                      first["parent_pause_ms"])})
            dirties = (p.dirty_mb if mib == p.repeat_mib
                       else (p.big_dirty_mb,) if mib == max(p.sizes_mib) else ())
            for mb in dirties:
                p.progress(f"{parent}: {mb} MB dirtied, fork again")
                await _dirty(store, parent, mb, timeouts)
                r = await _fork(store, parent, 1, made, timeouts)
                repeated.append({"memory_mib": mib, "dirty_mb": mb, **_fork_figures(r)})
                await _stop_children(store, r, timeouts)
            await vm.stop(store, parent, timeouts=timeouts)
        memory = await _memory_part(store, tag, p, made, timeouts)
    finally:
        p.progress("removing the bench's VMs and fork bases")
        await run_to_end(made.remove(store, timeouts))
    out: dict[str, Any] = {"data_mb": p.data_mb, "accel": p.accel, "sizes": sizes,
                           "repeated": repeated, "memory": memory}
    out["ratios"] = _ratios(out)
    out["targets"] = targets(out, p)
    out["seconds"] = round(time.monotonic() - t0, 1)
    return out


def _ratio(baseline: float | None, value: float | None) -> float | None:
    if baseline is None or value is None:
        return None
    return ratio(baseline, value)


def _ratios(out: dict[str, Any]) -> dict[str, float | None]:
    sizes = out["sizes"]
    small, big = sizes[0], sizes[-1]
    pauses = [s["first_fork"]["parent_pause_ms"] for s in (small, big)]
    r: dict[str, float | None] = {
        "first_pause_largest_vs_smallest": pauses[1] / pauses[0] if pauses[0] else None,
        "memory_family_vs_independent": out["memory"]["ratio"],
    }
    for s in sizes:
        r[f"baseline_vs_fork_pause_{s['memory_mib']}"] = s["pause_vs_baseline"]
    return r


def _running_limit(mib: int) -> float | None:
    return next((s for top, s in RUNNING_TARGETS if mib <= top), None)


def targets(out: dict[str, Any], p: ForkBench) -> list[dict[str, Any]]:
    """The issue's targets that the run's figures can decide."""
    t: list[dict[str, Any]] = []

    def add(target: str, value: str, ok: bool) -> None:
        t.append({"target": target, "measured": value, "ok": ok})

    by_size = {s["memory_mib"]: s for s in out["sizes"]}
    at = by_size.get(PAUSE_TARGET_MIB)
    if at:
        ms = at["first_fork"]["parent_pause_ms"]
        add(f"first fork: pause <= {PAUSE_TARGET_MS:g} ms at {PAUSE_TARGET_MIB} MiB",
            f"{ms:.1f} ms", ms <= PAUSE_TARGET_MS)
    if len(by_size) > 1:
        small, big = out["sizes"][0], out["sizes"][-1]
        x = out["ratios"]["first_pause_largest_vs_smallest"]
        add(f"first fork: pause at {big['memory_mib']} MiB <= {FLAT_TARGET}x "
            f"{small['memory_mib']} MiB",
            f"{x:.2f}x" if x is not None else "-", x is not None and x <= FLAT_TARGET)
    for s in out["sizes"]:
        limit = _running_limit(s["memory_mib"])
        if limit is not None:
            ms = s["first_fork"]["child_running_ms"]
            add(f"first fork: child running <= {limit:g} s at {s['memory_mib']} MiB",
                f"{ms / 1000:.3f} s", ms <= limit * 1000)
    for rp in out["repeated"]:
        if rp["dirty_mb"] <= REPEAT_DIRTY_TARGET_MB:
            ms = rp["parent_pause_ms"]
            add(f"repeated fork: pause <= {PAUSE_TARGET_MS:g} ms at {rp['memory_mib']} MiB, "
                f"{rp['dirty_mb']} MB dirtied", f"{ms:.1f} ms", ms <= PAUSE_TARGET_MS)
    small_r = {rp["dirty_mb"]: rp for rp in out["repeated"] if rp["memory_mib"] == p.repeat_mib}
    for rp in out["repeated"]:
        ref = small_r.get(rp["dirty_mb"])
        if rp["memory_mib"] != p.repeat_mib and ref:
            x = rp["parent_pause_ms"] / ref["parent_pause_ms"]
            add(f"repeated fork: pause at {rp['memory_mib']} MiB <= {FLAT_TARGET}x "
                f"{p.repeat_mib} MiB ({rp['dirty_mb']} MB dirtied)", f"{x:.2f}x",
                x <= FLAT_TARGET)
    m = out["memory"]
    x = m["ratio"]
    add(f"memory: parent + {m['children']} children <= {MEMORY_TARGET}x "
        f"{m['children'] + 1} independent VMs", f"{x:.3f}x" if x is not None else "-",
        x is not None and x <= MEMORY_TARGET)
    return t


# -- output ---------------------------------------------------------------------------------


def _ms(v: float | None) -> str:
    return f"{v:.1f}" if v is not None else "-"


def _mb(v: int | None) -> str:
    return f"{v / 1e6:.1f}" if v is not None else "-"


def print_report(result: dict[str, Any]) -> None:
    console = Console(width=max(140, Console().width), highlight=False)
    print_table("vmfork bench fork: first fork against a fork by full copy (ms; "
                "ratio: how many times shorter the fork's pause is)",
                ["RAM", "data MB", "full copy: pause (events)", "(around QMP)", "copied MB",
                 "fork: parent pause", "ratio", "child running", "child responsive",
                 "captured MB", "prepare"],
                [[f"{s['memory_mib']}M", s["data_mb"], _ms(s["baseline"]["pause_ms"]),
                  _ms(s["baseline"]["pause_call_ms"]), _mb(s["baseline"]["copied_bytes"]),
                  _ms(s["first_fork"]["parent_pause_ms"]),
                  f"{s['pause_vs_baseline']:.1f}x" if s["pause_vs_baseline"] else "-",
                  _ms(s["first_fork"]["child_running_ms"]),
                  _ms(s["first_fork"]["child_responsive_ms"]),
                  _mb(s["first_fork"]["captured_bytes"]), _ms(s["first_fork"]["prepare_ms"])]
                 for s in result["sizes"]], console)
    print_table("repeated forks: the parent dirtied D MB since its previous fork",
                ["RAM", "D (MB)", "parent pause ms", "captured MB", "base copy MB",
                 "prepare ms", "child running ms"],
                [[f"{r['memory_mib']}M", r["dirty_mb"], _ms(r["parent_pause_ms"]),
                  _mb(r["captured_bytes"]), _mb(r["base_copy_bytes"]), _ms(r["prepare_ms"]),
                  _ms(r["child_running_ms"])] for r in result["repeated"]], console)
    m = result["memory"]
    fam, ind = m["family"], m["independent"]
    print_table(f"memory: a {m['memory_mib']} MiB VM holding {m['data_mb']} MB, forked into "
                f"{m['children']} children, against {m['children'] + 1} independent VMs",
                ["", "fork family", "independent VMs", "ratio"],
                [["host memory (private + memory files once), MB", _mb(fam["bytes"]),
                  _mb(ind["bytes"]), f"{m['ratio']:.3f}x" if m["ratio"] else "-"],
                 ["summed PSS, MB", _mb(fam["pss_bytes"]), _mb(ind["pss_bytes"]),
                  f"{m['pss_ratio']:.3f}x" if m["pss_ratio"] else "-"],
                 ["fork of all children: parent pause ms / last child running ms",
                  f"{_ms(m['fork']['parent_pause_ms'])} / {_ms(m['fork']['child_running_ms'])}",
                  "-", "-"]], console)
    print_table("targets", ["target", "measured", "met"],
                [[x["target"], x["measured"], "yes" if x["ok"] else "NO"]
                 for x in result["targets"]], console)


__all__ = ["ForkBench", "family_memory", "full_copy_fork", "print_report", "run",
           "targets"]
