"""CLI commands for save/restore and portable snapshots, and `vmfork bench save`."""
