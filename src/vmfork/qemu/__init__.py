"""Talking to QEMU: one process and its QMP monitor (:mod:`.machine`), device
state and migrations (:mod:`.migration`), the accelerator probe (:mod:`.accel`).

Knows nothing of the catalog: the layers above record what it returns."""
