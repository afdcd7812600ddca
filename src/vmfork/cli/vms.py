"""``vmfork run``, ``ls``, ``exec``, ``console``, ``pause``, ``resume``, ``stop``."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import click

from vmfork.cli.output import ACCELS, on_host, report, say, table
from vmfork.errors import InvalidInput

if TYPE_CHECKING:
    from vmfork.api.aio import AsyncHost
    from vmfork.results import ExecResult, VMStatus



def parse_port(text: str) -> tuple[int, int]:
    """``HOST:GUEST`` TCP ports, each 1-65535."""
    try:
        host, guest = text.split(":")
        h, g = int(host), int(guest)
        if not (0 < h < 65536 and 0 < g < 65536):
            raise ValueError
        return h, g
    except ValueError as exc:
        raise InvalidInput(f"invalid port forward {text!r}: use HOST:GUEST") from exc


@click.command("run")
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
@click.option("--qga", is_flag=True, hidden=True, help="Every VM has the qemu-guest-agent port.")
@click.option("--memory", default="256M", show_default=True, help="Guest RAM, e.g. 512M, 1G.")
@click.option("--cpus", default=1, show_default=True, type=int)
@click.option("--memory-dir", help="Directory of the memory file [default: /dev/shm/vmfork-$UID].")
@click.option("--memory-backend", type=click.Choice(["file", "memfd"]), default="file",
              show_default=True)
@click.option("--persistent", is_flag=True,
              help="Keep the memory file on disk (default $VMFORK_HOME/memory), so "
                   "'vmfork save' survives a host crash or reboot.")
@click.option("--net", type=click.Choice(["user", "none"]), is_flag=False, flag_value="user",
              default=None, help="'user': QEMU's user-mode network with a virtio NIC "
                                 "(a bare --net says the same); 'none' (default): no NIC.")
@click.option("--port", "ports", multiple=True,
              help="Forward HOST:GUEST TCP on 127.0.0.1 (implies --net user).")
@click.option("--ready", default="auto", show_default=True,
              help="When the guest is ready: auto (vmfork's boot marker or an answer of "
                   "qemu-guest-agent), qga, console:REGEX (serial console output), "
                   "tcp:PORT (the guest port accepts a connection) or none.")
@click.option("--accel", type=ACCELS, default="auto", show_default=True)
@click.option("--qemu", default="qemu-system-x86_64", show_default=True, help="QEMU binary.")
@click.option("--idle-pause", type=float, metavar="SECONDS",
              help="Pause the VM after SECONDS without use (exec, files, console); its "
                   "next use resumes it (the daemon or 'vmfork idle --keep' watches).")
@click.option("--json", "as_json", is_flag=True)
def run_cmd(name: str, demo: bool, image_name: str | None, kernel: str | None,
            initrd: str | None, append: str | None, disks: tuple[str, ...], overlay: bool,
            qga: bool, memory: str, cpus: int, memory_dir: str | None, memory_backend: str,
            persistent: bool, net: str | None, ports: tuple[str, ...], ready: str,
            accel: str, qemu: str, idle_pause: float | None, as_json: bool) -> None:
    """Start VM NAME and return when its guest is ready."""
    if demo and image_name not in (None, "demo"):
        raise InvalidInput("--demo cannot be combined with --image")
    image = "demo" if demo else image_name
    forwards = tuple(parse_port(p) for p in ports)
    from vmfork.vm import check_idle_pause
    check_idle_pause(idle_pause)

    async def go(host: AsyncHost) -> VMStatus:
        vm = await host.run(name, image=image, memory=memory, cpus=cpus, kernel=kernel,
                            initrd=initrd, append=append, disks=disks, net=net,
                            ports=forwards, persistent=persistent, memory_dir=memory_dir,
                            memory_backend=memory_backend, accel=accel, qemu=qemu,
                            overlay=overlay, ready=ready, idle_pause=idle_pause)
        return await vm.status()
    st = on_host(go)
    report(as_json, st, f"{name}: running (pid {st.pid}, ready in "
                        f"{st.boot_seconds or 0:.2f} s, accel {st.accel})")


@click.command("ls")
@click.option("--json", "as_json", is_flag=True)
def ls_cmd(as_json: bool) -> None:
    """List VMs (a VM whose QEMU died shows as dead; one whose vmfork was
    killed before it was ready as abandoned: the next run, clone or import,
    or stop, removes it). Listing changes nothing."""
    from vmfork.listing import statuses
    from vmfork.store import Store

    store = Store()
    try:
        rows = statuses(store)
    finally:
        store.close()
    if as_json:
        report(True, rows, "")
        return
    table(("NAME", "STATE", "PID", "MEMORY", "TEMPLATE"),
          [(r.name, "paused (idle)" if r.idle else r.state, r.pid or "-", f"{r.memory_mib}M",
            r.template or "-") for r in rows])


@click.command("exec")
@click.argument("name")
@click.argument("command", nargs=-1, required=True)
@click.option("--timeout", type=float, default=None, help="Seconds to wait for the command.")
@click.option("--agent", type=click.Choice(["auto", "serial", "qga"]), default="auto",
              show_default=True,
              help="Guest agent: qemu-guest-agent where the VM has one, else the serial "
                   "agent.")
def exec_cmd(name: str, command: tuple[str, ...], timeout: float | None, agent: str) -> None:
    """Run COMMAND in the guest; print its stdout and stderr and exit with its status."""
    import shlex
    cmd = command[0] if len(command) == 1 else shlex.join(command)

    async def go(host: AsyncHost) -> ExecResult:
        return await (await host.vm(name)).exec(cmd, timeout=timeout, agent=agent)
    r = on_host(go)
    sys.stdout.buffer.write(r.stdout.encode(errors="surrogateescape"))
    sys.stdout.flush()
    sys.stderr.buffer.write(r.stderr.encode(errors="surrogateescape"))
    sys.stderr.flush()
    sys.exit(r.exit_code)


@click.command("console")
@click.argument("name")
def console_cmd(name: str) -> None:
    """Attach to the serial console (Ctrl-] detaches)."""
    from vmfork.cli.console import bridge
    from vmfork.idle import using
    from vmfork.store import Store

    async def go(host: AsyncHost) -> str:
        return await (await host.vm(name)).console_socket()
    path = on_host(go)
    store = Store()
    try:
        with using(store, name):  # not paused for idling while attached
            bridge(path)
    finally:
        store.close()


@click.command("pause")
@click.argument("name")
def pause_cmd(name: str) -> None:
    """Pause the guest's vCPUs."""
    async def go(host: AsyncHost) -> None:
        await (await host.vm(name)).pause()
    on_host(go)
    say(f"{name}: paused")


@click.command("resume")
@click.argument("name")
def resume_cmd(name: str) -> None:
    """Resume a paused guest."""
    async def go(host: AsyncHost) -> None:
        await (await host.vm(name)).resume()
    on_host(go)
    say(f"{name}: running")


@click.command("stop")
@click.argument("name")
@click.option("--force", is_flag=True, help="Kill QEMU without asking it to quit.")
def stop_cmd(name: str, force: bool) -> None:
    """Stop VM NAME and remove it with its memory file and sockets."""
    async def go(host: AsyncHost) -> None:
        await (await host.vm(name)).stop(force=force)
    on_host(go)
    say(f"{name}: stopped")

