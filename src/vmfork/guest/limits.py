"""How much a guest may send vmfork, through either agent.

Owns the caps on guest output and the error for going over them. A guest is
untrusted: whatever it prints, vmfork (and QEMU on its behalf) must not use
host memory or disk without bound. One answer of a guest agent (the serial
agent's, :mod:`.serial`; a ``guest-exec`` of qemu-guest-agent, :mod:`.qga`)
carries at most :data:`MAX_ANSWER` bytes of output, stdout and stderr
together; more is refused with :class:`TooMuchOutput` (the command ran; its
output is dropped). The console log has its own cap
(:mod:`vmfork.qemu.console_log`).
"""

from __future__ import annotations

from vmfork.errors import GuestError

#: Most bytes of output (stdout and stderr together) one guest command may
#: return: QGA's own cap on a ``guest-exec``'s output is 16 MiB per stream,
#: so through either agent a command gets the same room. Holding one answer
#: costs vmfork about three times this at the peak (its base64 text, then
#: the bytes, then the text of the result).
MAX_ANSWER = 16 << 20
#: Longest line the serial agent may send. Its base64 lines are 76 bytes,
#: markers a few dozen, the echo of a request at most a few KiB.
MAX_LINE = 64 << 10


def b64_size(n: int) -> int:
    """Length of the base64 text of *n* bytes (no line breaks)."""
    return 4 * ((n + 2) // 3)


#: Most base64 text (line breaks not counted) of one answer: stdout's and
#: stderr's, each padded on its own.
MAX_ANSWER_B64 = b64_size(MAX_ANSWER) + 4


def size_text(n: int) -> str:
    """*n* bytes for a message: ``16 MiB``, ``97.7 KiB``, ``100 bytes``."""
    if n >= 1 << 20:
        return f"{n / (1 << 20):.3g} MiB"
    return f"{n / 1024:.3g} KiB" if n >= 1024 else f"{n} bytes"


class TooMuchOutput(GuestError):
    """A guest sent more than vmfork accepts (:data:`MAX_ANSWER`, :data:`MAX_LINE`)."""

    def __init__(self, name: str, what: str, cap: int) -> None:
        self.cap = cap
        super().__init__(f"{name}: {what} over {size_text(cap)} (the most vmfork accepts); "
                         "the rest was dropped")
