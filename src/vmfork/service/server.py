"""Serving the daemon: uvicorn on vmfork's UNIX socket or on TCP.

Owns where and how vmforkd listens. By default on ``$VMFORK_HOME/vmforkd.sock``,
a socket vmfork binds itself (uvicorn would make its own 0666) and makes
0600 before it listens, inside the 0700 home; a stale socket of a daemon
that is gone is replaced, a live daemon's is refused. ``listen="HOST:PORT"``
serves TCP and then needs a bearer token (:func:`read_token`); an address
other than loopback is warned about; ``tls_cert``/``tls_key`` turn on TLS;
``rate_limit`` caps the template file answers (a link of that speed).
SIGTERM and SIGINT end the daemon after the requests in flight (uvicorn's
graceful shutdown); VMs keep running either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import secrets
import signal
import socket
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import uvicorn

from vmfork.api.aio import AsyncHost
from vmfork.errors import InvalidInput, StateError, UnsafePath
from vmfork.private import FILE_MODE
from vmfork.service import template_files
from vmfork.service.app import create_app
from vmfork.service.gate import MAX_STARTS, START_QUEUE, StartGate
from vmfork.service.state import ServiceState
from vmfork.timeouts import DEFAULT, Timeouts

log = logging.getLogger("vmfork.service")

SOCKET_NAME = "vmforkd.sock"


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling (:func:`serve` has its own)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def default_socket(home: Path) -> Path:
    return home / SOCKET_NAME


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) as host and port."""
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise InvalidInput(f"invalid listen address {text!r}: use HOST:PORT, e.g. "
                           "127.0.0.1:8421")
    return host, int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_token(path: Path | str, create: bool = True) -> str:
    """The bearer token in *path*, a file only its owner may read. A missing
    file is made (0600) with a new random token if *create*."""
    p = Path(path)
    if not p.exists() and create:
        token = secrets.token_urlsafe(32)
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, FILE_MODE)
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
        log.warning("a new token is in %s", p)
        return token
    try:
        st = os.stat(p, follow_symlinks=False)
    except FileNotFoundError:
        raise InvalidInput(f"token file {str(p)!r} does not exist") from None
    if not stat.S_ISREG(st.st_mode):
        raise InvalidInput(f"token file {str(p)!r} is not a regular file")
    if st.st_mode & 0o077 or st.st_uid != os.getuid():
        raise UnsafePath(f"token file {str(p)!r} must be yours and mode 0600 "
                         f"(it is {stat.S_IMODE(st.st_mode):04o})")
    token = p.read_text().strip()
    if len(token) < 16 or any(c.isspace() for c in token):
        raise InvalidInput(f"token file {str(p)!r} holds no usable token "
                           "(at least 16 characters, no spaces)")
    return token


def _daemon_answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True


def bind_unix(path: Path) -> socket.socket:
    """A listening UNIX socket at *path*, mode 0600 before it listens."""
    if path.exists() or path.is_symlink():
        if _daemon_answers(path):
            raise StateError(f"a daemon serves {path} already")
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        old = os.umask(0o177)
        try:
            sock.bind(str(path))
        finally:
            os.umask(old)
        os.chmod(path, FILE_MODE)
        sock.listen(128)
    except BaseException:
        sock.close()
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        raise
    return sock


def bind_tcp(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say
    # TCP, and without it a small answer written after its headers waits for
    # the client's delayed ACK (~40 ms).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise InvalidInput(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    return sock


async def serve(home: Path | str | None = None, *, listen: str | None = None,
                socket_path: Path | str | None = None, token_file: Path | str | None = None,
                tls_cert: str | None = None, tls_key: str | None = None,
                timeouts: Timeouts = DEFAULT, max_starts: int = MAX_STARTS,
                on_ready: Callable[[str], None] | None = None,
                start_queue: int = START_QUEUE, rate_limit: float | None = None) -> None:
    """Serve the REST API until SIGTERM or SIGINT. At most *max_starts* QEMU
    starts run at once, *start_queue* more wait (:mod:`vmfork.service.gate`);
    *rate_limit* caps the bytes/s of all template file answers together
    (:mod:`vmfork.service.template_files`); *on_ready* is called with the
    address once the daemon listens."""
    if bool(tls_cert) != bool(tls_key):
        raise InvalidInput("TLS needs both --tls-cert and --tls-key")
    starts = StartGate(max_starts, start_queue)
    token = read_token(token_file) if token_file else None
    async with AsyncHost(home, timeouts=timeouts) as host:
        unix_path: Path | None = None
        if listen:
            addr, port = parse_listen(listen)
            if token is None:
                raise InvalidInput("serving TCP needs a bearer token: give --token-file F")
            if not is_loopback(addr):
                log.warning("serving on %s: reachable from other hosts%s", listen,
                            "" if tls_cert else ", without TLS (--tls-cert/--tls-key)")
            sock = bind_tcp(addr, port)
            where = f"http{'s' if tls_cert else ''}://{listen}"
        else:
            unix_path = Path(socket_path) if socket_path else default_socket(host.home)
            sock = bind_unix(unix_path)
            where = f"unix:{unix_path}"
        state = ServiceState(host=host, token=token, starts=starts)
        template_files.set_rate_limit(state, rate_limit)
        app = create_app(state)
        config = uvicorn.Config(app, log_level="warning", access_log=False,
                                ssl_certfile=tls_cert, ssl_keyfile=tls_key,
                                timeout_graceful_shutdown=int(timeouts.stop) + 5)
        server = _Server(config)
        loop = asyncio.get_running_loop()

        def begin_stop() -> None:
            server.should_exit = True
            state.stopping.set()  # ends event streams before uvicorn waits for them

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, begin_stop)
        log.info("vmforkd serves %s", where)
        if on_ready is not None:
            on_ready(where)
        try:
            await server.serve(sockets=[sock])
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            sock.close()
            if unix_path is not None:
                with contextlib.suppress(FileNotFoundError):
                    unix_path.unlink()


__all__ = ["SOCKET_NAME", "bind_unix", "default_socket", "is_loopback", "parse_listen",
           "read_token", "serve"]
