"""``vmfork template pull`` across two vmfork homes on one machine, over
loopback HTTP: the source (URLs, tokens, ranges, retries), an eager pull from
a published directory (and from a daemon), clones holding the template's
data, refusals (bad URL or token, a corrupted file or chunk) that leave
nothing behind, a pull killed half-way undone by the next command, and the
modes of what a pull writes.

The published directory is written by ``publish_to_dir`` (what ``vmfork
template publish`` does) and served by :class:`FileServer`, a small
Range-capable HTTP server with an optional bearer token that can corrupt a
byte of a file as it sends it, fail or answer slowly.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import httpx
import pytest

from vmfork.errors import InvalidInput, SourceError
from vmfork.lazy import lifecycle, pack
from vmfork.lazy.publish import publish_to_dir
from vmfork.lazy.published import (
    CHUNK_SIZE,
    KERNEL,
    MANIFEST,
    MEMORY,
    MEMORY_PACK,
    STATE,
    Published,
)
from vmfork.lazy.pull import _runs
from vmfork.lazy.source import Source, base_url
from vmfork.templates import create

from .conftest import VMFORK, Env, module_env, run

pytestmark = pytest.mark.qemu

PREPARE = ("head -c 4194304 /dev/urandom > /root/data && md5sum /root/data | cut -d' ' -f1 "
           "> /root/data.md5")
TOKEN = "s3cret-token-of-the-pull-tests"


# -- a Range-capable HTTP server for tests ---------------------------------------------------
@dataclass
class Served:
    """What a :class:`FileServer` serves and how it misbehaves."""

    root: Path
    token: str | None = None
    #: file name -> byte offset flipped in every answer that covers it
    corrupt: dict[str, int] = field(default_factory=dict)
    #: answer 503 to this many requests first
    fail_first: int = 0
    #: answer range requests with the whole file (200)
    no_range: bool = False
    #: seconds each answer waits first (a slow link)
    delay: float = 0.0
    requests: list[tuple[str, str | None]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    served: Served

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _empty(self, status: int, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self) -> None:
        s = self.served
        rng = self.headers.get("Range")
        with s.lock:
            s.requests.append((self.path, rng))
            failing = s.fail_first > 0
            s.fail_first -= 1 if failing else 0
        if failing:
            return self._empty(503)
        time.sleep(s.delay)
        if s.token is not None and self.headers.get("Authorization") != f"Bearer {s.token}":
            return self._empty(401)
        name = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path).lstrip("/")
        path = s.root / name
        if "/" in name or not path.is_file():
            return self._empty(404)
        size = path.stat().st_size
        start, end, status = 0, size - 1, 200
        m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng or "")
        if m and not s.no_range:
            start = int(m.group(1))
            end = min(int(m.group(2)) if m.group(2) else size - 1, size - 1)
            if start >= size or end < start:
                return self._empty(416, {"Content-Range": f"bytes */{size}"})
            status = 206
        with open(path, "rb") as f:
            f.seek(start)
            data = bytearray(f.read(end - start + 1))
        bad = s.corrupt.get(name)
        if bad is not None and start <= bad <= end:
            data[bad - start] ^= 0xFF
        self.send_response(status)
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(len(data)))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        with contextlib.suppress(OSError):
            self.wfile.write(data)


class FileServer:
    """Serves a :class:`Served` directory on a free loopback port until stopped."""

    def __init__(self, served: Served) -> None:
        handler = type("Handler", (_Handler,), {"served": served})
        self.served = served
        self._srv = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._srv.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._srv.server_address[1]}"
        self._thread = threading.Thread(target=self._srv.serve_forever,
                                        kwargs={"poll_interval": 0.1}, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._srv.shutdown()
        self._srv.server_close()
        self._thread.join(10)


@contextlib.contextmanager
def serving(root: Path, **kw: object) -> Iterator[FileServer]:
    srv = FileServer(Served(root, **kw))  # type: ignore[arg-type]
    try:
        yield srv
    finally:
        srv.stop()


# -- the publisher ---------------------------------------------------------------------------
@dataclass
class Publisher:
    env: Env
    published: Published
    directory: Path


@pytest.fixture(scope="module")
def publisher(session_images: Path) -> Iterator[Publisher]:
    """Home A with template ``base`` (256 MiB, 4 MiB of random data and its
    md5 in /root) and its published directory."""
    with module_env("vfpa", session_images) as env:
        manifest = run(create.create_demo(env.store(), "base", memory_mib=256,
                                          prepare=PREPARE, accel="tcg"))
        directory = Path(tempfile.mkdtemp(prefix="vfpub", dir="/tmp"))
        try:
            publish_to_dir(env.store(), manifest.name, directory / "base")
            published = Published.from_json((directory / "base" / MANIFEST).read_bytes())
            yield Publisher(env, published, directory / "base")
        finally:
            shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def unpacked(publisher: Publisher, tmp_path: Path) -> Path:
    """The publisher's directory as a publisher that packs no memory writes
    it: no ``memory.zst``, no ``packed`` in the manifest."""
    d = tmp_path / "unpacked"
    shutil.copytree(publisher.directory, d)
    (d / MEMORY_PACK).unlink()
    m = json.loads((d / MANIFEST).read_bytes())
    del m["packed"]
    (d / MANIFEST).write_text(json.dumps(m))
    return d


@pytest.fixture
def token_file(env: Env) -> Path:
    p = env.home / "source.token"
    p.write_text(TOKEN + "\n")
    p.chmod(0o600)
    return p


def nothing_left(env: Env, name: str) -> None:
    """No template, template directory, memory file or mount of *name*."""
    s = env.store()
    assert not s.has_template(name)
    assert not (env.home / "templates" / name).exists()
    assert list(env.memory_dir.iterdir()) == []
    assert not lifecycle.is_mounted(env.home / "templates" / name / lifecycle.MOUNT_DIR)


def one_line(p: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in p.stderr.splitlines() if line.startswith("vmfork: error:")]
    assert len(lines) == 1, p.stderr
    assert "cleaning up after a failed pull failed" not in p.stderr
    return lines[0]


def md5_matches(env: Env, name: str) -> bool:
    now = env.exec(name, "md5sum /root/data | cut -d' ' -f1")
    return bool(now.strip()) and now == env.exec(name, "cat /root/data.md5")


def private_tree(root: Path) -> list[str]:
    """Paths under *root* (and itself) that others may access."""
    bad = []
    for p in [root, *root.rglob("*")]:
        mode = stat.S_IMODE(p.lstat().st_mode)
        if mode & 0o077:
            bad.append(f"{p} {mode:04o}")
    return bad


# -- the source, alone -----------------------------------------------------------------------
def test_base_url_tells_a_daemon_from_a_directory() -> None:
    assert base_url("http://h:8080/v1/templates/base") == (
        "http://h:8080/v1/templates/base/files", "base")
    assert base_url("https://h/v1/templates/base/") == (
        "https://h/v1/templates/base/files", "base")
    assert base_url("http://h:1/pub/base/") == ("http://h:1/pub/base", None)
    for bad in ("ftp://h/x", "http:///x", "h:80/x", "http://h/x?a=1", "http://u:p@h/x",
                "http://h:notaport/x", "http://h/x y", ""):
        with pytest.raises(InvalidInput):
            base_url(bad)


def test_runs_group_non_zero_chunks() -> None:
    a = "a" * 64
    assert _runs((a, a, None, a, a, a, None), 2) == [(0, 2), (3, 2), (5, 1)]
    assert _runs((None, None), 4) == []
    assert _runs((a,), 4) == [(0, 1)]


def test_source_ranges_retries_and_refusals(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(bytes(range(256)) * 16)
    with serving(tmp_path, token=TOKEN, fail_first=2) as srv:
        with Source(srv.url, TOKEN) as src:
            # two 503s, then the range
            assert src.get_range("f", 10, 5, time.monotonic() + 30) == bytes(range(10, 15))
            assert src.get("f", time.monotonic() + 30) == bytes(range(256)) * 16
            with pytest.raises(SourceError, match="more than the 100 allowed"):
                src.get("f", time.monotonic() + 30, limit=100)
            n = len(srv.served.requests)
            with pytest.raises(SourceError, match=r"/missing: not found \(404\)"):
                src.get("missing", time.monotonic() + 30)
            assert len(srv.served.requests) == n + 1  # refused at once: no retry
        with Source(srv.url, "wrong") as src, pytest.raises(SourceError, match="token"):
            src.get("f", time.monotonic() + 30)
    with serving(tmp_path, no_range=True) as srv, Source(srv.url) as src, \
            pytest.raises(SourceError, match="no Range support"):
        src.get_range("f", 0, 10, time.monotonic() + 30)
    with serving(tmp_path, fail_first=10**6) as srv, Source(srv.url) as src:
        with pytest.raises(SourceError, match=r"no answer after \d+ tries \(HTTP 503\)"):
            src.get("f", time.monotonic() + 1)
        assert len(srv.served.requests) > 1


class _KeepAliveThenClose(BaseHTTPRequestHandler):
    """HTTP/1.1, answers one request per connection, then closes it without
    saying so (a keep-alive that ended while the client kept it)."""

    protocol_version = "HTTP/1.1"
    connections: ClassVar[list[int]] = []

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        m = re.fullmatch(r"bytes=(\d+)-(\d+)", self.headers.get("Range", ""))
        assert m is not None
        body = bytes(range(int(m[1]), int(m[2]) + 1))
        self.connections.append(id(self.connection))
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {m[1]}-{m[2]}/256")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        self.close_connection = True


def test_source_keeps_connections_and_replaces_one_the_source_closed(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # A retry with backoff would outlast the deadline: the closed kept
    # connection is replaced at once, not retried.
    monkeypatch.setattr("vmfork.lazy.source.BACKOFF_FIRST", 60.0)
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _KeepAliveThenClose)
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05},
                     daemon=True).start()
    try:
        with Source(f"http://127.0.0.1:{srv.server_address[1]}/x") as src:
            for i in range(5):
                assert src.get_range("f", i, 3, time.monotonic() + 10) == bytes(range(i, i + 3))
        assert len(_KeepAliveThenClose.connections) == 5
    finally:
        srv.shutdown()
        srv.server_close()


def test_source_gone_fails_at_the_deadline() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    with Source(f"http://127.0.0.1:{port}/x") as src, \
            pytest.raises(SourceError, match=f"127.0.0.1:{port}/x/f: no answer after"):
        src.get("f", time.monotonic() + 0.5)


# -- pulls -------------------------------------------------------------------------------------
def test_eager_pull_from_a_directory_gives_working_clones(publisher: Publisher, env: Env,
                                                          token_file: Path) -> None:
    with serving(publisher.directory, token=TOKEN) as srv:
        p = env.cli("template", "pull", srv.url, "copy", "--eager", "--token-file",
                    str(token_file), "--json", check=True)
    r = json.loads(p.stdout)
    assert (r["name"], r["mode"], r["state"], r["source"]) == ("copy", "eager", "complete",
                                                               srv.url)
    assert r["memory_mib"] == 256
    # The memory came compressed (the guest's 4 MiB of random data do not
    # compress, its kernel does).
    assert 4 << 20 < r["fetched_bytes"] < r["memory_bytes"]
    asked = {r[0] for r in srv.served.requests}
    assert f"/{MEMORY_PACK}" in asked and f"/{MEMORY}" not in asked
    tdir = env.home / "templates" / "copy"
    memory = Path(r["memory_file"])
    assert memory.parent == env.memory_dir
    assert private_tree(tdir) == [] and private_tree(memory) == []
    assert stat.S_IMODE(tdir.stat().st_mode) == 0o700
    assert memory.read_bytes() == (publisher.directory / MEMORY).read_bytes()
    # The demo kernel is among this host's images: copied from there, not fetched.
    assert (tdir / KERNEL).read_bytes() == (publisher.directory / KERNEL).read_bytes()
    assert f"/{KERNEL}" not in {r[0] for r in srv.served.requests}

    rows = json.loads(env.cli("template", "ls", "--json", check=True).stdout)
    (row,) = rows
    assert (row["source"], row["state"], row["local_percent"]) == (srv.url, "complete", 100.0)
    assert "complete" in env.cli("template", "ls", check=True).stdout
    shown = json.loads(env.cli("template", "inspect", "copy", check=True).stdout)
    assert shown["pull"]["source"] == srv.url
    assert shown["spec"]["kernel"] == str(tdir / KERNEL)
    assert shown["qemu"] == "qemu-system-x86_64"

    # The source is gone; the clones run from the local copy.
    env.cli("clone", "copy", "c", "-n", "2", check=True)
    assert md5_matches(env, "c-1") and md5_matches(env, "c-2")
    env.cli("template", "rm", "copy", "--force", check=True)
    nothing_left(env, "copy")


def test_eager_pull_from_a_daemon(publisher: Publisher, env: Env, token_file: Path) -> None:
    """``vmfork serve --listen`` with a token on the publisher's home."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    daemon_token = publisher.env.home / "daemon.token"
    daemon_token.write_text(TOKEN + "\n")
    daemon_token.chmod(0o600)
    log = publisher.env.home / "vmforkd-pull.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen([VMFORK, "serve", "--listen", f"127.0.0.1:{port}",
                                 "--token-file", str(daemon_token)],
                                env=publisher.env.environ, stdin=subprocess.DEVNULL,
                                stdout=out, stderr=out)
    url = f"http://127.0.0.1:{port}/v1/templates/base"
    try:
        end = time.monotonic() + 30
        while True:
            assert proc.poll() is None, log.read_text()
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"http://127.0.0.1:{port}/v1/health").status_code == 200:
                    break
            assert time.monotonic() < end, log.read_text()
            time.sleep(0.05)
        probe = httpx.get(f"{url}/files/manifest.json",
                          headers={"Authorization": f"Bearer {TOKEN}"})
        if probe.status_code == 404:
            pytest.skip("this daemon does not publish template files (GET .../files/FILE)")
        # Without the token: refused with one line, nothing left.
        p = env.cli("template", "pull", url, "--eager")
        assert p.returncode == 1 and "token" in one_line(p)
        nothing_left(env, "base")
        env.cli("template", "pull", url, "--eager", "--token-file", str(token_file),
                check=True)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    env.cli("clone", "base", "d", check=True)
    assert md5_matches(env, "d")
    env.cli("stop", "d", check=True)
    env.cli("template", "rm", "base", check=True)
    nothing_left(env, "base")


