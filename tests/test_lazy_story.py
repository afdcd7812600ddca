"""Issue 16 end to end through the CLI, with two vmfork homes on one machine:
the serving home (module-scoped: a template ``base`` whose guest holds data,
its published directory) and a pulling home per test (the ``env`` fixture).

The serving side is either a daemon of the serving home (``vmfork serve
--listen 127.0.0.1:PORT --token-file T [--rate-limit R]``) or the published
directory behind the test Range server (:mod:`tests.range_server`). The
rate limits are derived from the memory the template holds (its non-zero
chunks), so that "before the memory has fully arrived" holds whatever the
guest's size: the whole memory takes :data:`SLOW_SECONDS` at the rate.

After each test every pulled template is removed through the CLI, and the
test fails if a FUSE mount or a lazy server of the pulling home is left (the
``env`` fixture then fails on a QEMU process, socket or memory file left)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from vmfork.lazy import pack
from vmfork.lazy.published import MANIFEST, MEMORY, MEMORY_PACK, Published

from .conftest import VMFORK, Env, module_env
from .range_server import RangeServer

pytestmark = pytest.mark.qemu

#: The template: demo guest RAM and MB of data written in its RAM.
TEMPLATE_MEMORY = "256M"
DATA_MB = 16
DATA_FILE = "/root/data"
#: Seconds the whole template memory takes at the slow rate.
SLOW_SECONDS = 40.0
#: The FUSE server's deadline for a source that is gone (its default), and
#: the margin a test allows beyond it.
SOURCE_DEADLINE = 30.0
MARGIN = 60.0
#: Most chunks a prefetch request of the FUSE server asks for at once.
PREFETCH_RUN = 4
#: Seconds a daemon may take to answer, and to end after SIGTERM.
DAEMON_START = 30.0
DAEMON_STOP = 60.0


# -- waiting, processes, mounts ----------------------------------------------------------


def wait_for(what: str, check: Callable[[], Any], timeout: float) -> Any:
    """Poll *check* until it returns something true; fail after *timeout*."""
    end = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        assert time.monotonic() < end, f"{what}: not within {timeout:g} s"
        time.sleep(0.2)


def fuse_mounts(under: Path) -> list[str]:
    """Mount points of FUSE file systems under *under*."""
    found = []
    with open("/proc/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3 and parts[2].startswith("fuse"):
                point = parts[1].replace("\\040", " ")
                if point == str(under) or point.startswith(f"{under}/"):
                    found.append(point)
    return found


def mount_options(point: Path) -> list[str]:
    with open("/proc/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 4 and parts[1] == str(point):
                return parts[3].split(",")
    raise AssertionError(f"{point} is not mounted")


def lazy_servers(home: Path) -> list[psutil.Process]:
    """Lazy FUSE servers (``python -m vmfork.lazy.server DIR``) of *home*."""
    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        with contextlib.suppress(psutil.Error):
            args = p.info["cmdline"] or []
            if (p.info["status"] != psutil.STATUS_ZOMBIE and "vmfork.lazy.server" in args
                    and any(str(home) in a for a in args)):
                found.append(p)
    return found


def qemu_of(home: Path) -> list[int]:
    """Pids of the QEMU processes of *home*'s VMs."""
    found = []
    for p in psutil.process_iter(["cmdline", "status", "name"]):
        with contextlib.suppress(psutil.Error):
            if (p.info["status"] != psutil.STATUS_ZOMBIE and "qemu" in (p.info["name"] or "")
                    and any(str(home) in a for a in p.info["cmdline"] or [])):
                found.append(p.pid)
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def cli_json(env: Env, *args: str) -> Any:
    return json.loads(env.cli(*args, "--json", check=True).stdout)


def template_row(env: Env, name: str) -> dict[str, Any]:
    rows = {r["name"]: r for r in cli_json(env, "template", "ls")}
    assert name in rows, f"template {name} not listed: {sorted(rows)}"
    row: dict[str, Any] = rows[name]
    return row


def error_line(stderr: str) -> str:
    """The one ``vmfork: error:`` line of a failed command (other lines may
    be warnings of what it undid; no traceback)."""
    errors = [ln for ln in stderr.splitlines() if ln.startswith("vmfork: error:")]
    assert len(errors) == 1 and "Traceback" not in stderr, f"not one error line: {stderr!r}"
    return errors[0]


