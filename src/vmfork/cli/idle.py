"""``vmfork idle``: set a VM's or template's idle policy, or watch (``--keep``)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import click

from vmfork.cli.output import on_host, say
from vmfork.errors import InvalidInput

if TYPE_CHECKING:
    from vmfork.api.aio import AsyncHost


def parse_policy(text: str) -> float | None:
    """``SECONDS`` or ``off`` (also ``0``) as a policy (None: never)."""
    if text == "off":
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise InvalidInput(f"invalid idle pause {text!r}: give seconds, or 'off'")
    return value or None


@click.command("idle")
@click.argument("name", required=False)
@click.argument("seconds", required=False)
@click.option("--keep", is_flag=True,
              help="Run the watcher that pauses idle VMs, until Ctrl-C or SIGTERM "
                   "(the daemon runs it too).")
def idle_cmd(name: str | None, seconds: str | None, keep: bool) -> None:
    """Pause VM NAME after SECONDS without use (exec, files, console; 'off':
    never); for a template, its clones from then on. The VM's next use
    resumes it and sets its clock."""
    if keep:
        if name is not None:
            raise InvalidInput("--keep watches every VM: give no NAME")
        on_host(_keep)
        return
    if name is None or seconds is None:
        raise InvalidInput("give NAME and SECONDS (or 'off'), or --keep")
    policy = parse_policy(seconds)

    async def go(host: AsyncHost) -> str:
        return await host.set_idle_pause(name, policy)
    kind = on_host(go)
    what = "its clones from now on pause" if kind == "template" else "it pauses"
    say(f"{name}: {what} after {policy:g} s without use" if policy
        else f"{name}: never paused for idling")


async def _keep(host: AsyncHost) -> None:
    import asyncio

    from vmfork import idle_ports
    from vmfork.cli import signals

    stop = asyncio.Event()
    with signals.redirect(stop.set):
        click.echo("idle: pausing VMs left idle; Ctrl-C or SIGTERM stops", err=True)
        await idle_ports.keep(host.store, host.timeouts, stop)
