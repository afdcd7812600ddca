"""``vmfork template create|pull|ls|inspect|rm|publish``, ``clone`` and ``pool``."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import click

from vmfork.cli.output import ACCELS, emit_json, on_host, report, say, table
from vmfork.errors import InvalidInput

if TYPE_CHECKING:
    from vmfork.api.aio import AsyncHost, AsyncTemplate
    from vmfork.errors import PartialClone
    from vmfork.records import TemplateManifest
    from vmfork.results import CloneResult, PoolStatus, PublishResult, PullResult, TemplateStatus


@click.group("template")
def template_cmd() -> None:
    """Templates: frozen VMs that clones start from."""


@template_cmd.command("create")
@click.argument("name")
@click.option("--from", "from_vm", help="Freeze this running VM (it ends).")
@click.option("--demo", is_flag=True, help="Boot the demo guest and freeze it.")
@click.option("--memory", default="512M", show_default=True, help="With --demo: guest RAM.")
@click.option("--prepare", help="With --demo: shell command run in the guest first.")
@click.option("--accel", type=ACCELS, default="auto",
              show_default=True)
@click.option("--on-clone", "on_clone", metavar="CMD",
              help="Default hook: shell command run in each clone after its identity is "
                   "set, before 'clone' returns; a clone whose hook fails is removed. "
                   "'vmfork clone --on-clone' replaces it for one call.")
@click.option("--idle-pause", type=float, metavar="SECONDS",
              help="Its clones pause after SECONDS without use (see 'vmfork idle').")
@click.option("--json", "as_json", is_flag=True)
def template_create(name: str, from_vm: str | None, demo: bool, memory: str,
                    prepare: str | None, accel: str, on_clone: str | None,
                    idle_pause: float | None, as_json: bool) -> None:
    """Freeze a VM into template NAME (device state only; RAM stays in its file).

    The VM's disk overlays become the template's (read-only; each clone gets
    its own overlay over them). With qemu-guest-agent the guest's file systems
    are frozen at the pause, and each clone thaws them first."""
    if bool(from_vm) == bool(demo):
        raise InvalidInput("give exactly one of --from VM or --demo")
    if prepare and not demo:
        raise InvalidInput("--prepare goes with --demo (with --from, prepare the VM first)")
    from vmfork.vm import check_idle_pause
    check_idle_pause(idle_pause)

    async def go(host: AsyncHost) -> TemplateManifest:
        if from_vm:
            tpl = await (await host.vm(from_vm)).make_template(name, on_clone=on_clone)
        else:
            tpl = await host.create_template(name, memory=memory, prepare=prepare,
                                             accel=accel, on_clone=on_clone)
        if idle_pause:
            await host.set_idle_pause(name, idle_pause)
        return tpl.result or await tpl.inspect()
    m = on_host(go)
    report(as_json, m, f"template {name}: state {m.state_size / 1024:.0f} KiB saved in "
                       f"{m.save.migration.seconds * 1000:.0f} ms; memory file "
                       f"{m.memory_file} ({m.memory_size >> 20} MiB)"
                       + (f"; {len(m.disks)} disk overlays" if m.disks else "")
                       + ("; file systems frozen" if m.frozen else ""))


@template_cmd.command("pull")
@click.argument("url")
@click.argument("name", required=False)
@click.option("--lazy/--eager", default=True, show_default=True,
              help="Lazy: the template is usable at once; its memory is served through "
                   "FUSE, fetched on first read and in the background. Eager: all of the "
                   "memory is fetched first.")
@click.option("--token-file", type=click.Path(dir_okay=False), metavar="FILE",
              help="The source daemon's bearer token.")
@click.option("--json", "as_json", is_flag=True)
def template_pull(url: str, name: str | None, lazy: bool, token_file: str | None,
                  as_json: bool) -> None:
    """Pull the template published at URL as template NAME (default: its name
    there).

    URL is a daemon's http://HOST:PORT/v1/templates/NAME or the base URL of a
    directory written by 'vmfork template publish' behind any HTTP server
    with Range support. The manifest, device state, kernel, initrd and disks
    are fetched and checked (sha256) first."""
    async def go(host: AsyncHost) -> PullResult:
        return await host.pull_template(url, name, lazy=lazy, token_file=token_file)
    r = on_host(go)
    memory = ("all fetched" if r.mode == "eager" else
              "complete" if r.state == "complete" else "fetching in the background")
    report(as_json, r, f"template {r.name}: pulled from {r.source} in {r.seconds:.2f} s "
                       f"({r.mode}; memory {r.memory_mib} MiB, {memory}; "
                       f"{_size(r.fetched_bytes)} fetched)")


def _size(n: int | None) -> str:
    """Bytes in the unit that reads best (``512K``, ``12.3M``, ``1.2G``)."""
    if n is None:
        return "-"
    if n < 1 << 20:
        return f"{n >> 10}K"
    if n < 1 << 30:
        return f"{n / (1 << 20):.1f}M"
    return f"{n / (1 << 30):.1f}G"


def _local(r: TemplateStatus) -> str:
    """The memory column of a pulled template: its state and local share."""
    if r.state is None:
        return "-"
    if r.state == "fetching":
        return f"fetching {r.local_percent or 0:.0f}%"
    return r.state


@template_cmd.command("ls")
@click.option("--json", "as_json", is_flag=True)
def template_ls(as_json: bool) -> None:
    """List templates (a pulled one with its source, its memory's state, the
    share of it that is here and the bytes fetched)."""
    async def go(host: AsyncHost) -> list[TemplateStatus]:
        return [await t.status() for t in await host.templates()]
    rows = on_host(go)
    if as_json:
        emit_json(rows)
        return
    headers: tuple[str, ...] = ("NAME", "MEMORY", "STATE", "CLONES", "POOL", "QEMU", "STATUS")
    cells = [[r.name, f"{r.memory_mib}M", f"{r.state_kib}K", r.clones, r.pool, r.qemu or "-",
              r.status] for r in rows]
    if any(r.source is not None for r in rows):
        headers += ("LOCAL", "FETCHED", "SOURCE")
        for r, row in zip(rows, cells, strict=True):
            row += [_local(r), _size(r.fetched_bytes), r.source or "-"]
    table(headers, cells)
    for r in rows:
        if r.state == "broken":
            say(f"template {r.name}: memory broken: {r.cause or 'no cause given'}")


@template_cmd.command("inspect")
@click.argument("name")
def template_inspect(name: str) -> None:
    """Print a template's manifest (JSON), with its clones and its pool, and
    for a pulled template its source and its memory's state (``pull``)."""
    async def go(host: AsyncHost) -> dict[str, object]:
        tpl = await host.template(name)
        manifest = (await tpl.inspect()).to_dict()
        manifest["clones"] = [c.name for c in await tpl.clones()]
        manifest["pool"] = await tpl.pool()
        status = await tpl.status()
        if status.source is not None:
            manifest["pull"] = {"source": status.source, "state": status.state,
                                "local_percent": status.local_percent,
                                "fetched_bytes": status.fetched_bytes,
                                "cause": status.cause}
        return manifest
    emit_json(on_host(go))


