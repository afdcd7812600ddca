"""The ``vmfork`` command group: options common to every command, lazy
loading of the commands, and the one table that maps errors to a one-line
message and an exit status.

Commands live in one module per family (:mod:`.vms`, :mod:`.images`,
:mod:`.templates`, :mod:`.updates`, :mod:`.forks`, :mod:`.snapshots`,
:mod:`.bench`) and are imported only when invoked (or listed by ``--help``),
so that a quick command such as ``vmfork ls`` does not pay for what others
import."""

from __future__ import annotations

import importlib
import signal
import sys
from typing import Any, NoReturn

import click

from vmfork.cli import signals
from vmfork.cli.output import set_verbosity
from vmfork.cli.signals import Interrupted
from vmfork.errors import (
    AlreadyExists,
    BadSnapshotFile,
    Busy,
    DaemonUnreachable,
    GuestError,
    InvalidInput,
    LaunchError,
    MigrationError,
    NotFound,
    PartialClone,
    QMPCommandError,
    ResourceError,
    SetupError,
    SourceError,
    StateError,
    TemplateError,
    TooLarge,
    UnsafePath,
    VmforkError,
    VmforkTimeout,
)

#: Error class -> exit status. Usage-type errors exit 2, the rest 1.
EXIT_CODES: tuple[tuple[type[VmforkError], int], ...] = (
    (BadSnapshotFile, 2), (UnsafePath, 2), (TooLarge, 2), (InvalidInput, 2), (NotFound, 1),
    (AlreadyExists, 1), (DaemonUnreachable, 1), (SetupError, 1), (ResourceError, 1),
    (Busy, 1), (LaunchError, 1),
    (QMPCommandError, 1), (StateError, 1), (GuestError, 1), (SourceError, 1),
    (MigrationError, 1),
    (TemplateError, 1),
    (VmforkTimeout, 1), (PartialClone, 1), (VmforkError, 1),
)


def exit_code(exc: VmforkError) -> int:
    return next(code for cls, code in EXIT_CODES if isinstance(exc, cls))


def error_line(message: str) -> None:
    click.echo(f"vmfork: error: {message}", err=True)


def interrupted(exc: BaseException | None) -> NoReturn:
    """One line naming the signal that interrupted the command (its cleanup
    has run: :mod:`vmfork.cli.signals`); exit with 128 + its number."""
    signals.ignore()
    signum = exc.signum if isinstance(exc, Interrupted) else signal.SIGINT
    click.echo(f"vmfork: interrupted ({signal.Signals(signum).name})", err=True)
    sys.exit(128 + signum)


class LazyGroup(click.Group):
    """A group whose subcommands are named ``"module:attribute"`` and imported
    on first use."""

    def __init__(self, *args: Any, lazy: dict[str, str] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy = lazy or {}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.lazy and cmd_name not in self.commands:
            module, attr = self.lazy[cmd_name].split(":")
            command: click.Command = getattr(importlib.import_module(module), attr)
            self.add_command(command, cmd_name)
        return super().get_command(ctx, cmd_name)


class VmforkGroup(LazyGroup):
    """The top group: turns VmforkError and click's usage errors into one line
    on stderr and an exit status (2 for bad usage)."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        kwargs["standalone_mode"] = False
        try:
            rv = super().main(*args, **kwargs)
        except click.UsageError as exc:
            hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx else ""
            error_line(f"{exc.format_message()}{hint}")
            sys.exit(2)
        except click.ClickException as exc:
            error_line(exc.format_message())
            sys.exit(exc.exit_code)
        except click.Abort as exc:
            interrupted(exc.__context__)
        except KeyboardInterrupt as exc:
            interrupted(exc)
        sys.exit(rv if isinstance(rv, int) else 0)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except VmforkError as exc:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            error_line(str(exc))
            sys.exit(exit_code(exc))
        except KeyboardInterrupt as exc:
            interrupted(exc)


def _family(module: str, *names: str) -> dict[str, str]:
    return {n: f"vmfork.cli.{module}:{n.replace('-', '_')}_cmd" for n in names}


COMMANDS = {
    **_family("vms", "run", "ls", "exec", "console", "pause", "resume", "stop"),
    **_family("images", "image"),
    **_family("templates", "template", "clone", "pool"),
    **_family("updates", "update"),
    **_family("forks", "fork"),
    **_family("snapshots", "save", "restore", "snapshot"),
    **_family("bench", "bench"),
    **_family("serve", "serve"),
    **_family("files", "cp"),
    **_family("idle", "idle"),
}


@click.group(cls=VmforkGroup, lazy=COMMANDS,
             context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Debug logging and tracebacks.")
@click.option("-v", "--verbose", is_flag=True, help="Log state changes.")
@click.pass_context
def cli(ctx: click.Context, debug: bool, verbose: bool) -> None:
    """vmfork: QEMU VMs whose RAM lives outside QEMU, so clone, update and
    save cost only the device state."""
    ctx.obj = {"debug": debug}
    set_verbosity(debug=debug, verbose=verbose)
