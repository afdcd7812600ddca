"""Saved VMs and portable snapshots.

* :mod:`vmfork.snapshots.save` — save and restore a persistent VM in place:
  device state only, the RAM stays in its memory file on disk; the manifest
  that makes a save crash-safe, :func:`~vmfork.snapshots.save.verify`,
  recovery after a killed save or restore, and the stall points tests use.
* :mod:`vmfork.snapshots.export` — the portable snapshot file (one file with
  header, kernel, initrd, RAM and device state): its format, its checks, and
  writing one from a running, paused or saved VM.
* :mod:`vmfork.snapshots.imports` — bringing such a file back as a VM or a
  template.

``export`` uses ``save`` (a saved VM is exported from its state file);
``imports`` uses both.
"""