@template_cmd.command("rm")
@click.argument("name")
@click.option("--force", is_flag=True, help="Stop its clones and pool processes first.")
def template_rm(name: str, force: bool) -> None:
    """Remove a template and its files (refused while clones or pool processes
    use it, and even with --force while a template made from one of its clones
    exists)."""
    from vmfork.api.aio import AsyncTemplate

    async def go(host: AsyncHost) -> None:
        await AsyncTemplate(host, name).remove(force=force)
    on_host(go)
    say(f"template {name}: removed")


@template_cmd.command("publish")
@click.argument("name")
@click.argument("directory", metavar="DIR")
@click.option("--json", "as_json", is_flag=True)
def template_publish(name: str, directory: str, as_json: bool) -> None:
    """Write template NAME's published layout into DIR (missing or empty).

    DIR then holds manifest.json, state, memory (with its holes), kernel and
    initrd if the template has them, and each disk flattened (disk0.qcow2
    ...), all 0600: serve it with any static HTTP server that supports Range
    requests, and 'vmfork template pull URL' on another host. A daemon
    serves the same layout at /v1/templates/NAME/files/."""
    async def go(host: AsyncHost) -> PublishResult:
        return await (await host.template(name)).publish(directory)
    r = on_host(go)
    report(as_json, r, f"template {name}: published to {r.directory} ({len(r.files)} files, "
                       f"{r.data >> 20} MiB of data; memory {r.memory_size >> 20} MiB in "
                       f"{r.chunks} chunks, {r.zero_chunks} of them zeros; working set "
                       f"{r.working_set} chunks)")


