"""``vmfork bench clone``: cold boot against template clones, in one run.

Measures cold boot to ready, clone to running (fresh process, from the
pool, from warm pool members), clone to responsive (the guest agent
answered, identity applied), and the memory
(PSS) of 1, 10 and 20 clones of a template whose guest holds prepared data,
against as many cold-booted VMs holding the same data. Every figure is
reported with its ratio to the baseline measured in the same run.

Two guests: ``demo`` (busybox initramfs: the data is a file in its RAM root)
and ``debian`` (systemd on a qcow2 overlay: the data goes to tmpfs, and a
smaller part to disk, synced; the disk space of the clones' overlays is
reported against the cold VMs' too).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmfork import vm
from vmfork.bench import fill_guest, pss_bytes, ratio
from vmfork.errors import GuestError, InvalidInput
from vmfork.names import derived, internal
from vmfork.results import CloneResult
from vmfork.store import Store
from vmfork.templates import catalog, clone, create, pool
from vmfork.timeouts import DEFAULT, Timeouts

#: Guests the bench can run (``vmfork run --image``).
IMAGES = ("demo", "debian")


@dataclass
class CloneBench:
    """Parameters of one run."""

    memory_mib: int = 512
    data_mb: int = 200
    counts: tuple[int, ...] = (1, 10, 20)
    samples: int = 5
    cold_samples: int = 2
    accel: str = "auto"
    #: ``demo`` or ``debian`` (see the module docstring).
    image: str = "demo"
    #: MB written to disk and synced, besides *data_mb* in tmpfs (debian only).
    disk_mb: int = 32
    progress: Callable[[str], None] = field(default=lambda _msg: None)

    def check(self) -> None:
        if self.image not in IMAGES:
            raise InvalidInput(f"unknown image {self.image!r}: use one of {', '.join(IMAGES)}")
        counts = list(self.counts)
        if not counts or min(counts) < 1 or counts != sorted(counts):
            raise InvalidInput(f"invalid clone counts {self.counts}: ascending positive "
                               "numbers")
        if self.data_mb < 1 or self.disk_mb < 0:
            raise InvalidInput("the data sizes must be positive")

    def run_options(self, name: str) -> vm.RunOptions:
        return vm.RunOptions(name=name, memory_mib=self.memory_mib, image=self.image,
                             accel=self.accel)

    def data_files(self) -> tuple[tuple[str, int], ...]:
        """(guest path, MB) of the prepared data: in RAM, then on disk."""
        if self.image == "demo":
            return (("/root/data", self.data_mb),)  # the demo root is in RAM
        disk = (("/root/disk-data", self.disk_mb),) if self.disk_mb else ()
        return (("/dev/shm/data", self.data_mb), *disk)


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


async def _fill(store: Store, name: str, p: CloneBench) -> dict[str, str]:
    """Write the prepared data into guest *name* (disk data synced); return
    the md5 of each file."""
    md5s = {path: await fill_guest(store, name, mb, path) for path, mb in p.data_files()}
    if p.image != "demo":
        r = await vm.exec_(store, name, "sync")
        if r.exit_code != 0:
            raise GuestError(f"{name}: sync failed: {(r.stderr or r.stdout).strip()[-200:]}")
    return md5s


async def _sample(store: Store, tname: str, p: CloneBench, kind: str, timeouts: Timeouts,
                  md5s: dict[str, str] | None = None) -> list[CloneResult]:
    """*p.samples* clones of *tname*, each stopped after: from a fresh QEMU
    (*kind* ``fresh``), or from a cold (``pool``) or warm (``warm``) pool
    member refilled before each. Pool kinds return only the clones that got
    a member. With *md5s*, the first clone's guest data is checked."""
    use_pool = kind != "fresh"
    if use_pool:
        await pool.set_pool(store, tname, 1, timeouts, warm=kind == "warm")
    results = []
    for i in range(p.samples):
        p.progress(f"{kind} clone {i + 1}/{p.samples}")
        if use_pool:
            await pool.fill_pool(store, tname, timeouts)
        (r,) = await clone.clone(store, tname, names=[derived(tname, f"-{kind[0]}{i}")],
                                 use_pool=use_pool, timeouts=timeouts)
        results.append(r)
        if i == 0 and md5s is not None:
            await _check_data(store, r.name, md5s, timeouts)
        await vm.stop(store, r.name, timeouts=timeouts)
    if not use_pool:
        return results
    await pool.set_pool(store, tname, 0, timeouts, warm=False)
    return [r for r in results if r.pooled]


async def _check_data(store: Store, name: str, md5s: dict[str, str],
                      timeouts: Timeouts) -> None:
    paths = " ".join(md5s)
    r = await vm.exec_(store, name, f"md5sum {paths}", timeouts=timeouts)
    got = {f: m for m, f in (ln.split() for ln in r.stdout.splitlines() if len(ln.split()) == 2)}
    if r.exit_code != 0 or got != md5s:
        raise GuestError(f"{name}: data md5 {got or r.stderr.strip()[-200:]} differs from the "
                         f"template's {md5s}")