# -- the serving home ------------------------------------------------------------------------


@dataclass
class Serving:
    """The serving home: template ``base``, its data's md5, its published
    directory and manifest, a token file."""

    env: Env
    md5: str
    published: Path
    manifest: Published
    token: Path
    #: Chunks of the memory that hold the guest's data and nothing else.
    data_chunks: tuple[int, ...]

    @property
    def pack_bytes(self) -> int:
        """The memory as sent: its pack (each non-zero chunk compressed)."""
        return pack.offsets(self.manifest.packed)[-1]

    def slow_rate(self) -> int:
        """Bytes/s at which the whole memory takes SLOW_SECONDS."""
        return max(64 * 1024, int(self.pack_bytes / SLOW_SECONDS))


def data_bytes(block: bytes) -> bytes:
    """The guest's data file: DATA_MB copies of *block* (1 MiB), each after
    its index on a line (so that no two pages are alike)."""
    return b"".join(f"{i}\n".encode() + block for i in range(DATA_MB))


def data_chunks(memory: Path, data: bytes, chunk_size: int) -> tuple[int, ...]:
    """Chunks of memory file *memory* made of pages of *data* only (the
    guest's page cache of the data file): no other guest memory is in them."""
    page = 4096
    pages = {data[i:i + page] for i in range(0, len(data) - page + 1, page)}
    found = []
    with open(memory, "rb") as f:
        i = 0
        while chunk := f.read(chunk_size):
            if all(chunk[k:k + page] in pages for k in range(0, len(chunk), page)):
                found.append(i)
            i += 1
    return tuple(found)


@pytest.fixture(scope="module")
def serving(session_images: Path) -> Iterator[Serving]:
    with module_env("vflzA", session_images) as e:
        e.cli("run", "build", "--demo", "--memory", TEMPLATE_MEMORY, "--accel", "tcg",
              check=True)
        e.cli("exec", "build", "mount -o remount,size=95% /", check=True)
        block = os.urandom(1 << 20)
        (e.home / "block").write_bytes(block)
        e.cli("cp", str(e.home / "block"), "build:/run/blk", check=True)
        fill = (f"i=0 && while [ $i -lt {DATA_MB} ]; do echo $i; cat /run/blk; i=$((i+1)); "
                f"done > {DATA_FILE} && rm /run/blk && md5sum {DATA_FILE}")
        md5 = e.cli("exec", "build", fill, check=True, timeout=600).stdout.split()[0]
        data = data_bytes(block)
        assert hashlib.md5(data).hexdigest() == md5
        e.cli("template", "create", "base", "--from", "build", check=True)
        published = e.home / "published-base"
        e.cli("template", "publish", "base", str(published), check=True, timeout=600)
        manifest = Published.from_json((published / MANIFEST).read_bytes())
        token = e.home / "token"
        token.write_text("test-token-" + hashlib.sha256(os.urandom(16)).hexdigest())
        token.chmod(0o600)
        chunks = data_chunks(published / MEMORY, data, manifest.chunk_size)
        # Most of the data's 64 chunks hold nothing else (tmpfs pages in runs).
        assert len(chunks) >= DATA_MB, chunks
        yield Serving(e, md5, published, manifest, token, chunks)


@dataclass
class Daemon:
    proc: subprocess.Popen[bytes]
    url: str
    log: Path

    def template_url(self, name: str = "base") -> str:
        return f"{self.url}/v1/templates/{name}"


