"""``vmfork update``: live update of a VM into a new QEMU process."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from vmfork.cli.output import emit_json, on_host, say
from vmfork.timeouts import DEFAULT
from vmfork.update.modes import MODES

if TYPE_CHECKING:
    from vmfork.api.aio import AsyncHost
    from vmfork.results import UpdateReport


def _mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:.2f} MB"


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f} ms"


@click.command("update")
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
    keeps running the guest and the command fails naming the cause.
    """
    async def go(host: AsyncHost) -> UpdateReport:
        return await (await host.vm(name)).update(qemu=qemu, mode=mode, timeout=timeout)
    r = on_host(go)
    if as_json:
        emit_json(r)
        return
    say(f"{name}: updated ({r.mode}), QEMU pid {r.old_pid} -> {r.new_pid} "
        f"({r.qemu_version_before} -> {r.qemu_version_after})")
    say(f"  guest paused {_ms(r.pause_host_ms)} (QEMU reports {_ms(r.pause_qemu_ms)}), "
        f"total {r.total_seconds:.3f} s, sent {_mb(r.bytes_transferred)} "
        f"(RAM {_mb(r.ram_bytes_copied)}), peak memory {_mb(r.peak_memory_bytes)} "
        f"= {r.peak_memory_ratio:.2f}x one VM")
    for w in r.warnings:
        say(f"  warning: {w}")
