"""CLI commands for templates, clones and the warm pool."""

from __future__ import annotations

import asyncio
import signal

import click
from rich.table import Table

from vmfork.cli import bench, emit_json, err, main, out, run_async, store
from vmfork.errors import InvalidInput
from vmfork.results import PoolStatus
from vmfork.spec import parse_memory
from vmfork.store import Store
from vmfork.templates import catalog, clone, create, pool


@main.group()
def template() -> None:
    """Create, list, inspect and remove templates."""


@template.command("create")
@click.argument("name")
@click.option("--from", "from_vm", help="Freeze this running VM (it ends).")
@click.option("--demo", is_flag=True, help="Boot the demo guest and freeze it.")
@click.option("--memory", default="512M", show_default=True, help="With --demo: guest RAM.")
@click.option("--prepare", help="With --demo: shell command run in the guest first.")
@click.option("--accel", type=click.Choice(["auto", "kvm", "tcg"]), default="auto",
              show_default=True)
@click.option("--on-clone", "on_clone", metavar="CMD",
              help="Default hook: shell command run in each clone after its identity is "
                   "set, before 'clone' returns; a clone whose hook fails is removed. "
                   "'vmfork clone --on-clone' replaces it for one call.")
@click.option("--json", "as_json", is_flag=True)
def template_create(name: str, from_vm: str | None, demo: bool, memory: str,
                    prepare: str | None, accel: str, on_clone: str | None,
                    as_json: bool) -> None:
    """Freeze a VM into template NAME (device state only; RAM stays in its file).

    The VM's disk overlays become the template's (read-only; each clone gets
    its own overlay over them). With qemu-guest-agent the guest's file systems
    are frozen at the pause, and each clone thaws them first."""
    if bool(from_vm) == bool(demo):
        raise InvalidInput("give exactly one of --from VM or --demo")
    if prepare and not demo:
        raise InvalidInput("--prepare goes with --demo (with --from, prepare the VM first)")
    s = store()
    if demo:
        manifest = run_async(create.create_demo(s, name, parse_memory(memory), prepare, accel,
                                                on_clone=on_clone))
    else:
        assert from_vm is not None
        manifest = run_async(create.create_from_vm(s, name, from_vm, on_clone=on_clone))
    if as_json:
        emit_json(manifest)
    else:
        out.print(f"template {name}: state {manifest.state_size / 1024:.0f} KiB saved in "
                  f"{manifest.save.migration.seconds * 1000:.0f} ms; memory file "
                  f"{manifest.memory_file} ({manifest.memory_size >> 20} MiB)"
                  + (f"; {len(manifest.disks)} disk overlays" if manifest.disks else "")
                  + ("; file systems frozen" if manifest.frozen else ""), markup=False)


@template.command("ls")
@click.option("--json", "as_json", is_flag=True)
def template_ls(as_json: bool) -> None:
    """List templates."""
    rows = catalog.statuses(store())
    if as_json:
        emit_json(rows)
        return
    table = Table("NAME", "MEMORY", "STATE", "CLONES", "POOL", "QEMU", box=None)
    for r in rows:
        table.add_row(r.name, f"{r.memory_mib}M", f"{r.state_kib}K", str(r.clones),
                      str(r.pool), r.qemu)
    out.print(table)


@template.command("inspect")
@click.argument("name")
def template_inspect(name: str) -> None:
    """Print a template's manifest (JSON), with its clones and its pool."""
    s = store()
    manifest = catalog.get(s, name).to_dict()
    manifest["clones"] = catalog.users(s, name)
    manifest["pool"] = pool.pool_status(s, name)
    emit_json(manifest)


@template.command("rm")
@click.argument("name")
@click.option("--force", is_flag=True, help="Stop its clones and pool processes first.")
def template_rm(name: str, force: bool) -> None:
    """Remove a template and its files (refused while clones or pool processes
    use it, and even with --force while a template made from one of its clones
    exists)."""
    run_async(catalog.remove(store(), name, force=force))
    out.print(f"template {name}: removed")


@main.command("clone")
@click.argument("template")
@click.argument("name", required=False)
@click.option("-n", "--count", default=1, show_default=True, type=int,
              help="How many clones (named NAME-1..N, or TEMPLATE-k).")
@click.option("--no-pool", is_flag=True, help="Spawn fresh QEMU processes even if pooled.")
@click.option("--on-clone", "on_clone", metavar="CMD",
              help="Hook for this call: shell command run in each clone after its identity "
                   "is set. It REPLACES the template's default hook (--on-clone '' runs "
                   "none). A clone whose hook fails (status != 0, timeout) is removed, and "
                   "with it the other clones of this call.")
