"""``vmfork save``, ``restore``, ``snapshot export|import``."""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

import click

from vmfork.cli.output import on_host, report

if TYPE_CHECKING:
    from vmfork.api.aio import AsyncHost
    from vmfork.records import TemplateManifest
    from vmfork.results import ExportResult, ImportResult, RestoreResult, SaveResult


@click.command("save")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True)
def save_cmd(name: str, as_json: bool) -> None:
    """Save VM NAME: device state only, QEMU ends, RAM stays in its memory file
    (flushed to disk). The VM is listed as saved until 'vmfork restore'."""
    async def go(host: AsyncHost) -> SaveResult:
        return await (await host.vm(name)).save()
    r = on_host(go)
    report(as_json, r, f"{name}: saved in {r.seconds * 1000:.0f} ms (downtime "
                       f"{r.downtime_seconds * 1000:.0f} ms, state "
                       f"{r.state_size / 1024:.0f} KiB, memory file {r.memory_file})")


@click.command("restore")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True)
def restore_cmd(name: str, as_json: bool) -> None:
    """Restore saved VM NAME on its memory file; the guest continues where it
    stopped and its clock is corrected. A VM saved while paused comes back
    paused ('vmfork resume' runs it)."""
    async def go(host: AsyncHost) -> RestoreResult:
        return await (await host.vm(name)).restore()
    r = on_host(go)
    if r.state == "paused":
        text = (f"{name}: paused (pid {r.pid}) after {r.running_seconds * 1000:.0f} ms, "
                "as it was saved")
    else:
        clock = "" if r.clock_synced else "; guest clock NOT corrected"
        text = f"{name}: running (pid {r.pid}) after {r.running_seconds * 1000:.0f} ms{clock}"
    report(as_json, r, text)


@click.group("snapshot")
def snapshot_cmd() -> None:
    """Portable snapshots: one file with device state and RAM."""


@snapshot_cmd.command("export")
@click.argument("name")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True)
def export_cmd(name: str, file: str, as_json: bool) -> None:
    """Write VM NAME (running, paused or saved) with its RAM to FILE (sparse:
    zero pages take no space). A running VM is paused for the copy."""
    async def go(host: AsyncHost) -> ExportResult:
        return await (await host.vm(name)).export(file)
    r = on_host(go)
    report(as_json, r, f"{name}: exported to {r.file} in {r.seconds:.2f} s "
                       f"({r.allocated >> 20} MiB on disk, {r.size >> 20} MiB apparent)")


@snapshot_cmd.command("import")
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
    if as_template:
        async def make(host: AsyncHost) -> TemplateManifest:
            tpl = await host.import_template(file, name, persistent=persistent,
                                             memory_dir=memory_dir)
            return tpl.result or await tpl.inspect()
        m = on_host(make)
        report(as_json, m, f"template {name}: imported from {file} (memory file "
                           f"{m.memory_file})")
        return

    async def start(host: AsyncHost) -> ImportResult:
        vm = await host.import_snapshot(file, name, persistent=persistent,
                                        memory_dir=memory_dir)
        return cast("ImportResult", vm.result)
    r = on_host(start)
    report(as_json, r, f"{name}: running (pid {r.pid}), imported from {file} "
                       f"in {r.seconds:.2f} s")