def test_bad_urls_and_tokens_give_one_line(publisher: Publisher, env: Env,
                                           token_file: Path) -> None:
    for url in ("ftp://127.0.0.1/base", "not a url", "http://127.0.0.1:99999/x"):
        p = env.cli("template", "pull", url, "x", "--eager")
        assert p.returncode == 2, p.stderr
        assert "invalid source URL" in one_line(p)
    p = env.cli("template", "pull", "http://127.0.0.1:1/x", "x", "--token-file",
                str(env.home / "missing"))
    assert p.returncode == 2 and "token file" in one_line(p)
    with serving(publisher.directory, token=TOKEN) as srv:
        p = env.cli("template", "pull", srv.url, "x", "--eager")
        assert p.returncode == 1 and "401" in one_line(p)
        p = env.cli("template", "pull", f"{srv.url}/nowhere", "x", "--eager",
                    "--token-file", str(token_file))
        assert p.returncode == 1 and "not found (404)" in one_line(p)
    nothing_left(env, "x")


def test_eager_pull_of_an_unpacked_layout(unpacked: Path, publisher: Publisher,
                                          env: Env) -> None:
    """A layout without ``memory.zst``: the memory comes from ``memory``."""
    with serving(unpacked) as srv:
        env.cli("template", "pull", srv.url, "raw", "--eager", check=True)
    asked = {r[0] for r in srv.served.requests}
    assert f"/{MEMORY}" in asked and f"/{MEMORY_PACK}" not in asked
    memory = env.store().get_template("raw").memory_path
    assert memory.read_bytes() == (publisher.directory / MEMORY).read_bytes()
    env.cli("template", "rm", "raw", check=True)
    nothing_left(env, "raw")


