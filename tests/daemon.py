"""A real vmforkd process for tests: started on the test's home, talked to
over its UNIX socket with httpx, ended with SIGTERM (and its end checked)."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from .conftest import VMFORK, Env

#: Seconds a daemon may take to serve, and to end after SIGTERM.
START_DEADLINE = 30.0
STOP_DEADLINE = 60.0


@dataclass
class Daemon:
    """One daemon process and a client of its socket."""

    proc: subprocess.Popen[bytes]
    socket: Path
    log: Path
    http: httpx.Client

    def get(self, path: str, **kw: object) -> httpx.Response:
        return self.http.get(path, **kw)  # type: ignore[arg-type]

    def post(self, path: str, json: object = None, **kw: object) -> httpx.Response:
        return self.http.post(path, json=json, **kw)  # type: ignore[arg-type]

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)


def start_daemon(env: Env, *args: str) -> Daemon:
    """Start ``vmfork serve ARGS`` on *env*'s home; return once it answers."""
    sock = env.home / "vmforkd.sock"
    log = env.home / "vmforkd.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen([VMFORK, "serve", *args], env=env.environ,
                                stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    http = httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)),
                        base_url="http://vmforkd", timeout=600)
    end = time.monotonic() + START_DEADLINE
    while True:
        assert proc.poll() is None, f"vmforkd ended: {log.read_text()}"
        with contextlib.suppress(httpx.TransportError):
            if http.get("/v1/health").status_code == 200:
                break
        assert time.monotonic() < end, f"vmforkd did not answer: {log.read_text()}"
        time.sleep(0.05)
    return Daemon(proc, sock, log, http)


def stop_daemon(d: Daemon) -> int:
    """SIGTERM the daemon; return its exit status."""
    d.http.close()
    if d.proc.poll() is None:
        d.proc.send_signal(signal.SIGTERM)
        try:
            d.proc.wait(STOP_DEADLINE)
        except subprocess.TimeoutExpired:
            d.proc.kill()
            d.proc.wait()
            raise AssertionError("vmforkd did not end after SIGTERM") from None
    return d.proc.returncode


@pytest.fixture
def daemon(env: Env) -> Iterator[Daemon]:
    """A daemon on the test's home (its VMs are the test's, cleaned up by env)."""
    d = start_daemon(env)
    try:
        yield d
    finally:
        code = stop_daemon(d)
        assert code in (0, -signal.SIGKILL), f"vmforkd exited {code}: {d.log.read_text()}"
