"""Talking to the guest: vmfork's serial agent (:mod:`.serial`), qemu-guest-agent
(:mod:`.qga`), how much either may send (:mod:`.limits`), a clone's new identity
(:mod:`.identity`) and the account of a guest that hangs (:mod:`.diagnosis`)."""
