"""Entry point of the ``vmfork`` command (``python -m vmfork`` too)."""

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
