"""``vmfork bench clone``: cold boot against template clones, in one run.

Measures cold boot to ready, clone to running (fresh process and from the
warm pool), clone to responsive (the guest agent answered), and the memory
(PSS) of 1, 10 and 20 clones of a template whose guest holds prepared data,
against as many cold-booted VMs holding the same data. Every figure is
reported with its ratio to the baseline measured in the same run.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import template as tpl
from . import vm
from .bench import fill_guest, pss_bytes, ratio
from .errors import GuestError
from .store import Store
from .timeouts import DEFAULT, Timeouts


@dataclass
class CloneBench:
    """Parameters of one run."""

    memory_mib: int = 512
    data_mb: int = 200
    counts: tuple[int, ...] = (1, 10, 20)
    samples: int = 5
    cold_samples: int = 2
    accel: str = "auto"
    progress: Callable[[str], None] = field(default=lambda _msg: None)


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


async def run(store: Store, p: CloneBench, timeouts: Timeouts = DEFAULT) -> dict[str, Any]:
    tag = secrets.token_hex(2)
    tname = f"bench-{tag}"
    cold_names: list[str] = []
    clone_names: list[str] = []
    out: dict[str, Any] = {"memory_mib": p.memory_mib, "data_mb": p.data_mb}
    try:
        # Baseline 1: cold boot to ready.
        boots = []
        for i in range(p.cold_samples):
            name = f"{tname}-cold{i}"
            p.progress(f"cold boot {i + 1}/{p.cold_samples}")
            t0 = time.monotonic()
            await vm.run(store, vm.RunOptions(name=name, memory_mib=p.memory_mib, demo=True,
                                              accel=p.accel), timeouts)
            boots.append(time.monotonic() - t0)
            cold_names.append(name)
        out["cold_boot_s"] = _median(boots)

        # The template: boot, write the data, freeze.
        p.progress(f"template with {p.data_mb} MB of guest data")
        build = f"{tname}-src"
        await vm.run(store, vm.RunOptions(name=build, memory_mib=p.memory_mib, demo=True,
                                          accel=p.accel), timeouts)
        md5 = await fill_guest(store, build, p.data_mb)
        manifest = await tpl.create_from_vm(store, tname, build, timeouts)
        out["template_state_bytes"] = manifest["state_size"]
        out["template_save_s"] = manifest["save"]["seconds"]

        # Clone to running / responsive, fresh processes.
        fresh = []
        for i in range(p.samples):
            p.progress(f"clone {i + 1}/{p.samples}")
            (r,) = await tpl.clone(store, tname, names=[f"{tname}-f{i}"], use_pool=False,
                                   timeouts=timeouts)
            fresh.append(r)
            await vm.stop(store, r.name, timeouts=timeouts)
        out["clone_running_s"] = _median([r.running for r in fresh])
        out["clone_state_loaded_s"] = _median([r.state_loaded for r in fresh])
        out["clone_responsive_s"] = _median([r.responsive for r in fresh])

        # From the warm pool.
        pooled = []
        await tpl.set_pool(store, tname, 1, timeouts)
        for i in range(p.samples):
            p.progress(f"pool clone {i + 1}/{p.samples}")
            await tpl.fill_pool(store, tname, timeouts)
            (r,) = await tpl.clone(store, tname, names=[f"{tname}-p{i}"], timeouts=timeouts)
            pooled.append(r)
            await vm.stop(store, r.name, timeouts=timeouts)
        await tpl.set_pool(store, tname, 0, timeouts)
        out["pool_running_s"] = _median([r.running for r in pooled if r.pooled])
        out["pool_responsive_s"] = _median([r.responsive for r in pooled if r.pooled])

        # Memory of N clones against N cold VMs holding the same data.
        tpl_bytes = _allocated(manifest["memory_file"])
        out["template_file_bytes"] = tpl_bytes
        mem_rows = []
        for n in p.counts:
            while len(clone_names) < n:
                name = f"{tname}-m{len(clone_names)}"
                await tpl.clone(store, tname, names=[name], use_pool=False, timeouts=timeouts)
                clone_names.append(name)
            p.progress(f"{n} clones up")
            while len(cold_names) < n:
                name = f"{tname}-cold{len(cold_names)}"
                p.progress(f"cold VM {len(cold_names) + 1}/{n} with data")
                await vm.run(store, vm.RunOptions(name=name, memory_mib=p.memory_mib,
                                                  demo=True, accel=p.accel), timeouts)
                cold_names.append(name)
            for name in cold_names[:n]:
                has = await vm.exec_(store, name, "test -f /root/data", timeouts=timeouts)
                if has.status != 0:
                    await fill_guest(store, name, p.data_mb)
            check = await vm.exec_(store, clone_names[0], "md5sum /root/data | cut -d' ' -f1",
                                   timeouts=timeouts)
            if check.text.strip() != md5:
                raise GuestError(f"{clone_names[0]}: data md5 {check.text.strip()} differs "
                                 f"from the template's {md5}")
            clones_pss = pss_bytes(_pids(store, clone_names[:n]))
            cold_pss = pss_bytes(_pids(store, cold_names[:n]))
            # Conservative: the template file counts in full on top of the
            # clones' own PSS (which already includes their share of it).
            clones_total = clones_pss + tpl_bytes
            mem_rows.append({"count": n, "clones_bytes": clones_total,
                             "clones_pss_bytes": clones_pss, "cold_bytes": cold_pss,
                             "ratio": clones_total / cold_pss if cold_pss else float("nan")})
        out["memory"] = mem_rows
    finally:
        for name in [*clone_names, *cold_names, f"{tname}-src"]:
            if store.has_vm(name):
                with contextlib.suppress(Exception):
                    await vm.stop(store, name, force=True, timeouts=timeouts)
        if store.has_template(tname):
            with contextlib.suppress(Exception):
                await tpl.remove(store, tname, force=True, timeouts=timeouts)
    out["ratios"] = {
        "pool_vs_cold_boot": ratio(out["cold_boot_s"], out["pool_running_s"]),
        "clone_vs_cold_boot": ratio(out["cold_boot_s"], out["clone_running_s"]),
        "responsive_vs_cold_boot": ratio(out["cold_boot_s"], out["clone_responsive_s"]),
        "memory_at_max": mem_rows[-1]["ratio"] if mem_rows else float("nan"),
    }
    out["targets"] = {
        "pool_vs_cold_boot>=100": out["ratios"]["pool_vs_cold_boot"] >= 100,
        "responsive_vs_cold_boot>=20": out["ratios"]["responsive_vs_cold_boot"] >= 20,
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
        ("clone to responsive", f"{result['clone_responsive_s'] * 1000:.0f} ms",
         f"{cold:.2f} s",
         f"{result['ratios']['responsive_vs_cold_boot']:.0f}x faster (target 20x)"),
        ("template device state", f"{result['template_state_bytes'] / 1024:.0f} KiB",
         f"{result['memory_mib']} MiB RAM", "-"),
    ]
    for m in result["memory"]:
        r.append((f"memory of {m['count']} clones", f"{m['clones_bytes'] / 2**20:.0f} MiB",
                  f"{m['cold_bytes'] / 2**20:.0f} MiB cold",
                  f"{m['ratio']:.2f}x" + (" (target 0.3x)" if m is result["memory"][-1]
                                          else "")))
    return r