@contextlib.contextmanager
def daemon(serving: Serving, rate: int | None = None) -> Iterator[Daemon]:
    """``vmfork serve --listen 127.0.0.1:PORT --token-file T [--rate-limit R]``
    on the serving home; SIGTERM at the end (a SIGKILLed one is only reaped)."""
    port = free_port()
    log = serving.env.home / f"vmforkd-{port}.log"
    args = ["serve", "--listen", f"127.0.0.1:{port}", "--token-file", str(serving.token)]
    if rate:
        args += ["--rate-limit", str(rate)]
    with open(log, "ab") as out:
        proc = subprocess.Popen([VMFORK, *args], env=serving.env.environ,
                                stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    d = Daemon(proc, f"http://127.0.0.1:{port}", log)
    try:
        headers = {"Authorization": f"Bearer {serving.token.read_text().strip()}"}
        end = time.monotonic() + DAEMON_START
        with httpx.Client(headers=headers, timeout=5) as http:
            while True:
                assert proc.poll() is None, f"vmforkd ended: {log.read_text()}"
                with contextlib.suppress(httpx.TransportError):
                    if http.get(f"{d.url}/v1/health").status_code == 200:
                        break
                assert time.monotonic() < end, f"vmforkd did not answer: {log.read_text()}"
                time.sleep(0.05)
        yield d
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(DAEMON_STOP)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                raise AssertionError("vmforkd did not end after SIGTERM") from None


# -- the pulling home ------------------------------------------------------------------------


@pytest.fixture
def puller(env: Env) -> Iterator[Env]:
    """The test's home as the pulling side; afterwards every template is
    removed through the CLI and no FUSE mount or lazy server may be left."""
    yield env
    failures = []
    p = env.cli("template", "ls", "--json")
    names = [r["name"] for r in json.loads(p.stdout)] if p.returncode == 0 else []
    for vm_ in json.loads(env.cli("ls", "--json").stdout or "[]"):
        env.cli("stop", vm_["name"], "--force")
    for name in names:
        r = env.cli("template", "rm", "--force", name)
        if r.returncode != 0:
            failures.append(f"template rm {name}: {r.stderr.strip()}")
    mounts, servers = fuse_mounts(env.home), lazy_servers(env.home)
    for point in mounts:  # leave nothing behind, then fail
        subprocess.run(["fusermount3", "-u", "-z", point], check=False)
    for proc in servers:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    assert not failures, failures
    assert not mounts, f"FUSE mounts left: {mounts}"
    assert not servers, f"lazy servers left: {[s.pid for s in servers]}"


def pull(env: Env, url: str, *args: str, check: bool = True,
         timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return env.cli("template", "pull", url, *args, check=check, timeout=timeout)


def guest_md5(env: Env, name: str) -> str:
    out = env.cli("exec", name, f"md5sum {DATA_FILE}", check=True, timeout=300).stdout
    return out.split()[0]


def template_dir(env: Env, name: str) -> Path:
    return env.home / "templates" / name


def assert_gone(env: Env, name: str) -> None:
    """Template *name* left nothing: no catalog entry, directory, mount,
    server, cache or memory file."""
    names = [r["name"] for r in cli_json(env, "template", "ls")]
    assert name not in names
    assert not template_dir(env, name).exists(), sorted(template_dir(env, name).rglob("*"))
    assert fuse_mounts(env.home) == []
    assert lazy_servers(env.home) == []
    assert sorted(env.memory_dir.iterdir()) == []


# -- the tests ----------------------------------------------------------------------------------


def test_done_when_lazy_pull_from_a_daemon(serving: Serving, puller: Env) -> None:
    """The issue's "Done when": a lazy pull from a daemon with a token, then
    ``clone base -n 3``: the clones run and hold the template's data while
    the memory is still being fetched; it completes having fetched each
    non-zero chunk once, and ``template rm`` leaves nothing."""
    env = puller
    with daemon(serving, rate=serving.slow_rate()) as d:
        p = pull(env, d.template_url(), "--lazy", "--token-file", str(serving.token))
        assert p.returncode == 0
        row = template_row(env, "base")
        assert row["source"] and d.url in row["source"], row
        assert row["state"] == "fetching", row

        clones = cli_json(env, "clone", "base", "-n", "3")
        assert len(clones) == 3
        # Clones run, and the memory has not fully arrived.
        row = template_row(env, "base")
        assert row["state"] == "fetching", row
        assert 0 < row["fetched_bytes"] < serving.pack_bytes, row
        assert 0 < row["local_percent"] < 100, row
        for c in clones:
            assert guest_md5(env, c["name"]) == serving.md5
        states = {r["name"]: r["state"] for r in cli_json(env, "ls")}
        assert all(states[c["name"]] == "running" for c in clones), states

        inspect = json.loads(env.cli("template", "inspect", "base", check=True).stdout)
        assert d.url in json.dumps(inspect), inspect

        row = wait_for("the pulled template complete",
                       lambda: (r := template_row(env, "base"))["state"] == "complete" and r,
                       SLOW_SECONDS * 3 + MARGIN)
    # Every non-zero chunk fetched once (its frame in the pack), no zero chunk.
    assert row["fetched_bytes"] == serving.pack_bytes, row
    assert row["local_percent"] == 100, row
    assert row["cause"] in (None, ""), row
    for c in clones:
        env.cli("stop", c["name"], check=True)
    env.cli("template", "rm", "base", check=True)
    assert_gone(env, "base")


def test_daemon_refuses_a_wrong_token_and_eager_pull(serving: Serving, puller: Env) -> None:
    """A pull with a wrong token fails at once with one line and leaves
    nothing; an eager pull holds the whole memory in a private local file,
    with no mount, and its clones hold the data."""
    env = puller
    wrong = env.home / "wrong-token"
    wrong.write_text("not-the-token")
    wrong.chmod(0o600)
    with daemon(serving) as d:
        p = pull(env, d.template_url(), "--eager", "--token-file", str(wrong), check=False)
        assert p.returncode != 0
        assert "401" in error_line(p.stderr) or "token" in p.stderr.lower(), p.stderr
        assert_gone(env, "base")

        pull(env, d.template_url(), "copy", "--eager", "--token-file", str(serving.token))
    # The source is gone: the eager copy does not need it.
    row = template_row(env, "copy")
    assert row["state"] in ("complete", None), row
    assert fuse_mounts(env.home) == [] and lazy_servers(env.home) == []
    (c,) = cli_json(env, "clone", "copy")
    assert guest_md5(env, c["name"]) == serving.md5
    memory = Path(json.loads(env.cli("template", "inspect", "copy", check=True).stdout)
                  ["memory_file"])
    assert memory.parent == env.memory_dir, memory
    assert stat.S_IMODE(memory.stat().st_mode) & 0o077 == 0, oct(memory.stat().st_mode)
    env.cli("stop", c["name"], check=True)
    env.cli("template", "rm", "copy", check=True)
    assert_gone(env, "copy")


def test_pull_from_a_published_directory(serving: Serving, puller: Env) -> None:
    """A published directory behind a static Range server: a lazy pull reads
    the memory by ranges (never whole), an eager one too; both clones hold
    the data."""
    env = puller
    with RangeServer(serving.published) as srv:
        pull(env, srv.url, "lazy", "--lazy")
        (c1,) = cli_json(env, "clone", "lazy")
        assert guest_md5(env, c1["name"]) == serving.md5
        pull(env, srv.url, "eager", "--eager")
        (c2,) = cli_json(env, "clone", "eager")
        assert guest_md5(env, c2["name"]) == serving.md5
        requests = srv.requests
    # The memory came from the pack, by ranges of whole chunk frames.
    assert not [r for r in requests if r[1].endswith(f"/{MEMORY}")], requests
    memory_gets = [(m, rng) for m, path, rng in requests if path.endswith(f"/{MEMORY_PACK}")]
    assert memory_gets, requests
    assert all(m in ("GET", "HEAD") for m, _ in memory_gets)
    assert all(rng for m, rng in memory_gets if m == "GET"), memory_gets
    frames = set(pack.offsets(serving.manifest.packed))
    for m, rng in memory_gets:
        if m == "GET" and rng:
            first, _, last = rng.removeprefix("bytes=").partition("-")
            assert int(first) in frames and int(last) + 1 in frames, rng
    assert template_row(env, "eager")["state"] in ("complete", None)
    for c in (c1, c2):
        env.cli("stop", c["name"], check=True)


@pytest.fixture
def corrupted(serving: Serving, tmp_path: Path) -> tuple[Path, int]:
    """A copy of the published directory with one non-zero chunk of the
    memory changed in the pack (what it unpacks to no longer matches its
    sha256 in the manifest); the chunk's index."""
    d = tmp_path / "published"
    shutil.copytree(serving.published, d)
    # The last one: nothing reads it before the background prefetch does.
    index = max(i for i, c in enumerate(serving.manifest.chunks) if c is not None)
    at = pack.offsets(serving.manifest.packed)
    with open(d / MEMORY_PACK, "r+b") as f:
        pos = (at[index] + at[index + 1]) // 2
        f.seek(pos)
        byte = f.read(1)
        f.seek(pos)
        f.write(bytes([byte[0] ^ 0xFF]))
    return d, index


def test_a_corrupted_chunk_is_refused(serving: Serving, puller: Env,
                                      corrupted: tuple[Path, int]) -> None:
    """An eager pull fails on the chunk and leaves nothing; a lazy pull's
    server fetches it again, then refuses it: the template is ``broken``
    with a one-line cause, and ``template rm`` cleans up."""
    env = puller
    d, index = corrupted
    at = pack.offsets(serving.manifest.packed)
    with RangeServer(d) as srv:
        p = pull(env, srv.url, "eager", "--eager", check=False)
        assert p.returncode != 0
        assert "sha256" in error_line(p.stderr).lower() or "chunk" in p.stderr.lower(), p.stderr
        assert_gone(env, "eager")

        before = len(srv.requests)
        pull(env, srv.url, "lazy", "--lazy")
        row = wait_for("the lazy template broken",
                       lambda: (r := template_row(env, "lazy"))["state"] == "broken" and r,
                       SLOW_SECONDS + MARGIN)
        assert row["cause"] and "\n" not in row["cause"], row
        # The bad chunk was fetched twice by the lazy server (one more try).
        lazy_tries = 0
        for m, path, rng in srv.requests[before:]:
            if m == "GET" and path.endswith(f"/{MEMORY_PACK}") and rng:
                first, _, last = rng.removeprefix("bytes=").partition("-")
                if int(first) <= at[index] <= int(last):
                    lazy_tries += 1
        assert lazy_tries >= 2, srv.requests
    env.cli("template", "rm", "--force", "lazy", check=True)
    assert_gone(env, "lazy")


def test_source_killed_during_prefetch(serving: Serving, puller: Env) -> None:
    """The daemon killed while a lazy template is still fetching, before any
    clone: a clone fails with one error line within the server's deadline,
    no QEMU is left, the template is ``broken`` with a one-line cause that
    names the source, and ``template rm --force`` leaves no mount, no server
    and no cache. An eager pull whose source goes away fails with one line
    naming it and leaves nothing."""
    env = puller
    with daemon(serving, rate=serving.slow_rate()) as d:
        pull(env, d.template_url(), "--lazy", "--token-file", str(serving.token))
        assert template_row(env, "base")["state"] == "fetching"
        d.proc.kill()
        d.proc.wait(10)
    p = env.cli("clone", "base", timeout=SOURCE_DEADLINE + MARGIN)
    assert p.returncode != 0, p.stdout
    error_line(p.stderr)
    assert cli_json(env, "ls") == []
    assert not qemu_of(env.home)
    row = wait_for("the template broken", lambda: (
        r := template_row(env, "base"))["state"] == "broken" and r, SOURCE_DEADLINE + MARGIN)
    assert row["cause"] and "\n" not in row["cause"] and "127.0.0.1" in row["cause"], row
    env.cli("template", "rm", "--force", "base", check=True)
    assert_gone(env, "base")
    assert not [p for p in psutil.process_iter(["cmdline"])
                if any(str(env.home) in a for a in (p.info["cmdline"] or []))]

    with RangeServer(serving.published, rate=serving.slow_rate()) as srv:
        proc = subprocess.Popen([VMFORK, "template", "pull", srv.url, "eager", "--eager"],
                                env=env.environ, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            # Past the whole files: a tenth of the memory has been sent.
            some = sum(f.size for f in serving.manifest.files.values()) + \
                serving.pack_bytes // 10
            wait_for("the eager pull under way",
                     lambda: srv.bytes_sent > some or proc.poll() is not None,
                     SLOW_SECONDS + MARGIN)
            srv.stop()
            _, err = proc.communicate(timeout=SOURCE_DEADLINE + MARGIN)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode != 0, "the eager pull ended well without its source"
    assert srv.url in error_line(err), err
    assert_gone(env, "eager")


def test_clone_that_cannot_read_its_memory_is_reported_dead(serving: Serving,
                                                            puller: Env) -> None:
    """A clone runs from a lazy template whose source cannot serve the
    chunks of the guest's data (503 for them: a source gone for part of the
    memory): a read of the data ends the clone's QEMU (never wrong data),
    the clone is reported dead with that cause and the template ``broken``
    with a cause naming the source; ``template rm --force`` leaves nothing."""
    env = puller
    # Chunks of data amid data: a prefetch request for several chunks in a
    # row that takes one of them asks for data only.
    data = set(serving.data_chunks)
    inner = [i for i in data if all(i + k in data for k in range(-PREFETCH_RUN, PREFETCH_RUN + 1))]
    assert inner, serving.data_chunks
    at = pack.offsets(serving.manifest.packed)
    refuse = tuple((MEMORY_PACK, at[i], at[i + 1] - 1) for i in inner)
    with RangeServer(serving.published, refuse=refuse) as srv:
        pull(env, srv.url, "base", "--lazy")
        (c,) = cli_json(env, "clone", "base")
        r = env.cli("exec", c["name"], f"md5sum {DATA_FILE}", timeout=SOURCE_DEADLINE + MARGIN)
        assert r.returncode != 0, f"the data was read without its source: {r.stdout}"
        error_line(r.stderr)
        states = wait_for("the clone reported dead", lambda: (
            s := {v["name"]: v["state"] for v in cli_json(env, "ls")})[c["name"]] == "dead"
            and s, MARGIN)
        assert states == {c["name"]: "dead"}
        row = wait_for("the template broken", lambda: (
            r := template_row(env, "base"))["state"] == "broken" and r, SOURCE_DEADLINE + MARGIN)
        assert row["cause"] and srv.url in row["cause"] and "\n" not in row["cause"], row
    # The dead clone is reported with the cause: by a command on it, or its listing.
    again = env.cli("exec", c["name"], "true")
    assert again.returncode != 0
    (listed,) = [v for v in cli_json(env, "ls") if v["name"] == c["name"]]
    assert srv.url in error_line(again.stderr) or srv.url in json.dumps(listed), (
        f"the dead clone's report does not name the cause {row['cause']!r}: "
        f"{again.stderr.strip()!r}, {listed}")
    env.cli("template", "rm", "--force", "base", check=True)
    assert_gone(env, "base")
    assert not qemu_of(env.home)


def test_complete_template_outlives_its_source(serving: Serving, puller: Env) -> None:
    """A lazy pull from a published directory completes; the cache and the
    mount are its owner's only; with the source gone the template still
    clones and its clones hold the data."""
    env = puller
    with RangeServer(serving.published) as srv:
        pull(env, srv.url, "base", "--lazy")
        tdir = template_dir(env, "base")
        mnt = tdir / "mnt"
        # Permissions while the memory is served through FUSE.
        assert stat.S_IMODE(tdir.stat().st_mode) == 0o700
        for f in ("memory.cache", "chunks.bitmap", "lazy.json", "published.json", "source.json",
                  "token", "server.log"):
            if (tdir / f).exists():
                assert stat.S_IMODE((tdir / f).stat().st_mode) & 0o077 == 0, f
        assert stat.S_IMODE((tdir / "memory.cache").stat().st_mode) & 0o077 == 0
        if fuse_mounts(env.home):
            assert "allow_other" not in mount_options(mnt)
            assert stat.S_IMODE(mnt.stat().st_mode) & 0o077 == 0
            assert stat.S_IMODE((mnt / MEMORY).stat().st_mode) & 0o077 == 0
            other = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534",
                                    "--clear-groups", "head", "-c", "1", str(mnt / MEMORY)],
                                   capture_output=True, timeout=30)
            assert other.returncode != 0, "another user read the memory"
        (c1,) = cli_json(env, "clone", "base")
        wait_for("the pulled template complete",
                 lambda: template_row(env, "base")["state"] == "complete",
                 SLOW_SECONDS + MARGIN)
    assert guest_md5(env, c1["name"]) == serving.md5
    env.cli("stop", c1["name"], check=True)
    (c2,) = cli_json(env, "clone", "base")
    assert guest_md5(env, c2["name"]) == serving.md5
    assert template_row(env, "base")["state"] == "complete"
    cache = template_dir(env, "base") / "memory.cache"
    assert stat.S_IMODE(cache.stat().st_mode) & 0o077 == 0, oct(cache.stat().st_mode)
    env.cli("stop", c2["name"], check=True)
    env.cli("template", "rm", "base", check=True)
    assert_gone(env, "base")
