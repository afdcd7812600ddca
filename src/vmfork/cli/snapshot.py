"""CLI commands for save/restore and portable snapshots, and `vmfork bench save`."""

from __future__ import annotations

import click

from vmfork import snapshots as snapshot
from vmfork.cli import bench, emit_json, main, out, report, run_async, settled, store


@main.command("save")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True)
def save_cmd(name: str, as_json: bool) -> None:
    """Save VM NAME: device state only, QEMU ends, RAM stays in its memory file
    (flushed to disk). The VM is listed as saved until 'vmfork restore'."""
    result = run_async(snapshot.save(settled(name), name))
    if as_json:
        emit_json(result)
    else:
        out.print(f"{name}: saved in {result.seconds * 1000:.0f} ms (downtime "
                  f"{result.downtime_seconds * 1000:.0f} ms, state "
                  f"{result.state_size / 1024:.0f} KiB, memory file {result.memory_file})")


@main.command("restore")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True)
def restore_cmd(name: str, as_json: bool) -> None:
    """Restore saved VM NAME on its memory file; the guest continues where it
    stopped and its clock is corrected. A VM saved while paused comes back
    paused ('vmfork resume' runs it)."""
    result = run_async(snapshot.restore(store(), name))
    if as_json:
        emit_json(result)
    elif result.state == "paused":
        out.print(f"{name}: paused (pid {result.pid}) after "
                  f"{result.running_seconds * 1000:.0f} ms, as it was saved")
    else:
        clock = "" if result.clock_synced else "; guest clock NOT corrected"
        out.print(f"{name}: running (pid {result.pid}) after "
                  f"{result.running_seconds * 1000:.0f} ms{clock}")


@main.group("snapshot")
def snapshot_group() -> None:
    """Portable snapshots: one file with device state and RAM."""


@snapshot_group.command("export")
@click.argument("name")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True)
def export_cmd(name: str, file: str, as_json: bool) -> None:
    """Write VM NAME (running, paused or saved) with its RAM to FILE (sparse:
    zero pages take no space). A running VM is paused for the copy."""
    result = run_async(snapshot.export(store(), name, file))
    if as_json:
        emit_json(result)
    else:
        out.print(f"{name}: exported to {result.file} in {result.seconds:.2f} s "
                  f"({result.allocated >> 20} MiB on disk, {result.size >> 20} MiB "
                  "apparent)")


@snapshot_group.command("import")
@click.argument("file", type=click.Path(dir_okay=False))
@click.argument("name")
@click.option("--as-template", is_flag=True, help="Make a template NAME instead of a VM.")
@click.option("--persistent", is_flag=True,
              help="Memory file on disk (default $VMFORK_HOME/memory), ready for save.")
@click.option("--memory-dir", help="Directory of the new memory file.")
@click.option("--json", "as_json", is_flag=True)
def import_cmd(file: str, name: str, as_template: bool, persistent: bool,
               memory_dir: str | None, as_json: bool) -> None:
    """Bring snapshot FILE back as running VM NAME (or template NAME)."""
    s = store()
    if as_template:
        manifest = run_async(snapshot.import_template(s, file, name, persistent=persistent,
                                                      memory_dir=memory_dir))
        report(as_json, manifest, f"template {name}: imported from {file} (memory file "
                                  f"{manifest['memory_file']})")
        return
    result = run_async(snapshot.import_(s, file, name, persistent=persistent,
                                        memory_dir=memory_dir))
    report(as_json, result, f"{name}: running (pid {result.pid}), imported from {file} "
                            f"in {result.seconds:.2f} s")


@bench.command("save")
@click.option("--sizes", default="256M,1G,4G", show_default=True,
              help="Guest RAM sizes, comma-separated.")
@click.option("--fill", default=0.5, show_default=True, type=float,
              help="Share of guest RAM filled with incompressible data.")
@click.option("--samples", default=3, show_default=True, type=int,
              help="Save/restore cycles per size (median reported).")
@click.option("--accel", type=click.Choice(["auto", "kvm", "tcg"]), default="auto",
              show_default=True)
@click.option("--json", "as_json", is_flag=True)
def bench_save_cmd(sizes: str, fill: float, samples: int, accel: str, as_json: bool) -> None:
    """vmfork save/restore against a full-RAM save to a file and its restore."""
    from vmfork.bench import save as bench_save
    from vmfork.spec import parse_memory_list

    mibs = parse_memory_list(sizes)
    params = bench_save.SaveBench(sizes_mib=mibs, fill=fill, samples=samples, accel=accel)
    if not as_json:
        params.progress = lambda msg: out.print(f"[dim]{msg}[/dim]")
    result = run_async(bench_save.run(store(), params))
    if as_json:
        emit_json(result)
    else:
        bench_save.print_report(result, out)