@click.command("clone")
@click.argument("template")
@click.argument("name", required=False)
@click.option("-n", "--count", default=1, show_default=True, type=int,
              help="How many clones (named NAME-1..N, or TEMPLATE-k), at most 64.")
@click.option("--no-pool", is_flag=True, help="Spawn fresh QEMU processes even if pooled.")
@click.option("--on-clone", "on_clone", metavar="CMD",
              help="Hook for this call: shell command run in each clone after its identity "
                   "is set. It REPLACES the template's default hook (--on-clone '' runs "
                   "none). A clone whose hook fails (status != 0, timeout) is removed.")
@click.option("--all-or-nothing", is_flag=True,
              help="If one clone fails, remove the others of this call too (by default "
                   "they run on, and the failures are reported).")
@click.option("--max-starting", type=click.IntRange(1, 64), default=4, show_default=True,
              help="Clones being started at once.")
@click.option("--json", "as_json", is_flag=True)
def clone_cmd(template: str, name: str | None, count: int, no_pool: bool,
              on_clone: str | None, all_or_nothing: bool, max_starting: int,
              as_json: bool) -> None:
    """Start clones of TEMPLATE; return when they run (and their hook has run).
    A clone that fails is undone; the others run on (exit status 1, each
    failure reported), unless --all-or-nothing."""
    from vmfork.errors import PartialClone, http_error
    from vmfork.templates.clone import check_count

    check_count(count)

    async def go(host: AsyncHost) -> tuple[list[CloneResult], PartialClone | None]:
        tpl = await host.template(template)
        try:
            if count == 1:
                one = await tpl.clone(name=name, use_pool=not no_pool, on_clone=on_clone)
                return [one.result], None
            many = await tpl.clone(count, name=name, use_pool=not no_pool,
                                   on_clone=on_clone, all_or_nothing=all_or_nothing,
                                   max_starting=max_starting)
            return [c.result for c in many], None
        except PartialClone as exc:
            return list(exc.clones), exc
    results, partial = on_host(go)
    if as_json:
        failures = [{"name": n, "error": {"code": http_error(e)[0], "message": str(e)}}
                    for n, e in (partial.failures if partial else [])]
        emit_json([*(r.to_dict() for r in results), *failures])
    else:
        for r in results:
            _say_clone(r)
    if partial is not None:
        raise partial


def _say_clone(r: CloneResult) -> None:
    forwards = "".join(f", port {h}->{g}" for h, g in r.ports)
    say(f"{r.name}: running (pid {r.pid}{', from pool' if r.pooled else ''}{forwards}) — "
        f"state loaded {r.state_loaded * 1000:.0f} ms, running "
        f"{r.running * 1000:.0f} ms, responsive {r.responsive * 1000:.0f} ms")
    if r.hook_status is not None:
        say(f"{r.name}: on-clone hook exited {r.hook_status}")
        if r.hook_output:
            say(r.hook_output.rstrip("\n"))


@click.command("pool")
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
    from vmfork.templates.pool import check_size

    if size is not None:
        check_size(size)

    async def go(host: AsyncHost) -> PoolStatus:
        tpl = await host.template(template)
        if keep:
            return await _keep_until_signalled(tpl, size, warm)
        return await tpl.pool(size, warm=warm)
    status = on_host(go)
    kind = "warm" if status.warm else "cold"
    report(as_json, status, f"pool {template}: {status.ready} ready of {status.target} "
                            f"({kind})")


async def _keep_until_signalled(tpl: AsyncTemplate, size: int | None,
                                warm: bool | None) -> PoolStatus:
    """Run the pool keeper until SIGINT, SIGTERM or SIGHUP: the first ends it
    normally (its members stay), later ones are ignored."""
    from vmfork.cli import signals

    stop = asyncio.Event()
    with signals.redirect(stop.set):
        click.echo(f"pool {tpl.name}: keeping it filled; Ctrl-C or SIGTERM stops", err=True)
        return await tpl.keep_pool(size, warm=warm, stop=stop)

