"""Host ports of port forwards (``--port HOST:GUEST``) for VMs made from a
template: each clone or pool member needs host ports of its own.

Owns :func:`fresh_forwards` (the template's forwards, each on a free host
port) and :func:`collided` (whether a QEMU failed to start because a host
port was taken). A free port is found by letting the kernel choose one
(binding ``127.0.0.1:0``); it is free when chosen, and QEMU binds it moments
later. Ports this process has handed out are not handed out again, so the
clones of one call never share one; another process can still take a port
in between, and then QEMU fails to start: the caller starts it again on new
ports, at most :data:`ATTEMPTS` times.
"""

from __future__ import annotations

import socket

from vmfork.errors import LaunchError, ResourceError

#: Starts of one clone or pool member on fresh ports before its collision is
#: reported.
ATTEMPTS = 3

#: Ports handed out by this process.
_given: set[int] = set()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now and that this process has not
    handed out before."""
    held = []
    try:
        for _ in range(64):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            held.append(s)  # kept bound while looking, so the kernel picks another
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
            if port not in _given:
                _given.add(port)
                return port
    except OSError as exc:
        raise ResourceError(f"no free TCP port on 127.0.0.1: {exc.strerror}") from exc
    finally:
        for s in held:
            s.close()
    raise ResourceError("no free TCP port on 127.0.0.1 that vmfork has not handed out")


def fresh_forwards(forwards: tuple[tuple[int, int], ...]) -> tuple[tuple[int, int], ...]:
    """*forwards* (host, guest) with each host port replaced by a free one."""
    return tuple((free_port(), guest) for _host, guest in forwards)


def collided(exc: BaseException) -> bool:
    """Whether *exc* is QEMU refusing to start because a forward's host port
    is taken (its log says it could not set up the forwarding rule)."""
    return isinstance(exc, LaunchError) and "host forwarding rule" in exc.log_tail


__all__ = ["ATTEMPTS", "collided", "free_port", "fresh_forwards"]
