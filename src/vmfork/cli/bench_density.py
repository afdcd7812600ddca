"""``vmfork bench density``: clones of one template started in steps until the
host no longer holds them (the measurements live in :mod:`vmfork.bench.density`)."""

from __future__ import annotations

import asyncio

import click
from rich.console import Console

from vmfork.cli.output import ACCELS, emit_json, say


def _progress(msg: str) -> None:
    click.echo(f"bench: {msg}", err=True)


@click.command("density")
@click.option("--template", metavar="NAME",
              help="Clone this template (default: a demo guest made for the run).")
@click.option("--memory", default="256M", show_default=True,
              help="Guest RAM of the template made for the run.")
@click.option("--data", "data_mb", default=64, show_default=True,
              help="MB of data in the RAM of the template made for the run.")
@click.option("--max", "max_clones", default=400, show_default=True,
              help="Most clones to start.")
@click.option("--step", default=25, show_default=True, help="Clones started per step.")
@click.option("--exec-samples", default=20, show_default=True,
              help="Clones whose exec latency is measured at each step.")
@click.option("--exec-limit", default=2.0, show_default=True,
              help="Stop once the exec p99 passes this many seconds.")
@click.option("--settle", default=5.0, show_default=True,
              help="Seconds the clones idle after each step before they are measured.")
@click.option("--cpu-window", default=10.0, show_default=True,
              help="Seconds over which idle CPU is measured.")
@click.option("--plot", "plot_file", metavar="FILE.png", type=click.Path(dir_okay=False),
              help="Draw memory, CPU and exec latency against the clone count "
                   "(needs matplotlib: pip install 'vmfork[plot]').")
@click.option("--idle-pause", type=float, metavar="SECONDS",
              help="Clones pause after SECONDS without use; each step waits until they "
                   "are paused, and exec latency includes the resume.")
@click.option("--accel", type=ACCELS, default="auto", show_default=True)
@click.option("--json", "as_json", is_flag=True)
def bench_density(template: str | None, memory: str, data_mb: int, max_clones: int, step: int,
                  exec_samples: int, exec_limit: float, settle: float, cpu_window: float,
                  plot_file: str | None, idle_pause: float | None, accel: str,
                  as_json: bool) -> None:
    """Start clones in steps; memory, idle CPU and exec latency at each."""
    from vmfork.bench import density as bd
    from vmfork.bench import print_table
    from vmfork.names import check_name
    from vmfork.spec import parse_memory
    from vmfork.store import Store

    if template is not None:
        check_name(template, "template")
    if plot_file is not None:
        bd.plot_check()
    params = bd.DensityBench(template=template, memory_mib=parse_memory(memory),
                             data_mb=data_mb, max_clones=max_clones, step=step,
                             exec_samples=exec_samples, exec_limit_s=exec_limit,
                             settle_s=settle, cpu_window_s=cpu_window, accel=accel,
                             idle_pause_s=idle_pause,
                             progress=_progress)
    params.check()
    result = asyncio.run(bd.run(Store(), params))
    if plot_file is not None:
        bd.plot(result, plot_file)
        result["plot"] = plot_file
    if as_json:
        emit_json(result)
        return
    print_table(f"vmfork bench density: clones of {result['template']} "
                f"({result['memory_mib']} MiB), {result['step']} per step",
                bd.COLUMNS, bd.rows(result), Console(width=max(140, Console().width)))
    say(f"held {result['held']} clones (stopped: {result['stopped']})"
        + (f"; failure: {result['failure']}" if result["failure"] else ""))
    for t in result["targets"]:
        say(f"target {t['target']}: {t['measured']} — {'met' if t['ok'] else 'NOT met'}")
    if plot_file is not None:
        say(f"plot: {plot_file}")
