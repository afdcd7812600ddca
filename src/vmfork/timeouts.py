"""Per-phase deadlines, in one place (seconds)."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace


def scale() -> float:
    """Slow hosts may stretch every deadline with ``VMFORK_TIMEOUT_SCALE``."""
    try:
        return max(0.1, float(os.environ.get("VMFORK_TIMEOUT_SCALE", "1")))
    except ValueError:
        return 1.0


@dataclass(frozen=True)
class Timeouts:
    """How long each kind of wait may take before :class:`VmforkTimeout`."""

    start: float = 15.0      # QEMU process up and QMP greeting received
    qmp: float = 10.0        # one QMP command
    boot: float = 120.0      # guest ready marker after start
    stop: float = 10.0       # each of quit, SIGTERM and SIGKILL
    migrate: float = 120.0   # a state save, load or migration to complete
    exec: float = 60.0       # one guest command via the agent
    agent: float = 10.0      # connect to the guest agent
    agent_attempt: float = 3.0  # one try to reach a guest agent that may not be up yet

    def scaled(self) -> Timeouts:
        s = scale()
        if s == 1.0:
            return self
        return replace(self, **{k: v * s for k, v in self.__dict__.items()})


#: The deadlines every command uses, stretched by ``VMFORK_TIMEOUT_SCALE``
#: (read once, at import).
DEFAULT = Timeouts().scaled()
