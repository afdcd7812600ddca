"""CLI commands for live update (vmfork update, vmfork bench update)."""

from __future__ import annotations

import dataclasses

import click

from vmfork.bench import update as bench_update
from vmfork.cli import bench, emit_json, main, out, run_async, store
from vmfork.spec import parse_memory_list
from vmfork.timeouts import DEFAULT
from vmfork.update.live import update
from vmfork.update.modes import MODES


def _mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:.2f} MB"


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f} ms"


@main.command("update")
@click.argument("name")
@click.option("--qemu", help="QEMU binary for the new process [default: the VM's].")
@click.option("--mode", type=click.Choice(MODES), default="auto", show_default=True,
              help="cpr-transfer and ignore-shared copy no RAM; copy (for clones, whose "
                   "RAM is private) needs twice the guest memory while it runs.")
@click.option("--timeout", type=float, default=None,
              help="Seconds the move may take before it is rolled back "
                   f"[default: {DEFAULT.migrate:g}].")
@click.option("--json", "as_json", is_flag=True)
def update_cmd(name: str, qemu: str | None, mode: str, timeout: float | None,
               as_json: bool) -> None:
    """Move VM NAME's guest into a new QEMU process (live update).

    The VM keeps its name, console and exec. If anything fails, the old QEMU
    keeps running the guest and the command fails naming the cause. An
    earlier update that was interrupted is finished or undone first.
    """
    timeouts = DEFAULT
    if timeout is not None:
        timeouts = dataclasses.replace(timeouts, migrate=timeout)
    r = run_async(update(store(), name, qemu=qemu, mode=mode, timeouts=timeouts))
    if as_json:
        emit_json(r.to_dict())
        return
    out.print(f"{name}: updated ({r.mode}), QEMU pid {r.old_pid} -> {r.new_pid} "
              f"({r.qemu_version_before} -> {r.qemu_version_after})")
    out.print(f"  guest paused {_ms(r.pause_host_ms)} (QEMU reports {_ms(r.pause_qemu_ms)}), "
              f"total {r.total_seconds:.3f} s, sent {_mb(r.bytes_transferred)} "
              f"(RAM {_mb(r.ram_bytes_copied)}), peak memory {_mb(r.peak_memory_bytes)} "
              f"= {r.peak_memory_ratio:.2f}x one VM")
    for w in r.warnings:
        out.print(f"  warning: {w}")


@bench.command("update")
@click.option("--sizes", default="256M,1G,4G", show_default=True,
              help="Guest RAM sizes, comma separated.")
@click.option("--fill", default=0.55, show_default=True, type=float,
              help="Share of guest RAM filled with data.")
@click.option("--repeat", default=3, show_default=True, type=int,
              help="Updates per mode and size (the median is reported).")
@click.option("--modes", default="cpr-transfer,ignore-shared,copy", show_default=True)
@click.option("--json", "as_json", is_flag=True)
def bench_update_cmd(sizes: str, fill: float, repeat: int, modes: str, as_json: bool) -> None:
    """Live update in each mode at several RAM sizes, with ratios to copy."""
    size_list = list(parse_memory_list(sizes))
    mode_list = [m.strip() for m in modes.split(",") if m.strip()]
    result = run_async(bench_update.run(store(), size_list, mode_list, fill=fill,
                                        repeat=repeat, progress=not as_json))
    if as_json:
        emit_json(result)
    else:
        bench_update.print_result(result)
