"""The ``vmfork`` command: a thin layer of click commands over the library.

Owns argument parsing, output (tables via rich, ``--json``) and the one table
that maps errors to one-line messages and exit statuses.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from collections.abc import Coroutine
from typing import Any, NoReturn, TypeVar

import click
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from vmfork import vm
from vmfork.errors import (
    AlreadyExists,
    GuestError,
    InvalidInput,
    LaunchError,
    MigrationError,
    NotFound,
    SetupError,
    StateError,
    TemplateError,
    VmforkError,
    VmforkTimeout,
)
from vmfork.images.demo import demo_image
from vmfork.results import Result
from vmfork.spec import parse_memory
from vmfork.store import Store

T = TypeVar("T")
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

#: Error class -> exit status. Usage-type errors exit 2, the rest 1.
EXIT_CODES: tuple[tuple[type[VmforkError], int], ...] = (
    (InvalidInput, 2), (NotFound, 1), (AlreadyExists, 1), (SetupError, 1), (LaunchError, 1),
    (StateError, 1), (GuestError, 1), (MigrationError, 1), (TemplateError, 1),
    (VmforkTimeout, 1), (VmforkError, 1),
)


def exit_code(exc: VmforkError) -> int:
    return next(code for cls, code in EXIT_CODES if isinstance(exc, cls))


class VmforkGroup(click.Group):
    """Turns VmforkError and click's usage errors into one line on stderr and
    an exit status (2 for bad usage)."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        kwargs["standalone_mode"] = False
        try:
            rv = super().main(*args, **kwargs)
        except click.UsageError as exc:
            hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx else ""
            err.print(f"vmfork: error: {exc.format_message()}{hint}", markup=False)
            sys.exit(2)
        except click.ClickException as exc:
            err.print(f"vmfork: error: {exc.format_message()}", markup=False)
            sys.exit(exc.exit_code)
        except click.Abort:
            err.print("vmfork: interrupted")
            sys.exit(130)
        sys.exit(rv if isinstance(rv, int) else 0)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except VmforkError as exc:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            err.print(f"vmfork: error: {exc}", markup=False)
            sys.exit(exit_code(exc))
        except KeyboardInterrupt:
            err.print("vmfork: interrupted")
            sys.exit(130)


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def store() -> Store:
    return Store()


def _json_default(obj: Any) -> Any:
    return obj.to_dict() if isinstance(obj, Result) else str(obj)


def emit_json(data: Any) -> None:
    """Print *data* as JSON; results (:mod:`vmfork.results`) as their ``to_dict()``."""
    click.echo(json.dumps(data, indent=2, sort_keys=True, default=_json_default))


def report(as_json: bool, data: Any, text: str) -> None:
    """Print *data* as JSON with ``--json``, else the one-line *text*."""
    if as_json:
        emit_json(data)
    else:
        out.print(text, markup=False)


def fail(message: str, code: int = 1) -> NoReturn:
    err.print(f"vmfork: error: {message}", markup=False)
    sys.exit(code)


@click.group(cls=VmforkGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Debug logging and tracebacks.")
@click.option("-v", "--verbose", is_flag=True, help="Log state changes.")
@click.pass_context
def main(ctx: click.Context, debug: bool, verbose: bool) -> None:
    """vmfork: QEMU VMs whose RAM lives outside QEMU, so clone, update and
    save cost only the device state."""
    ctx.obj = {"debug": debug}
    level = logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(message)s",
                        handlers=[RichHandler(console=err, show_path=False)])
    if not debug:
        logging.getLogger("vmfork.qmp").setLevel(logging.CRITICAL)


# -- images ------------------------------------------------------------------
@main.group()
def image() -> None:
    """Build guest images."""


@image.command("demo")
@click.option("--rebuild", is_flag=True, help="Build even if a cached image is current.")
@click.option("--json", "as_json", is_flag=True)
def image_demo(rebuild: bool, as_json: bool) -> None:
    """Build (once) the busybox demo guest from the host's kernel."""
    img = demo_image(store().images_dir, rebuild=rebuild)
    if as_json:
        emit_json(img.to_dict())
    else:
        out.print(f"kernel: {img.kernel}\ninitrd: {img.initrd}")


@image.command("debian")
@click.option("--size", default=None, help="Disk size, e.g. 2G [default: 2G, or the cached "
              "image's size].")
@click.option("--rebuild", is_flag=True, help="Build even if a cached image is current.")
@click.option("--json", "as_json", is_flag=True)
def image_debian(size: str | None, rebuild: bool, as_json: bool) -> None:
    """Build (once, as root) a Debian bookworm disk image with systemd."""
    from vmfork.images.debian import debian_image
    img = debian_image(store().images_dir, size=size, rebuild=rebuild)
    if as_json:
        emit_json(img.to_dict())
    else:
        out.print(f"disk: {img.disk}\nkernel: {img.kernel}\ninitrd: {img.initrd}")


# -- VM lifecycle --------------------------------------------------------------
def parse_port(text: str) -> tuple[int, int]:
    try:
        host, guest = text.split(":")
        h, g = int(host), int(guest)
        if not (0 < h < 65536 and 0 < g < 65536):
            raise ValueError
        return h, g
    except ValueError as exc:
        raise InvalidInput(f"invalid port forward {text!r}: use HOST:GUEST") from exc


@main.command()
@click.argument("name")
@click.option("--demo", is_flag=True, help="Boot the busybox demo guest.")
@click.option("--image", "image_name", type=click.Choice(["demo", "debian"]),
              help="Boot a named image ('vmfork image debian' builds the Debian one).")
