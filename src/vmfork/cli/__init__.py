"""The ``vmfork`` command: a thin layer of click commands over the public API
(:mod:`vmfork.api`).

Owns argument parsing and output: one line of text per result, or with
``--json`` the result's ``to_dict()``; errors as one line on stderr with an
exit status from one table (:mod:`.app`). Commands are loaded when used, so
that ``vmfork ls`` starts in a few tens of milliseconds."""

from __future__ import annotations


def main() -> None:
    """Entry point of the ``vmfork`` command."""
    import sys

    from vmfork.errors import VmforkError
    try:
        from vmfork.cli.app import cli
    except VmforkError as exc:  # e.g. a bad VMFORK_TIMEOUT_SCALE, read at import
        print(f"vmfork: error: {exc}", file=sys.stderr)
        sys.exit(2)
    cli()
