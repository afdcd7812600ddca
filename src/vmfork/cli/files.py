"""``vmfork cp``: a file into or out of a running guest, through its agent."""

from __future__ import annotations

import os
import re
import stat
import sys
from typing import TYPE_CHECKING

import click

from vmfork.cli.output import on_host, report
from vmfork.errors import InvalidInput

if TYPE_CHECKING:
    from vmfork.api.aio import AsyncHost
    from vmfork.results import FileResult

#: ``VM:/PATH``: a VM's name, a colon, an absolute guest path.
_REMOTE = re.compile(r"([a-zA-Z0-9][a-zA-Z0-9_.-]*):(/.*)", re.DOTALL)
#: Most bytes ``cp`` moves (:data:`vmfork.guest_files.MAX_FILE`).
_MAX = 16 << 20


def _remote(spec: str) -> tuple[str, str] | None:
    m = _REMOTE.fullmatch(spec)
    return (m.group(1), m.group(2)) if m else None


def _read_local(source: str) -> tuple[bytes, int]:
    """The bytes of *source* (``-``: stdin), at most one over the limit
    (the library refuses those), and its permissions."""
    if source == "-":
        return sys.stdin.buffer.read(_MAX + 1), 0o644
    try:
        with open(source, "rb") as f:
            return f.read(_MAX + 1), stat.S_IMODE(os.fstat(f.fileno()).st_mode)
    except OSError as exc:
        raise InvalidInput(f"cannot read {source!r}: {exc.strerror}") from exc


def _write_local(dest: str, data: bytes) -> None:
    if dest == "-":
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
        return
    try:
        with open(dest, "wb") as f:
            f.write(data)
    except OSError as exc:
        raise InvalidInput(f"cannot write {dest!r}: {exc.strerror}") from exc


@click.command("cp")
@click.argument("source")
@click.argument("dest")
@click.option("--mode", metavar="OCTAL",
              help="Permissions of the file written in the guest [default: the local "
                   "file's; 0644 from stdin].")
@click.option("--agent", type=click.Choice(["auto", "serial", "qga"]), default="auto",
              show_default=True, help="Guest agent that carries the file.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def cp_cmd(source: str, dest: str, mode: str | None, agent: str, as_json: bool) -> None:
    """Copy a file into a guest (LOCAL VM:/PATH) or out of one (VM:/PATH LOCAL);
    at most 16 MiB, bytes as they are. LOCAL '-' is stdin or stdout. A file
    written in the guest replaces the old one whole."""
    src, dst = _remote(source), _remote(dest)
    if (src is None) == (dst is None):
        raise InvalidInput("give one local path and one VM:/PATH (e.g. vmfork cp f.txt "
                           "a:/root/f.txt)")
    if dst is not None:
        name, path = dst
        data, local_mode = _read_local(source)
        try:
            perms = local_mode if mode is None else int(mode, 8)
        except ValueError as exc:
            raise InvalidInput(f"invalid --mode {mode!r}: octal, e.g. 0644") from exc

        async def put(host: AsyncHost) -> FileResult:
            return await (await host.vm(name)).write_file(path, data, mode=perms, agent=agent)
        r = on_host(put)
        report(as_json, r, f"{name}:{path}: {r.size} bytes in {r.seconds:.2f} s")
        return
    assert src is not None
    name, path = src

    async def get(host: AsyncHost) -> bytes:
        return await (await host.vm(name)).read_file(path, agent=agent)
    _write_local(dest, on_host(get))
