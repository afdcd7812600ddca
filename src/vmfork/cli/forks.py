"""``vmfork fork``: branch a running VM into children while it keeps running."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from vmfork.cli.output import emit_json, on_host, say

if TYPE_CHECKING:
    from vmfork.api.aio import AsyncHost
    from vmfork.results import ForkChild, ForkReport


def _size(n: int) -> str:
    """Bytes in the unit that keeps the figure short (B, KiB, MiB, GiB)."""
    value = float(n)
    for unit in ("B", "KiB", "MiB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.2f} GiB"


def parent_line(r: ForkReport) -> str:
    """The parent's line: its pause and the RAM written for the fork."""
    n = len(r.children)
    return (f"{r.name}: forked into {n} {'child' if n == 1 else 'children'} — paused "
            f"{r.parent_pause_ms:.1f} ms (QEMU pid {r.parent_old_pid} -> {r.parent_pid}); "
            f"captured {_size(r.captured_bytes)}, base copied {_size(r.base_copy_bytes)}, "
            f"device state {_size(r.state_bytes)}; all responsive in {r.total_ms:.0f} ms")


def child_line(c: ForkChild) -> str:
    """One child's line: its process, its port forwards and its times."""
    forwards = "".join(f", port {h}->{g}" for h, g in c.ports)
    return (f"{c.name}: running (pid {c.pid}{forwards}) — running {c.running_ms:.0f} ms, "
            f"responsive {c.responsive_ms:.0f} ms")


@click.command("fork")
@click.argument("vm")
@click.argument("names", nargs=-1, metavar="[NAME]...")
@click.option("-n", "--count", type=int, default=None,
              help="How many children, at most 64 [default: one per NAME, else 1]; without "
                   "NAMEs they are VM-1, VM-2, .. (the lowest free).")
@click.option("--on-clone", "on_clone", metavar="CMD",
              help="Shell command run in each child after its identity is set, before "
                   "'fork' returns. A child whose hook fails (status != 0, timeout) is "
                   "removed, and with it the other children of this call.")
@click.option("--json", "as_json", is_flag=True)
def fork_cmd(vm: str, names: tuple[str, ...], count: int | None, on_clone: str | None,
             as_json: bool) -> None:
    """Branch running VM into children NAME... that start from its RAM, devices
    and disks at one instant; VM keeps running, paused once for a few ms.

    Each child gets its own identity like a clone (VM generation ID, MAC,
    hostname, machine-id, clock); the VM keeps its own. Returns when every
    child runs and answers (and its hook has run). Ctrl-C cancels it like
    any failure: the children made so far are removed and VM runs on."""
    from vmfork.api.aio import fork_children

    n, child_names = fork_children(count, list(names) if names else None)

    async def go(host: AsyncHost) -> ForkReport:
        return await (await host.vm(vm)).fork(n, names=child_names, on_clone=on_clone)
    r = on_host(go)
    if as_json:
        emit_json(r)
        return
    say(parent_line(r))
    for c in r.children:
        say(child_line(c))
        if c.hook_status is not None:
            say(f"{c.name}: on-clone hook exited {c.hook_status}")
            if c.hook_output:
                say(c.hook_output.rstrip("\n"))
    for w in r.warnings:
        say(f"  warning: {w}")
