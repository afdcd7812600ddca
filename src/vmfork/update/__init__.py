"""Live update: move a running guest into a new QEMU process, maybe another
binary, without copying its RAM where its memory allows.

The package, one job per module (arrows point down)::

    live       update(): the order of one update, under the VM's lock
     +-- recovery   settle an update a killed vmfork left behind
     |    +-- commit     the new QEMU becomes the VM (shared by both)
     +-- modes      which modes a VM and two binaries allow, and why not
     +-- move       the move between two QEMUs and its rollback
     +-- memory     host memory of the QEMUs, peak sampling, copy headroom

What a QEMU binary supports is learned in :mod:`vmfork.qemu.features`;
migrations are run by :mod:`vmfork.qemu.migration`.
"""
