"""``python -m vmfork`` runs the CLI."""

from vmfork.cli import main

main()
