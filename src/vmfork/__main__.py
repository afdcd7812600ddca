"""``python -m vmfork`` runs the CLI."""

from vmfork.cli.main import main

main()
