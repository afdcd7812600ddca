"""``python -m vmfork`` runs the CLI."""

from .cli import main

main()
