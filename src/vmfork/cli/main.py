"""Entry point of the ``vmfork`` command (``python -m vmfork`` too)."""

from __future__ import annotations


def main() -> None:
    """Entry point of the ``vmfork`` command. It runs with umask 077: what
    it creates, and what anything it calls creates, is its user's alone (the
    library itself leaves the umask of a program that embeds it alone and
    gives explicit modes: :mod:`vmfork.private`). SIGINT, SIGTERM and SIGHUP
    cancel what it does, cleanly (:mod:`vmfork.cli.signals`)."""
    import os
    import sys

    os.umask(0o077)
    from vmfork.cli import signals
    signals.install()
    from vmfork.errors import VmforkError
    try:
        from vmfork.cli.app import cli
    except VmforkError as exc:  # e.g. a bad VMFORK_TIMEOUT_SCALE, read at import
        print(f"vmfork: error: {exc}", file=sys.stderr)
        sys.exit(2)
    cli()


def vmforkd() -> None:
    """Entry point of the ``vmforkd`` command: ``vmfork serve``."""
    import sys

    sys.argv[1:1] = ["serve"]
    main()