@click.option("--kernel", help="Kernel image to boot.")
@click.option("--initrd", help="Initial ramdisk.")
@click.option("--append", help="Kernel command line.")
@click.option("--disk", "disks", multiple=True, help="Disk image (qcow2 or raw), repeatable.")
@click.option("--overlay/--no-overlay", default=True, show_default=True,
              help="Write to a qcow2 overlay in the VM's directory; the disk image itself "
                   "is never modified.")
@click.option("--qga", is_flag=True, help="Add a qemu-guest-agent port (on with --image debian).")
@click.option("--memory", default="256M", show_default=True, help="Guest RAM, e.g. 512M, 1G.")
@click.option("--cpus", default=1, show_default=True, type=int)
@click.option("--memory-dir", help="Directory of the memory file [default: /dev/shm/vmfork].")
@click.option("--memory-backend", type=click.Choice(["file", "memfd"]), default="file",
              show_default=True)
@click.option("--persistent", is_flag=True,
              help="Keep the memory file on disk (default $VMFORK_HOME/memory), so "
                   "'vmfork save' survives a host crash or reboot.")
@click.option("--net", is_flag=True, help="User-mode network with a virtio NIC.")
@click.option("--port", "ports", multiple=True, help="Forward HOST:GUEST TCP (implies --net).")
@click.option("--accel", type=click.Choice(["auto", "kvm", "tcg"]), default="auto",
              show_default=True)
@click.option("--qemu", default="qemu-system-x86_64", show_default=True, help="QEMU binary.")
@click.option("--json", "as_json", is_flag=True)
def run(name: str, demo: bool, kernel: str | None, initrd: str | None, append: str | None,
        disks: tuple[str, ...], memory: str, cpus: int, memory_dir: str | None,
        memory_backend: str, persistent: bool, net: bool, ports: tuple[str, ...], accel: str,
        qemu: str, as_json: bool, image_name: str | None = None, overlay: bool = True,
        qga: bool = False) -> None:
    """Start VM NAME and return when its guest is ready."""
    opts = vm.RunOptions(name=name, memory_mib=parse_memory(memory), cpus=cpus, demo=demo,
                         kernel=kernel, initrd=initrd, append=append, disks=disks, net=net,
                         ports=tuple(parse_port(p) for p in ports), memory_dir=memory_dir,
                         memory_backend=memory_backend, accel=accel, qemu=qemu,
                         persistent=persistent, image=image_name, overlay=overlay, qga=qga)
    result = run_async(vm.run(store(), opts))
    report(as_json, result, f"{name}: running (pid {result.pid}, ready in "
                            f"{result.boot_seconds or 0:.2f} s, accel {result.accel})")


@main.command("ls")
@click.option("--json", "as_json", is_flag=True)
def ls(as_json: bool) -> None:
    """List VMs (a VM whose QEMU died shows as dead)."""
    s = store()
    from vmfork.update.recovery import recover_interrupted
    run_async(recover_interrupted(s))  # updates whose vmfork died: finish or undo them
    recs = vm.list_vms(s)
    rows = [vm.describe(r).to_dict() for r in recs]
    if as_json:
        emit_json(rows)
        return
    table = Table("NAME", "STATE", "PID", "MEMORY", "TEMPLATE", box=None)
    for r in rows:
        table.add_row(str(r["name"]), str(r["state"]), str(r["pid"] or "-"),
                      f"{r['memory_mib']}M", str(r["template"] or "-"))
    out.print(table)


@main.command("exec")
@click.argument("name")
@click.argument("command", nargs=-1, required=True)
@click.option("--timeout", type=float, default=None, help="Seconds to wait for the command.")
@click.option("--agent", type=click.Choice(vm.AGENTS), default="auto", show_default=True,
              help="Guest agent: qemu-guest-agent where the VM has one, else the serial "
                   "agent.")
def exec_cmd(name: str, command: tuple[str, ...], timeout: float | None, agent: str) -> None:
    """Run COMMAND in the guest; write its stdout and stderr to ours, and exit
    with its exit code."""
    import shlex
    cmd = command[0] if len(command) == 1 else shlex.join(command)
    result = run_async(vm.exec_(store(), name, cmd, timeout=timeout, agent=agent))
    sys.stdout.buffer.write(result.stdout.encode(errors="surrogateescape"))
    sys.stdout.flush()
    sys.stderr.buffer.write(result.stderr.encode(errors="surrogateescape"))
    sys.stderr.flush()
    sys.exit(result.exit_code)


@main.command()
@click.argument("name")
def console(name: str) -> None:
    """Attach to the serial console (Ctrl-] detaches)."""
    from vmfork.cli.console import bridge
    s = store()
    rec = vm.get_live(s, name)
    bridge(vm.paths_for(s, rec).console)


@main.command()
@click.argument("name")
def pause(name: str) -> None:
    """Pause the guest's vCPUs."""
    run_async(vm.pause(store(), name))
    out.print(f"{name}: paused")


@main.command()
@click.argument("name")
def resume(name: str) -> None:
    """Resume a paused guest."""
    run_async(vm.resume(store(), name))
    out.print(f"{name}: running")


@main.command()
@click.argument("name")
@click.option("--force", is_flag=True, help="Kill QEMU without asking it to quit.")
def stop(name: str, force: bool) -> None:
    """Stop VM NAME and remove it with its memory file and sockets."""
    run_async(vm.stop(store(), name, force=force))
    out.print(f"{name}: stopped")


@main.group()
def bench() -> None:
    """Benchmarks, reported as ratios against a baseline measured in the same run."""


# Feature commands live in their own modules and attach themselves to `main`
# (and to `bench`).
from vmfork.cli import snapshot as cli_snapshot  # noqa: E402,F401
from vmfork.cli import template as cli_template  # noqa: E402,F401
from vmfork.cli import update as cli_update  # noqa: E402,F401