def _disk_bytes(paths: list[Path]) -> int:
    """Allocated bytes of the disk files that exist among *paths*."""
    total = 0
    for f in paths:
        with contextlib.suppress(OSError):
            total += f.stat().st_blocks * 512
    return total


def _vm_disks(store: Store, names: list[str]) -> list[Path]:
    return [f for n in names for f in store.vm_dir(n).glob("*.qcow2")]


async def run(store: Store, p: CloneBench, timeouts: Timeouts = DEFAULT) -> dict[str, Any]:
    p.check()
    tag = secrets.token_hex(2)
    tname = internal("bench", f"clone-{tag}")
    cold_names: list[str] = []
    clone_names: list[str] = []
    out: dict[str, Any] = {"memory_mib": p.memory_mib, "data_mb": p.data_mb,
                           "image": p.image, "data_files": dict(p.data_files())}
    try:
        # Baseline 1: cold boot to ready.
        boots = []
        for i in range(p.cold_samples):
            name = derived(tname, f"-cold{i}")
            p.progress(f"cold boot {i + 1}/{p.cold_samples}")
            t0 = time.monotonic()
            await vm.run(store, p.run_options(name), timeouts)
            boots.append(time.monotonic() - t0)
            cold_names.append(name)
        out["cold_boot_s"] = _median(boots)

        # The template: boot, write the data, freeze.
        p.progress(f"template with guest data {dict(p.data_files())} (MB)")
        build = derived(tname, "-src")
        await vm.run(store, p.run_options(build), timeouts)
        md5s = await _fill(store, build, p)
        manifest = await create.create_from_vm(store, tname, build, timeouts)
        out["template_state_bytes"] = manifest.state_size
        out["template_save_s"] = manifest.save.migration.seconds

        # Clone to running / responsive: fresh processes, pool members, warm ones.
        fresh = await _sample(store, tname, p, "fresh", timeouts)
        out["clone_running_s"] = _median([r.running for r in fresh])
        out["clone_state_loaded_s"] = _median([r.state_loaded for r in fresh])
        out["clone_responsive_s"] = _median([r.responsive for r in fresh])
        pooled = await _sample(store, tname, p, "pool", timeouts)
        out["pool_running_s"] = _median([r.running for r in pooled])
        out["pool_responsive_s"] = _median([r.responsive for r in pooled])
        warm = await _sample(store, tname, p, "warm", timeouts, md5s)
        out["warm_pool_running_s"] = _median([r.running for r in warm])
        out["warm_pool_responsive_s"] = _median([r.responsive for r in warm])

        # Memory of N clones against N cold VMs holding the same data.
        tpl_bytes = _allocated(manifest.memory_file)
        out["template_file_bytes"] = tpl_bytes
        tpl_disks = [Path(d.path) for d in manifest.disks]
        mem_rows = []
        for n in p.counts:
            while len(clone_names) < n:
                name = derived(tname, f"-m{len(clone_names)}")
                await clone.clone(store, tname, names=[name], use_pool=False, timeouts=timeouts)
                clone_names.append(name)
            p.progress(f"{n} clones up")
            while len(cold_names) < n:
                name = derived(tname, f"-cold{len(cold_names)}")
                p.progress(f"cold VM {len(cold_names) + 1}/{n} with data")
                await vm.run(store, p.run_options(name), timeouts)
                cold_names.append(name)
            marker = p.data_files()[-1][0]  # written last
            for name in cold_names[:n]:
                has = await vm.exec_(store, name, f"test -f {marker}", timeouts=timeouts)
                if has.exit_code != 0:
                    await _fill(store, name, p)
            await _check_data(store, clone_names[0], md5s, timeouts)
            clones_pss = pss_bytes(_pids(store, clone_names[:n]))
            cold_pss = pss_bytes(_pids(store, cold_names[:n]))
            # Conservative: the template file counts in full on top of the
            # clones' own PSS (which already includes their share of it).
            clones_total = clones_pss + tpl_bytes
            row = {"count": n, "clones_bytes": clones_total, "clones_pss_bytes": clones_pss,
                   "cold_bytes": cold_pss,
                   "ratio": clones_total / cold_pss if cold_pss else float("nan")}
            if p.image != "demo":
                # Disk space: the clones' overlays plus the template's frozen
                # ones, against the cold VMs' overlays (the base is shared).
                clones_disk = _disk_bytes(_vm_disks(store, clone_names[:n]) + tpl_disks)
                cold_disk = _disk_bytes(_vm_disks(store, cold_names[:n]))
                row.update(clones_disk_bytes=clones_disk, cold_disk_bytes=cold_disk)
            mem_rows.append(row)
        out["memory"] = mem_rows
    finally:
        for name in [*clone_names, *cold_names, derived(tname, "-src")]:
            if store.has_vm(name):
                with contextlib.suppress(Exception):
                    await vm.stop(store, name, force=True, timeouts=timeouts)
        if store.has_template(tname):
            with contextlib.suppress(Exception):
                await catalog.remove(store, tname, force=True, timeouts=timeouts)
    out["ratios"] = {
        "pool_vs_cold_boot": ratio(out["cold_boot_s"], out["pool_running_s"]),
        "clone_vs_cold_boot": ratio(out["cold_boot_s"], out["clone_running_s"]),
        "responsive_vs_cold_boot": ratio(out["cold_boot_s"], out["clone_responsive_s"]),
        "pool_responsive_vs_cold_boot": ratio(out["cold_boot_s"], out["pool_responsive_s"]),
        "warm_pool_responsive_vs_cold_boot": ratio(out["cold_boot_s"],
                                                   out["warm_pool_responsive_s"]),
        "memory_at_max": mem_rows[-1]["ratio"] if mem_rows else float("nan"),
    }
    out["targets"] = {
        "pool_vs_cold_boot>=100": out["ratios"]["pool_vs_cold_boot"] >= 100,
        "responsive_vs_cold_boot>=20 (fresh QEMU)":
            out["ratios"]["responsive_vs_cold_boot"] >= 20,
        "responsive_vs_cold_boot>=20 (warm pool)":
            out["ratios"]["warm_pool_responsive_vs_cold_boot"] >= 20,
        f"memory_{p.counts[-1]}_clones<=0.3": out["ratios"]["memory_at_max"] <= 0.3,
    }
    return out


