"""Interactive serial console: bridge the terminal to a VM's console socket.

Ctrl-] detaches. With stdin not a terminal, stdin is sent and the output
that follows is printed until the console stays quiet for a moment.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import sys
import termios
import tty

ESCAPE = b"\x1d"  # Ctrl-]


def bridge(socket_path: str, idle_exit: float = 1.0) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(socket_path)
    fd_in, fd_out = sys.stdin.fileno(), sys.stdout.fileno()
    interactive = os.isatty(fd_in)
    saved = termios.tcgetattr(fd_in) if interactive else None
    try:
        if interactive:
            tty.setraw(fd_in)
            os.write(fd_out, b"[vmfork console: Ctrl-] to detach]\r\n")
        stdin_open = True
        sock.sendall(b"\n")
        while True:
            rlist = [sock] + ([fd_in] if stdin_open else [])
            ready, _, _ = select.select(rlist, [], [], None if interactive or stdin_open
                                        else idle_exit)
            if not ready:
                return
            if sock in ready:
                data = sock.recv(65536)
                if not data:
                    return
                os.write(fd_out, data)
            if fd_in in ready:
                data = os.read(fd_in, 4096)
                if not data:
                    stdin_open = False
                    continue
                if interactive and ESCAPE in data:
                    data = data.split(ESCAPE)[0]
                    if data:
                        sock.sendall(data)
                    return
                sock.sendall(data.replace(b"\n", b"\r") if not interactive else data)
    finally:
        if saved is not None:
            termios.tcsetattr(fd_in, termios.TCSADRAIN, saved)
            os.write(fd_out, b"\r\n")
        with contextlib.suppress(OSError):
            sock.close()
