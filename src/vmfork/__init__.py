"""vmfork: instant clone, live update and save/restore of QEMU VMs."""