def _pids(store: Store, names: list[str]) -> list[int]:
    return [pid for n in names if (pid := store.get_vm(n).pid)]


def _allocated(path: str) -> int:
    return os.stat(path).st_blocks * 512


def rows(result: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """Table rows: metric, value, baseline, ratio."""
    cold = result["cold_boot_s"]
    r = [
        ("cold boot to ready", f"{cold:.2f} s", "-", "1x"),
        ("clone to running", f"{result['clone_running_s'] * 1000:.0f} ms", f"{cold:.2f} s",
         f"{result['ratios']['clone_vs_cold_boot']:.0f}x faster"),
        ("pool clone to running", f"{result['pool_running_s'] * 1000:.0f} ms", f"{cold:.2f} s",
         f"{result['ratios']['pool_vs_cold_boot']:.0f}x faster (target 100x)"),
        ("clone to responsive, fresh QEMU", f"{result['clone_responsive_s'] * 1000:.0f} ms",
         f"{cold:.2f} s",
         f"{result['ratios']['responsive_vs_cold_boot']:.0f}x faster (target 20x)"),
        ("clone to responsive, cold pool", f"{result['pool_responsive_s'] * 1000:.0f} ms",
         f"{cold:.2f} s",
         f"{result['ratios']['pool_responsive_vs_cold_boot']:.0f}x faster"),
        ("warm pool clone to running", f"{result['warm_pool_running_s'] * 1000:.0f} ms",
         f"{cold:.2f} s", f"{ratio(cold, result['warm_pool_running_s']):.0f}x faster"),
        ("clone to responsive, warm pool",
         f"{result['warm_pool_responsive_s'] * 1000:.0f} ms", f"{cold:.2f} s",
         f"{result['ratios']['warm_pool_responsive_vs_cold_boot']:.0f}x faster (target 20x)"),
        ("template device state", f"{result['template_state_bytes'] / 1024:.0f} KiB",
         f"{result['memory_mib']} MiB RAM", "-"),
    ]
    for m in result["memory"]:
        r.append((f"memory of {m['count']} clones", f"{m['clones_bytes'] / 2**20:.0f} MiB",
                  f"{m['cold_bytes'] / 2**20:.0f} MiB cold",
                  f"{m['ratio']:.2f}x" + (" (target 0.3x)" if m is result["memory"][-1]
                                          else "")))
    for m in result["memory"]:
        if "clones_disk_bytes" in m:
            cd, cold_d = m["clones_disk_bytes"], m["cold_disk_bytes"]
            r.append((f"disk overlays of {m['count']} clones", f"{cd / 2**20:.0f} MiB",
                      f"{cold_d / 2**20:.0f} MiB cold",
                      f"{cd / cold_d:.2f}x" if cold_d else "-"))
    return r


def title(result: dict[str, Any]) -> str:
    files = ", ".join(f"{mb} MB in {path}" for path, mb in result["data_files"].items())
    return (f"vmfork bench clone ({result['image']} guest, {result['memory_mib']} MiB, "
            f"data: {files})")
