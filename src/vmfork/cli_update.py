"""CLI commands for live update (vmfork update, vmfork bench update)."""
