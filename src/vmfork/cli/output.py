"""What the commands print: one line of text, or with ``--json`` the result's
``to_dict()``; plain tables; and the bridge from a click command to an
asyncio operation on the host."""

from __future__ import annotations

import json
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import click

if TYPE_CHECKING:
    from vmfork.api.aio import AsyncHost

T = TypeVar("T")

#: The accelerators a command may ask for (``auto`` probes KVM, else TCG).
ACCELS = click.Choice(["auto", "kvm", "tcg"])

#: Set by the top group from --debug/--verbose; applied by :func:`configure_logging`.
_verbosity = {"debug": False, "verbose": False}


def set_verbosity(*, debug: bool, verbose: bool) -> None:
    _verbosity.update(debug=debug, verbose=verbose)


def configure_logging() -> None:
    """Send the library's log to stderr: warnings by default, state changes
    with --verbose, everything (QMP traffic included) with --debug. Called by
    the commands that work on VMs, not at start-up: listing needs no logging."""
    import logging

    debug, verbose = _verbosity["debug"], _verbosity["verbose"]
    if debug or verbose:
        from rich.console import Console
        from rich.logging import RichHandler
        handler: logging.Handler = RichHandler(console=Console(stderr=True), show_path=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("vmfork: %(levelname)s: %(message)s"))
    level = logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, handlers=[handler])
    if not debug:
        logging.getLogger("vmfork.qmp").setLevel(logging.CRITICAL)


def _json_default(obj: Any) -> Any:
    to_dict = getattr(obj, "to_dict", None)
    return to_dict() if callable(to_dict) else str(obj)


def emit_json(data: Any) -> None:
    """Print *data* as JSON; results (:mod:`vmfork.results`) as their ``to_dict()``."""
    click.echo(json.dumps(data, indent=2, sort_keys=True, default=_json_default))


def say(text: str) -> None:
    click.echo(text)


def report(as_json: bool, data: Any, text: str) -> None:
    """Print *data* as JSON with ``--json``, else the one-line *text*."""
    if as_json:
        emit_json(data)
    else:
        say(text)


def fail(message: str, code: int = 1) -> NoReturn:
    click.echo(f"vmfork: error: {message}", err=True)
    sys.exit(code)


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """Columns aligned on the widest cell, two spaces apart."""
    cells = [list(headers), *([str(c) for c in row] for row in rows)]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for r in cells:
        say("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def on_host(operation: Callable[[AsyncHost], Awaitable[T]]) -> T:
    """Run *operation* on the default host (``$VMFORK_HOME``) in an event loop;
    SIGINT, SIGTERM or SIGHUP cancel it (:mod:`vmfork.cli.signals`)."""
    from vmfork.api.aio import AsyncHost
    from vmfork.cli import signals

    configure_logging()

    async def main() -> T:
        async with AsyncHost() as host:
            return await operation(host)
    return signals.run(main())