@click.option("--json", "as_json", is_flag=True)
def clone_cmd(template: str, name: str | None, count: int, no_pool: bool,
              on_clone: str | None, as_json: bool) -> None:
    """Start clones of TEMPLATE; return when they run (and their hook has run)."""
    if count < 1:
        raise InvalidInput(f"invalid clone count {count}: must be at least 1")
    names = None
    if name:
        names = [name] if count == 1 else [f"{name}-{i}" for i in range(1, count + 1)]
    results = run_async(clone.clone(store(), template, names=names, count=count,
                                    use_pool=not no_pool, on_clone=on_clone))
    if as_json:
        emit_json([r.to_dict() for r in results])
        return
    for r in results:
        out.print(f"{r.name}: running (pid {r.pid}{', from pool' if r.pooled else ''}) — "
                  f"state loaded {r.state_loaded * 1000:.0f} ms, running "
                  f"{r.running * 1000:.0f} ms, responsive {r.responsive * 1000:.0f} ms")
        if r.hook_status is not None:
            out.print(f"{r.name}: on-clone hook exited {r.hook_status}", markup=False)
            if r.hook_output:
                out.print(r.hook_output.rstrip("\n"), markup=False)


@main.command("pool")
@click.argument("template")
@click.option("--size", type=int, help="Keep this many QEMU processes ready (0 drains).")
@click.option("--warm/--cold", default=None,
              help="Warm members have the state loaded and the guest run through one "
                   "command already, so a clone from them answers at once (TCG translates "
                   "guest code afresh in every new process); cold members (the default) "
                   "wait for the state. Without either, the pool keeps its kind.")
@click.option("--keep", is_flag=True,
              help="Stay in the foreground and keep the pool at its size: replace members "
                   "taken by clones or whose QEMU died. SIGINT/SIGTERM stop it; the "
                   "members stay. Without --keep the pool is filled once (a clone does "
                   "not refill it).")
@click.option("--json", "as_json", is_flag=True)
def pool_cmd(template: str, size: int | None, warm: bool | None, keep: bool,
             as_json: bool) -> None:
    """Show or set the pool of QEMU processes kept ready for TEMPLATE."""
    s = store()
    catalog.get(s, template)
    if size is not None:
        pool.check_size(size)
    if keep:
        status = run_async(_keep_until_signalled(s, template, size, warm))
    else:
        if size is not None or warm is not None:
            run_async(pool.set_pool(s, template,
                                    s.pool_target(template) if size is None else size,
                                    warm=warm))
        status = pool.pool_status(s, template)
    if as_json:
        emit_json(status)
    else:
        kind = "warm" if status.warm else "cold"
        out.print(f"pool {template}: {status.ready} ready of {status.target} ({kind})")


async def _keep_until_signalled(s: Store, template: str, size: int | None,
                                warm: bool | None) -> PoolStatus:
    """Run the pool keeper until SIGINT or SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = (signal.SIGINT, signal.SIGTERM)
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    try:
        err.print(f"pool {template}: keeping it filled; Ctrl-C or SIGTERM stops",
                  markup=False)
        return await pool.keep(s, template, size, warm, stop=stop)
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)


@bench.command("clone")
@click.option("--image", type=click.Choice(["demo", "debian"]), default="demo",
              show_default=True, help="Guest: busybox demo or systemd Debian (disk).")
@click.option("--memory", default="512M", show_default=True, help="Guest RAM.")
@click.option("--data", "data_mb", default=200, show_default=True,
              help="MB of guest data in RAM.")
@click.option("--disk-data", "disk_mb", default=32, show_default=True,
              help="With --image debian: MB of data on disk (synced).")
@click.option("--counts", default="1,10,20", show_default=True,
              help="Clone counts for the memory comparison.")
@click.option("--samples", default=5, show_default=True)
@click.option("--accel", type=click.Choice(["auto", "kvm", "tcg"]), default="auto",
              show_default=True)
@click.option("--json", "as_json", is_flag=True)
def bench_clone(image: str, memory: str, data_mb: int, disk_mb: int, counts: str,
                samples: int, accel: str, as_json: bool) -> None:
    """Cold boot vs clone vs pool clone; memory of N clones vs N cold VMs."""
    from vmfork.bench import clone as bc
    from vmfork.bench import print_table
    try:
        cs = tuple(int(c) for c in counts.split(","))
    except ValueError as exc:
        raise InvalidInput(f"invalid --counts {counts!r}: use e.g. 1,10,20") from exc
    if not cs or min(cs) < 1 or list(cs) != sorted(cs):
        raise InvalidInput(f"invalid --counts {counts!r}: ascending positive numbers")
    if samples < 1:
        raise InvalidInput(f"invalid --samples {samples}: at least 1")
    params = bc.CloneBench(memory_mib=parse_memory(memory), data_mb=data_mb, counts=cs,
                           samples=samples, accel=accel, image=image, disk_mb=disk_mb,
                           progress=lambda msg: err.print(f"[dim]bench: {msg}[/dim]"))
    params.check()
    result = run_async(bc.run(store(), params))
    if as_json:
        emit_json(result)
        return
    print_table(bc.title(result), ["metric", "vmfork", "baseline", "ratio"], bc.rows(result),
                out)
    for target, ok in result["targets"].items():
        out.print(f"target {target}: {'met' if ok else 'NOT met'}")
