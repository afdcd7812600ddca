"""CLI commands for templates, clones and the warm pool."""
