"""Talking to QEMU: one process and its QMP monitor, the QMP error boundary
(:mod:`.machine`), what a binary is and supports (:mod:`.features`), device
state and migrations (:mod:`.migration`), the accelerator probe (:mod:`.accel`),
the capped console log (:mod:`.console_log`).

Knows nothing of the catalog: the layers above record what it returns."""
