"""``vmfork bench save``: vmfork save/restore against a full-RAM save, in one run.

For each guest RAM size (default 256M, 1G, 4G) one demo VM runs with its
memory file on disk (``--persistent``) and a share of its RAM filled with
incompressible data. Measured, all with the data intact afterwards (md5):

* vmfork save and restore (device state only, same memory file), median of
  a few cycles in steady state: the guest has been running, so the kernel has
  written most of its dirty pages back already;
* the first save right after the data was written (``cold``): it also flushes
  what the kernel had not written back yet (reported, no target);
* the baseline: a classic migration of all RAM to a file (no
  ``x-ignore-shared``), fsynced like vmfork's save, and its restore into a
  fresh QEMU on a new memory file.

Targets: save and restore at the largest size within 1.5x of the smallest;
vmfork save >= 20x faster than the full-RAM save at the largest size; state
file <= 1 MB.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from vmfork import vm
from vmfork.bench import fill_guest, ratio
from vmfork.errors import GuestError, InvalidInput, MigrationError
from vmfork.files import fsync_path
from vmfork.launch import Launch, Transient
from vmfork.names import derived, internal
from vmfork.private import DIR_MODE
from vmfork.qemu import migration
from vmfork.records import VMRecord
from vmfork.snapshots import save as saving
from vmfork.spec import MemorySpec
from vmfork.store import Store
from vmfork.timeouts import DEFAULT, Timeouts

STATE_LIMIT = 1_000_000


@dataclass
class SaveBench:
    """Parameters of one run."""

    sizes_mib: tuple[int, ...] = (256, 1024, 4096)
    fill: float = 0.5
    samples: int = 3
    accel: str = "auto"
    progress: Callable[[str], None] = field(default=lambda _msg: None)


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


async def run(store: Store, p: SaveBench, timeouts: Timeouts = DEFAULT) -> dict[str, Any]:
    if not 0 < p.fill <= 0.8:
        raise InvalidInput(f"invalid fill {p.fill}: must be above 0 and at most 0.8")
    tag = secrets.token_hex(2)
    bdir = store.home / f"bench-save-{tag}"
    bdir.mkdir(mode=DIR_MODE, parents=True)
    rows = []
    t0 = time.monotonic()
    try:
        for mib in p.sizes_mib:
            rows.append(await _one_size(store, internal("bench", f"save-{tag}-{mib}"), mib, bdir,
                                        p, timeouts))
    finally:
        shutil.rmtree(bdir, ignore_errors=True)
    return {"rows": rows, **_targets(rows), "fill": p.fill, "samples": p.samples,
            "bench_seconds": round(time.monotonic() - t0, 1)}


async def _one_size(store: Store, name: str, mib: int, bdir: Path, p: SaveBench,
                    timeouts: Timeouts) -> dict[str, Any]:
    data_mb = int(mib * p.fill)
    row: dict[str, Any] = {"memory_mib": mib, "data_mb": data_mb}
    p.progress(f"{mib} MiB: boot")
    await vm.run(store, vm.RunOptions(name=name, memory_mib=mib, demo=True, accel=p.accel,
                                      persistent=True), timeouts)
    try:
        # The demo guest's rootfs is a tmpfs capped at half of RAM: lift the cap.
        await vm.exec_(store, name, "mount -o remount,size=90% /", timeouts=timeouts)
        p.progress(f"{mib} MiB: write {data_mb} MB of guest data")
        t = time.monotonic()
        try:
            md5 = await fill_guest(store, name, data_mb)
        except GuestError:  # the answer was lost in transit; the data is written
            md5 = (await vm.exec_(store, name, "md5sum /root/data", timeout=timeouts.checksum,
                                  timeouts=timeouts)).stdout.split()[0]
        row["fill_s"] = time.monotonic() - t

        p.progress(f"{mib} MiB: vmfork save/restore")
        cold = await saving.save(store, name, timeouts)
        row["cold_save_s"] = cold.seconds
        row["cold_preflush_s"] = cold.preflush_seconds
        await saving.restore(store, name, timeouts)
        saves, downs, restores, responsive, states = [], [], [], [], []
        for _ in range(p.samples):
            s = await saving.save(store, name, timeouts)
            r = await saving.restore(store, name, timeouts)
            saves.append(s.seconds)
            downs.append(s.downtime_seconds)
            states.append(s.state_size)
            restores.append(r.running_seconds)
            responsive.append(r.seconds)
        row.update(save_s=_median(saves), save_downtime_s=_median(downs),
                   restore_s=_median(restores), restore_clock_s=_median(responsive),
                   state_bytes=max(states))
        got = (await vm.exec_(store, name, "md5sum /root/data", timeout=timeouts.checksum,
                              timeouts=timeouts)).stdout
        row["data_intact"] = md5 in got

        p.progress(f"{mib} MiB: full-RAM save/restore (baseline)")
        row.update(await _full_ram(store, name, md5, bdir, timeouts))
    finally:
        with contextlib.suppress(Exception):
            await vm.stop(store, name, force=True)
    if not (row["data_intact"] and row["full_data_intact"]):
        raise MigrationError(f"{name}: guest data changed across save/restore")
    return row


async def _full_ram(store: Store, name: str, md5: str, bdir: Path,
                    timeouts: Timeouts) -> dict[str, Any]:
    """Classic migration of all RAM to a file (fsynced) and its restore into a
    new QEMU on a fresh memory file; the VM itself keeps running."""
    path = bdir / f"{name}-full.mig"
    async with vm.attached(store, name, timeouts) as (rec, m):
        t0 = time.monotonic()
        await m.pause()
        await migration.set_capabilities(m, x_ignore_shared=False)
        await migration.set_parameters(m, mode="normal")
        stats = await migration.migrate(m, {"uri": f"file:{path}"}, timeouts.ram_copy,
                                        "full-RAM save")
        await asyncio.to_thread(fsync_path, path)
        save_s = time.monotonic() - t0
        await m.resume()
    rname = derived(name, "-full")
    spec = rec.spec.with_(name=rname, memory=MemorySpec(
        backend="file", path=str(vm.memory_file_path(bdir, rname)), share=True))
    frec = VMRecord(name=rname, spec=spec, state="starting")
    t0 = time.monotonic()
    m2 = await Launch(store, Transient(rname), spec,
                      timeouts=timeouts).spawn(incoming=("defer",))
    try:
        await migration.set_capabilities(m2, x_ignore_shared=False)
        await migration.start_incoming(m2, f"file:{path}")
        await migration.wait_incoming(m2, timeouts.ram_copy)
        await m2.resume()
        restore_s = time.monotonic() - t0
        r = await vm.agent_for(store, frec, timeouts).exec("md5sum /root/data",
                                                           timeouts.checksum)
        intact = md5 in r.stdout
    finally:
        await m2.shutdown()
        with contextlib.suppress(FileNotFoundError):
            Path(str(spec.memory.path)).unlink()
        shutil.rmtree(store.run_dir(rname), ignore_errors=True)
        size = path.stat().st_size if path.exists() else 0
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    return {"full_save_s": save_s, "full_state_bytes": size, "full_restore_s": restore_s,
            "full_data_intact": intact, "full_ram_bytes": stats.ram_bytes}


def _targets(rows: list[dict[str, Any]]) -> dict[str, Any]:
    if not rows:
        return {"ratios": {}, "targets": {}}
    small, big = rows[0], rows[-1]
    r = {
        "save_big_vs_small": big["save_s"] / small["save_s"],
        "restore_big_vs_small": big["restore_s"] / small["restore_s"],
        "full_save_vs_save_big": ratio(big["full_save_s"], big["save_s"]),
        "full_restore_vs_restore_big": ratio(big["full_restore_s"], big["restore_s"]),
        "max_state_bytes": max(x["state_bytes"] for x in rows),
    }
    big_m, small_m = big["memory_mib"], small["memory_mib"]
    targets = {
        f"save_{big_m}M<=1.5x_{small_m}M": r["save_big_vs_small"] <= 1.5,
        f"restore_{big_m}M<=1.5x_{small_m}M": r["restore_big_vs_small"] <= 1.5,
        f"save>=20x_faster_than_full_at_{big_m}M": r["full_save_vs_save_big"] >= 20,
        "state_file<=1MB": r["max_state_bytes"] <= STATE_LIMIT,
    }
    return {"ratios": r, "targets": targets}


#: Report lines: label, key, format.
_REPORT = (
    ("guest data (MB)", "data_mb", "{:.0f}"),
    ("vmfork save (s)", "save_s", "{:.3f}"),
    ("  of which paused (s)", "save_downtime_s", "{:.3f}"),
    ("vmfork restore, running (s)", "restore_s", "{:.3f}"),
    ("  + guest clock set (s)", "restore_clock_s", "{:.3f}"),
    ("state file (KiB)", "state_bytes", "kib"),
    ("cold save, just after writing (s)", "cold_save_s", "{:.3f}"),
    ("full-RAM save + fsync (s)", "full_save_s", "{:.2f}"),
    ("full-RAM restore, running (s)", "full_restore_s", "{:.2f}"),
    ("full-RAM state file (MiB)", "full_state_bytes", "mib"),
)


def _cell(v: Any, f: str) -> str:
    if f == "kib":
        return f"{v / 1024:.0f}"
    if f == "mib":
        return f"{v / 1048576:.0f}"
    return f.format(v)


def print_report(result: dict[str, Any], console: Console | None = None) -> None:
    c = console or Console()
    rows = result["rows"]
    t = Table("", *(f"{x['memory_mib']}M" for x in rows),
              title="vmfork save/restore vs full-RAM save")
    for label, key, f in _REPORT:
        t.add_row(label, *(_cell(x[key], f) for x in rows))
    t.add_row("save: times faster than full", *(
        f"{ratio(x['full_save_s'], x['save_s']):.0f}x" for x in rows))
    t.add_row("restore: times faster than full", *(
        f"{ratio(x['full_restore_s'], x['restore_s']):.0f}x" for x in rows))
    c.print(t)
    for k, v in result["ratios"].items():
        c.print(f"{k}: {v:.2f}" if isinstance(v, float) else f"{k}: {v}")
    for k, ok in result["targets"].items():
        c.print(f"target {k}: {'met' if ok else 'MISSED'}")
