"""Per-phase deadlines, in one place (seconds).

:class:`Timeouts` is a value object with one field per kind of wait; every
wait that crosses a process boundary takes its deadline from one of them.
:data:`DEFAULT` is the set every command uses, stretched by
``VMFORK_TIMEOUT_SCALE`` (:func:`scale`) for slow hosts.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields, replace

from vmfork.errors import InvalidInput

#: Environment variable: a factor (finite, > 0) applied to every deadline.
SCALE_ENV = "VMFORK_TIMEOUT_SCALE"


def scale() -> float:
    """The factor from ``VMFORK_TIMEOUT_SCALE`` (1.0 when unset or empty);
    raise InvalidInput if it is not a finite number above 0."""
    raw = os.environ.get(SCALE_ENV, "").strip()
    if not raw:
        return 1.0
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise InvalidInput(f"{SCALE_ENV}={raw!r}: expected a number above 0 that stretches "
                           "every deadline (e.g. 2 on a slow host)")
    return value


def _seconds(v: object) -> bool:
    """Whether *v* can be a deadline: a finite int or float above 0."""
    if isinstance(v, bool) or not isinstance(v, int | float):
        return False
    return math.isfinite(v) and v > 0


def check_seconds(value: object, what: str) -> float:
    """*value* as a deadline in seconds: a finite number above 0, else
    InvalidInput naming *what* (e.g. ``"--timeout"`` of a command)."""
    if not _seconds(value):
        raise InvalidInput(f"invalid {what} {value!r}: expected a finite number of seconds "
                           "above 0")
    return float(value)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Timeouts:
    """How long each kind of wait may take before :class:`VmforkTimeout`.

    Every field must be a finite number of seconds above 0 (InvalidInput
    otherwise)."""

    start: float = 15.0      # QEMU process up and QMP greeting received
    qmp: float = 10.0        # one QMP command
    boot: float = 120.0      # guest ready marker after start
    stop: float = 10.0       # each of quit and SIGTERM
    # A killed QEMU's exit: at once, unless a thread is blocked in the kernel,
    # which it leaves only once that call returns — a page fault on a lazily
    # pulled template's memory waits for its FUSE server, which answers
    # within its fetch deadline (30 s).
    killed_exit: float = 60.0
    migrate: float = 120.0   # a state save, load or migration to complete
    exec: float = 60.0       # one guest command via the agent
    agent: float = 10.0      # connect to the guest agent
    agent_attempt: float = 3.0  # one try to reach a guest agent that may not be up yet
    accel_probe: float = 20.0  # one probe boot of the demo kernel under KVM (accel auto)
    # Another vmfork command working on the same VM holds its lock; the
    # longest legitimate holder is a copy-mode update or save of a large VM.
    lock: float = 300.0
    catalog: float = 30.0      # the SQLite catalog locked by another process's write

    # -- snapshots: save/restore, export/import, bench save --------------------------
    # Setting the guest clock after a restore or import is best effort: a
    # guest whose agent does not answer must not hold the command up for the
    # full agent and exec deadlines, so the clock has short ones of its own.
    clock_agent: float = 5.0   # connect to the guest agent to set the clock
    clock_exec: float = 10.0   # the guest command that sets the clock
    # A migration that copies all guest RAM through a file (snapshot export and
    # import, bench save's full-RAM baseline) takes longer than a device-state
    # save, and grows with the RAM size.
    ram_copy: float = 360.0
    # A guest command that reads GiBs of guest data (bench save's md5sum of
    # what it wrote), several times longer than an ordinary command.
    checksum: float = 300.0

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if not _seconds(v):
                raise InvalidInput(f"timeout {f.name}={v!r}: expected a finite number of "
                                   "seconds above 0")

    def scaled(self) -> Timeouts:
        """These deadlines stretched by :func:`scale`."""
        s = scale()
        if s == 1.0:
            return self
        return replace(self, **{f.name: getattr(self, f.name) * s for f in fields(self)})


#: The deadlines every command uses, stretched by ``VMFORK_TIMEOUT_SCALE``
#: (read once, at import: a bad value makes importing vmfork fail).
DEFAULT = Timeouts().scaled()