def test_corrupted_files_are_refused_and_leave_nothing(publisher: Publisher, env: Env,
                                                       unpacked: Path,
                                                       token_file: Path) -> None:
    first = next(i for i, c in enumerate(publisher.published.chunks) if c is not None)
    at = pack.offsets(publisher.published.packed)
    chunk = f"chunk {first} .*does not match its sha256"
    for directory, name, offset, what in (
            (publisher.directory, STATE, 100, "state: its sha256 differs"),
            # a byte of the chunk's frame in the pack
            (publisher.directory, MEMORY_PACK, (at[first] + at[first + 1]) // 2, chunk),
            (unpacked, MEMORY, first * CHUNK_SIZE + 123, chunk)):
        with serving(directory, token=TOKEN, corrupt={name: offset}) as srv:
            p = env.cli("template", "pull", srv.url, "bad", "--eager", "--token-file",
                        str(token_file))
        assert p.returncode == 1, p.stderr
        assert re.search(what, one_line(p)), p.stderr
        # fetched twice, then refused
        tries = [r for r in srv.served.requests if r[0] == f"/{name}"]
        assert len(tries) >= 2
        nothing_left(env, "bad")


def test_a_pull_killed_half_way_is_undone_by_the_next_command(publisher: Publisher, env: Env,
                                                              token_file: Path) -> None:
    with serving(publisher.directory, token=TOKEN) as srv:
        proc = subprocess.Popen([VMFORK, "template", "pull", srv.url, "half", "--eager",
                                 "--token-file", str(token_file)],
                                env={**env.environ, "VMFORK_TEST_STALL": "pull.memory"},
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        try:
            assert proc.stderr is not None
            seen = []
            while not seen or ("stalling at pull.memory" not in seen[-1] and seen[-1]):
                seen.append(proc.stderr.readline())  # '' at its end
            assert "stalling at pull.memory" in seen[-1], seen
            assert env.store().template_work("half") is not None
            assert list(env.memory_dir.iterdir()), "the memory file was not written"
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
    p = env.cli("template", "ls", "--json", check=True)
    assert json.loads(p.stdout) == []
    nothing_left(env, "half")


# -- lazy pulls (need the FUSE server, vmfork.lazy.server) ------------------------------------
def _server_or_skip() -> None:
    import importlib.util

    if importlib.util.find_spec("vmfork.lazy.server") is None:
        pytest.skip("the FUSE server (vmfork.lazy.server) is not here")


def wait_for(what: str, check: Callable[[], bool], seconds: float = 60) -> None:
    end = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < end, f"{what} did not happen within {seconds} s"
        time.sleep(0.05)


def test_lazy_pull_serves_clones_and_rm_ends_the_server(publisher: Publisher, env: Env,
                                                         token_file: Path) -> None:
    """A slow source: the clones run and hold the template's data while its
    memory is still arriving."""
    _server_or_skip()
    with serving(publisher.directory, token=TOKEN, delay=0.05) as srv:
        p = env.cli("template", "pull", srv.url, "lazy", "--token-file", str(token_file),
                    "--json", check=True)
        r = json.loads(p.stdout)
        assert (r["mode"], r["source"], r["state"]) == ("lazy", srv.url, "fetching")
        tdir = env.home / "templates" / "lazy"
        assert r["memory_file"] == str(tdir / "mnt" / "memory")
        assert lifecycle.is_mounted(tdir / "mnt")
        assert lifecycle.server_pid(tdir) is not None
        (row,) = json.loads(env.cli("template", "ls", "--json", check=True).stdout)
        assert (row["source"], row["state"]) == (srv.url, "fetching")
        assert row["local_percent"] < 100
        env.cli("clone", "lazy", "l", "-n", "2", check=True)
        assert md5_matches(env, "l-1") and md5_matches(env, "l-2")
        assert private_tree(tdir) == [], "pulled files are private"
        pid = lifecycle.server_pid(tdir)
        env.cli("template", "rm", "lazy", "--force", check=True)
    assert pid is None or not lifecycle._is_server(pid, tdir)
    nothing_left(env, "lazy")


def test_a_killed_server_is_repaired_by_the_next_command(publisher: Publisher, env: Env,
                                                          token_file: Path) -> None:
    """kill -9 of the FUSE server while it fetches (a slow source): the next
    command unmounts what it left and starts it again; it resumes, completes,
    and ends once unused; the command after that moves the template onto
    its cache."""
    _server_or_skip()
    tdir = env.home / "templates" / "rev"
    with serving(publisher.directory, token=TOKEN, delay=0.05) as srv:
        env.cli("template", "pull", srv.url, "rev", "--token-file", str(token_file),
                check=True)
        pid = lifecycle.server_pid(tdir)
        assert pid is not None and lifecycle.read_status(tdir).state == "fetching"
        os.kill(pid, signal.SIGKILL)
        wait_for("the server's end", lambda: not lifecycle._is_server(pid, tdir))
        env.cli("template", "ls", check=True)  # settles: a new server
        again = lifecycle.server_pid(tdir)
        assert again not in (None, pid) and lifecycle.is_mounted(tdir / "mnt")
        env.cli("clone", "rev", "r", check=True)
        assert md5_matches(env, "r")
        env.cli("stop", "r", check=True)
        wait_for("the memory complete and the server gone",
                 lambda: lifecycle.server_pid(tdir) is None, 300)
    assert lifecycle.read_status(tdir).state == "complete"
    (row,) = json.loads(env.cli("template", "ls", "--json", check=True).stdout)
    assert (row["state"], row["local_percent"]) == ("complete", 100.0)
    assert env.store().get_template("rev").memory_file == str(tdir / lifecycle.CACHE_FILE)
    assert not lifecycle.is_mounted(tdir / "mnt")
    env.cli("clone", "rev", "r2", check=True)  # the source is gone: from the cache
    assert md5_matches(env, "r2")
    env.cli("template", "rm", "rev", "--force", check=True)
    nothing_left(env, "rev")


def test_the_daemon_pulls_as_an_operation(publisher: Publisher, env: Env,
                                          token_file: Path) -> None:
    from .daemon import start_daemon, stop_daemon

    d = start_daemon(env)
    try:
        r = d.post("/v1/templates/pull", {"url": "ftp://x/y"})
        assert (r.status_code, r.json()["error"]["code"]) == (400, "invalid")
        r = d.post("/v1/templates/pull", {"url": "http://127.0.0.1:1/x",
                                          "token_file": "relative.token"})
        assert r.status_code == 400
        with serving(publisher.directory, token=TOKEN) as srv:
            r = d.post("/v1/templates/pull", {"url": srv.url, "name": "api", "lazy": False,
                                              "token_file": str(token_file)})
            assert r.status_code == 202, r.text
            op = r.json()
            wait_for("the pull operation's end",
                     lambda: d.get(f"/v1/operations/{op['id']}").json()["state"] != "running",
                     120)
        done = d.get(f"/v1/operations/{op['id']}").json()
        assert done["state"] == "done", done
        assert (done["result"]["name"], done["result"]["mode"]) == ("api", "eager")
        shown = d.get("/v1/templates/api").json()
        assert (shown["source"], shown["state"], shown["local_percent"]) == (
            srv.url, "complete", 100.0)
        assert shown["manifest"]["imported_from"] == srv.url
        assert d.http.delete("/v1/templates/api").status_code == 200
    finally:
        assert stop_daemon(d) == 0
    nothing_left(env, "api")
