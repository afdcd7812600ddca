"""The lazy memory server (``python -m vmfork.lazy.server``) on its own: a
real FUSE mount over a real Range-capable HTTP server started here, serving a
layout built with :mod:`vmfork.lazy.published` from a random sparse memory
file; and one demo template's memory served through the mount to a real
QEMU clone."""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import hashlib
import json
import mmap
import os
import random
import re
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import psutil
import pytest

from vmfork.lazy.lifecycle import (
    BITMAP_FILE,
    BROKEN,
    CACHE_FILE,
    COMPLETE,
    FETCHING,
    MOUNT_DIR,
    PUBLISHED_FILE,
    SOURCE_FILE,
    STATUS_FILE,
    LazyStatus,
    is_mounted,
    read_status,
)
from vmfork.lazy.mountlock import exit_lock
from vmfork.lazy.published import CHUNK_SIZE, MEMORY, Published, PublishedFile
from vmfork.records import TemplateManifest, TemplateSave
from vmfork.results import MigrationStats
from vmfork.spec import MemorySpec, VMSpec

from .chunk_sums import chunk_sha256s
from .conftest import Env

CS = CHUNK_SIZE
#: 40 full chunks and a partial one.
SIZE = 40 * CS + (128 << 10)
WORKING_SET = (7, 3)


# -- a Range-capable HTTP server ---------------------------------------------------------
class _Handler(BaseHTTPRequestHandler):
    server: _HTTP

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        path = self.server.root / self.path.lstrip("/")
        if not path.is_file() or path.parent != self.server.root:
            self.send_error(HTTPStatus.NOT_FOUND)
            return
        m = re.fullmatch(r"bytes=(\d+)-(\d+)", self.headers.get("Range", ""))
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if m is None:
                self.send_error(HTTPStatus.BAD_REQUEST)
                return
            start, end = int(m[1]), min(int(m[2]), size - 1)
            if start > end:
                self.send_error(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
                return
            with self.server.lock:
                self.server.ranges.append((self.path, start, end + 1))
            self.send_response(HTTPStatus.PARTIAL_CONTENT)
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
            self.send_header("Content-Length", str(end - start + 1))
            self.end_headers()
            self.wfile.write(os.pread(f.fileno(), end - start + 1, start))


class _HTTP(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, root: Path) -> None:
        self.root = root
        self.lock = threading.Lock()
        self.ranges: list[tuple[str, int, int]] = []
        super().__init__(("127.0.0.1", 0), _Handler)


class RangeServer:
    """Serves the files of one directory, single ranges only, one request per
    connection (so that ``stop()`` leaves no connection to serve more)."""

    def __init__(self, root: Path) -> None:
        self.http = _HTTP(root)
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}"
        self.thread = threading.Thread(target=self.http.serve_forever,
                                       kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        self.stopped = False

    def chunk_fetches(self) -> dict[int, int]:
        """How often each chunk of ``memory`` was fetched."""
        counts: dict[int, int] = {}
        with self.http.lock:
            for path, start, end in self.http.ranges:
                assert path == "/" + MEMORY and start % CS == 0
                for i in range(start // CS, -(-end // CS)):
                    counts[i] = counts.get(i, 0) + 1
        return counts

    def stop(self) -> None:
        if not self.stopped:
            self.stopped = True
            self.http.shutdown()
            self.http.server_close()
            self.thread.join(timeout=10)


@contextlib.contextmanager
def range_server(root: Path) -> Iterator[RangeServer]:
    srv = RangeServer(root)
    try:
        yield srv
    finally:
        srv.stop()


# -- a layout and a server process -------------------------------------------------------
def manifest(name: str = "t", memory_file: str = "/m/t.mem",
             size: int = SIZE) -> TemplateManifest:
    spec = VMSpec(name=name, memory_mib=256, kernel="/k", machine="pc-q35-10.0",
                  memory=MemorySpec(path=memory_file, share=False, readonly=True))
    stats = MigrationStats(status="completed", seconds=0.01, total_time_ms=10,
                           downtime_ms=10, ram_bytes=0, total_bytes=1000)
    return TemplateManifest(
        name=name, created=1_700_000_000.0, source_vm=f"{name}.build", memory_file=memory_file,
        memory_size=size, state_file="/h/state", state_size=1, state_sha256="ab" * 32,
        qemu_version="10.0.2", machine="pc-q35-10.0", qemu="qemu-system-x86_64", spec=spec,
        save=TemplateSave(stats, freeze_seconds=0.0, total_seconds=0.01))


@dataclasses.dataclass
class Layout:
    pub: Path  # what the HTTP server serves
    tdir: Path  # the template dir of the server
    memory: bytes
    chunks: tuple[str | None, ...]

    @property
    def nonzero(self) -> set[int]:
        return {i for i, c in enumerate(self.chunks) if c is not None}

    @property
    def nonzero_bytes(self) -> int:
        return sum(min(CS, SIZE - i * CS) for i in self.nonzero)

    @property
    def mnt(self) -> Path:
        return self.tdir / MOUNT_DIR / MEMORY


def write_layout(root: Path, pub: Published, url: str | None = None) -> Path:
    tdir = root / "tpl"
    tdir.mkdir(mode=0o700, exist_ok=True)
    (tdir / PUBLISHED_FILE).write_bytes(pub.to_json())
    if url is not None:
        (tdir / SOURCE_FILE).write_text(json.dumps({"url": url, "token_file": None}))
    return tdir


@pytest.fixture
def layout(tmp_path: Path) -> Layout:
    """A sparse random memory file (holes, chunks of zeros written out, data
    chunks, a partial last chunk) published in ``pub/``, and a template dir
    whose ``published.json`` describes it."""
    rnd = random.Random(16)
    pub = tmp_path / "pub"
    pub.mkdir()
    with open(pub / MEMORY, "wb") as f:
        f.truncate(SIZE)
        for i in range(-(-SIZE // CS)):
            kind = "data" if i in WORKING_SET else rnd.choice(("hole", "zeros", "data", "data"))
            if kind == "zeros":
                f.seek(i * CS)
                f.write(bytes(min(CS, SIZE - i * CS)))
            elif kind == "data":
                at = rnd.randrange(0, min(CS, SIZE - i * CS) - 4096)
                f.seek(i * CS + at)
                f.write(rnd.randbytes(4096))
    chunks = chunk_sha256s(pub / MEMORY)
    assert None in chunks and sum(c is not None for c in chunks) > 10
    p = Published(name="t", template=manifest(), files={"state": PublishedFile(1, "ab" * 32)},
                  memory_size=SIZE, chunk_size=CS, chunks=chunks, working_set=WORKING_SET)
    return Layout(pub, write_layout(tmp_path, p), (pub / MEMORY).read_bytes(), chunks)


def wait_for(what: str, cond: Callable[[], object], timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def status(tdir: Path) -> LazyStatus:
    st = read_status(tdir)
    assert st is not None
    return st


def mounted(tdir: Path) -> bool:
    return is_mounted(tdir / MOUNT_DIR)


class Server:
    """One server process on a template dir; ``stop()`` (SIGTERM, then
    SIGKILL; then any mount left is detached) runs at the end of the
    ``with`` block whatever happened."""

    def __init__(self, tdir: Path, *args: str, hold: bool = False) -> None:
        self.tdir = tdir
        self.log = open(tdir.parent / "server.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen([sys.executable, "-m", "vmfork.lazy.server", str(tdir),
                                      *args], stdout=self.log, stderr=self.log,
                                     stdin=subprocess.PIPE if hold else subprocess.DEVNULL)

    def wait_mounted(self) -> None:
        def up() -> bool:
            assert self.proc.poll() is None, f"server exited: {self.output()}"
            st = read_status(self.tdir)
            return st is not None and st.pid == self.proc.pid and mounted(self.tdir)

        wait_for("the mount", up)

    def output(self) -> str:
        return (self.tdir.parent / "server.log").read_text(errors="replace")[-3000:]

    def wait(self, timeout: float = 60) -> int:
        return self.proc.wait(timeout)

    def release(self) -> None:
        """End the server's stdin: a held server starts its prefetch."""
        assert self.proc.stdin is not None
        self.proc.stdin.close()

    def stop(self) -> int:
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            self.proc.stdin.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        self.log.close()
        if mounted(self.tdir):
            subprocess.run(["fusermount3", "-u", "-z", str(self.tdir / MOUNT_DIR)], check=False,
                           timeout=30)
        return self.proc.returncode

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def saved_chunks(tdir: Path) -> int:
    """Chunks named in ``chunks.bitmap`` (after its 56-byte header: magic,
    manifest key, cache device and inode)."""
    try:
        return sum(bin(b).count("1") for b in (tdir / BITMAP_FILE).read_bytes()[56:])
    except FileNotFoundError:
        return 0


def private(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# -- the tests ---------------------------------------------------------------------------
def test_reads_right_bytes_fetches_each_chunk_once_and_never_zeros(layout: Layout) -> None:
    with range_server(layout.pub) as src:
        write_layout(layout.pub.parent, _published(layout), src.url)
        with Server(layout.tdir, "--no-prefetch") as srv:
            srv.wait_mounted()
            st = status(layout.tdir)
            assert (st.state, st.fetched_bytes, st.total_bytes) == (FETCHING, 0, SIZE)
            assert st.chunks_local == len(layout.chunks) - len(layout.nonzero)
            # Private: the cache, the status, the mount and its file.
            assert private(layout.tdir / CACHE_FILE) == 0o600
            assert private(layout.tdir / STATUS_FILE) == 0o600
            assert private(layout.tdir / MOUNT_DIR) == 0o500
            assert private(layout.mnt) == 0o400
            assert os.listdir(layout.tdir / MOUNT_DIR) == [MEMORY]
            assert layout.mnt.stat().st_size == SIZE
            with pytest.raises(OSError):
                open(layout.mnt, "r+b").close()
            # Four threads read the whole file at once, each in its own order.
            def read_all(seed: int) -> bytes:
                order = list(range(0, SIZE, 64 << 10))
                random.Random(seed).shuffle(order)
                fd = os.open(layout.mnt, os.O_RDONLY)
                try:
                    buf = bytearray(SIZE)
                    for off in order:
                        part = os.pread(fd, 64 << 10, off)
                        buf[off:off + len(part)] = part
                    return bytes(buf)
                finally:
                    os.close(fd)

            with ThreadPoolExecutor(4) as pool:
                results = list(pool.map(read_all, range(4), timeout=120))
            assert all(r == layout.memory for r in results)
            # Each data chunk fetched once, no zero chunk ever.
            assert src.chunk_fetches() == {i: 1 for i in layout.nonzero}
            wait_for("the status", lambda: status(layout.tdir).state == COMPLETE)
            st = status(layout.tdir)
            assert (st.fetched_bytes, st.local_bytes, st.chunks_local) == (
                layout.nonzero_bytes, SIZE, len(layout.chunks))
            assert st.local_percent == 100.0 and st.completed is not None
            assert private(layout.tdir / BITMAP_FILE) == 0o600
            # The file maps privately, read-only, as QEMU maps a template's memory.
            with open(layout.mnt, "rb") as f:
                m = mmap.mmap(f.fileno(), 0, mmap.MAP_PRIVATE, mmap.PROT_READ | mmap.PROT_WRITE)
                assert m[:] == layout.memory
                m[0:4] = b"mine"  # a private copy of the page
                m.close()
            assert layout.mnt.read_bytes() == layout.memory
            assert srv.stop() == 0  # SIGTERM
        assert not mounted(layout.tdir)
        st = status(layout.tdir)
        assert (st.state, st.pid) == (COMPLETE, None)


def _published(layout: Layout) -> Published:
    return Published.from_json((layout.tdir / PUBLISHED_FILE).read_bytes())


_libc = ctypes.CDLL(None, use_errno=True)


def resident_pages(m: mmap.mmap, offset: int, length: int) -> int:
    """Pages of the file mapped by *m* (privately and writable, so that
    ctypes takes its buffer; never touched here) in [offset, offset +
    length) that the kernel's page cache holds, filled (mincore)."""
    view = ctypes.c_char.from_buffer(m, offset)
    try:
        vec = (ctypes.c_ubyte * (length // 4096))()
        if _libc.mincore(ctypes.c_void_p(ctypes.addressof(view)), ctypes.c_size_t(length),
                         vec) != 0:
            raise OSError(ctypes.get_errno(), "mincore")
        return sum(b & 1 for b in vec)
    finally:
        del view


#: A process that maps a file as QEMU maps guest RAM (privately, advised
#: for huge pages) and, for each offset read from stdin, prints the md5 of
#: the page there, or of the whole file for "all" (after writing to a page:
#: a private copy). A process of its own: a page fault blocks it, and the
#: HTTP server of these tests runs in the test's process.
_TOUCHER = """
import hashlib, mmap, sys
f = open(sys.argv[1], "rb")
m = mmap.mmap(f.fileno(), 0, mmap.MAP_PRIVATE, mmap.PROT_READ | mmap.PROT_WRITE)
m.madvise(mmap.MADV_HUGEPAGE)
for line in sys.stdin:
    if line.strip() == "all":
        m[0:4] = b"mine"
        data = m[:]
    else:
        at = int(line)
        data = m[at:at + 4096]
    print(hashlib.md5(data).hexdigest(), flush=True)
"""


def test_a_page_fault_fetches_its_chunk_alone_and_fills_the_page_cache(
        layout: Layout) -> None:
    """On a mapping advised for huge pages (as QEMU advises guest RAM) the
    kernel reads 4 MiB (16 chunks) around a faulting page; the server
    refuses that readahead and serves the page alone: one chunk fetched,
    then pushed whole into the page cache."""
    k = next(i for i in sorted(layout.nonzero) if i + 1 in layout.nonzero)
    page = k * CS + 5 * 4096
    with range_server(layout.pub) as src:
        write_layout(layout.pub.parent, _published(layout), src.url)
        with Server(layout.tdir, "--no-prefetch") as srv:
            srv.wait_mounted()
            toucher = subprocess.Popen([sys.executable, "-c", _TOUCHER, str(layout.mnt)],
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            assert toucher.stdin is not None and toucher.stdout is not None
            try:
                toucher.stdin.write(f"{page}\n")
                toucher.stdin.flush()
                assert toucher.stdout.readline().strip() == hashlib.md5(
                    layout.memory[page:page + 4096]).hexdigest()
                assert src.chunk_fetches() == {k: 1}
                # The rest of the chunk is in the page cache without being
                # read through the server; its refused neighbour is not.
                with open(layout.mnt, "rb") as f:
                    m = mmap.mmap(f.fileno(), 0, mmap.MAP_PRIVATE,
                                  mmap.PROT_READ | mmap.PROT_WRITE)
                try:
                    wait_for("the chunk in the page cache",
                             lambda: resident_pages(m, k * CS, CS) == CS // 4096)
                    assert resident_pages(m, (k + 1) * CS, CS) == 0
                finally:
                    m.close()
                # Every byte reads right, a write stays private, each chunk
                # is fetched once, no chunk of zeros ever.
                toucher.stdin.write("all\n")
                toucher.stdin.flush()
                assert toucher.stdout.readline().strip() == hashlib.md5(
                    b"mine" + layout.memory[4:]).hexdigest()
                assert src.chunk_fetches() == {i: 1 for i in layout.nonzero}
            finally:
                toucher.kill()
                toucher.wait()
            assert layout.mnt.read_bytes() == layout.memory


def test_a_held_server_prefetches_once_its_stdin_ends(layout: Layout) -> None:
    """A pull holds its server's prefetch while it downloads the other
    files; reads are served meanwhile."""
    k = sorted(layout.nonzero)[-1]
    with range_server(layout.pub) as src:
        write_layout(layout.pub.parent, _published(layout), src.url)
        with Server(layout.tdir, "--linger", "30", hold=True) as srv:
            srv.wait_mounted()
            with open(layout.mnt, "rb") as f:
                assert os.pread(f.fileno(), 4096, k * CS) == layout.memory[k * CS:k * CS + 4096]
            time.sleep(1.0)  # time to prefetch everything, were it not held
            assert src.chunk_fetches() == {k: 1}
            assert status(layout.tdir).state == FETCHING
            srv.release()
            wait_for("the prefetch", lambda: status(layout.tdir).state == COMPLETE)
            assert src.chunk_fetches() == {i: 1 for i in layout.nonzero}


def test_prefetch_completes_working_set_first_then_exits_when_unused(layout: Layout) -> None:
    with range_server(layout.pub) as src:
        write_layout(layout.pub.parent, _published(layout), src.url)
        with Server(layout.tdir, "--linger", "0.2") as srv:
            assert srv.wait() == 0, srv.output()  # complete, nobody uses it: it exits
            assert not mounted(layout.tdir)
            st = status(layout.tdir)
            assert (st.state, st.pid, st.cause) == (COMPLETE, None, None)
            assert (st.chunks_local, st.fetched_bytes) == (len(layout.chunks),
                                                           layout.nonzero_bytes)
            # The working set went first, then the rest; each chunk once.
            with src.http.lock:
                first = [start // CS for _, start, _ in src.http.ranges[:1]]
            assert first[0] in WORKING_SET
            assert src.chunk_fetches() == {i: 1 for i in layout.nonzero}
            assert (layout.tdir / CACHE_FILE).read_bytes() == layout.memory


def test_restart_after_kill_resumes_from_the_bitmap(layout: Layout) -> None:
    half = sorted(layout.nonzero)[:len(layout.nonzero) // 2]
    with range_server(layout.pub) as src:
        write_layout(layout.pub.parent, _published(layout), src.url)
        with Server(layout.tdir, "--no-prefetch") as srv:
            srv.wait_mounted()
            fd = os.open(layout.mnt, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # no readahead
                for i in half:
                    assert os.pread(fd, CS, i * CS) == layout.memory[i * CS:(i + 1) * CS]
            finally:
                os.close(fd)
            assert src.chunk_fetches() == {i: 1 for i in half}
            wait_for("the bitmap", lambda: saved_chunks(layout.tdir) == len(half))
            # SIGKILL, and its fusermount3 too (the auto_unmount watcher, which
            # unmounts after a SIGKILL most of the time): a dead mount is left.
            for child in psutil.Process(srv.proc.pid).children():
                child.kill()
            srv.proc.kill()
            srv.wait()
            assert mounted(layout.tdir)
        assert src.chunk_fetches() == {i: 1 for i in half}
        # A launcher holding the exit lock keeps a complete server mounted.
        with exit_lock(layout.tdir, timeout=10):
            with Server(layout.tdir, "--linger", "0.2") as srv:
                wait_for("complete", lambda: status(layout.tdir).state == COMPLETE)
                time.sleep(1)
                assert srv.proc.poll() is None and mounted(layout.tdir)
            assert srv.wait() == 0, srv.output()
        assert src.chunk_fetches() == {i: 1 for i in layout.nonzero}
        st = status(layout.tdir)
        assert (st.state, st.fetched_bytes) == (COMPLETE, layout.nonzero_bytes)
        assert (layout.tdir / CACHE_FILE).read_bytes() == layout.memory
        # A bitmap without its cache file names nothing: all is fetched again.
        (layout.tdir / CACHE_FILE).unlink()
        with Server(layout.tdir, "--no-prefetch") as srv:
            srv.wait_mounted()
            assert status(layout.tdir).chunks_local == len(layout.chunks) - len(layout.nonzero)
            assert layout.mnt.read_bytes() == layout.memory
        assert src.chunk_fetches() == {i: 2 for i in layout.nonzero}


def test_corrupt_chunk_is_fetched_again_then_refused(layout: Layout) -> None:
    bad = sorted(layout.nonzero)[3]
    good = sorted(layout.nonzero)[1]
    data = bytearray(layout.memory)
    data[bad * CS + 5] ^= 0xFF
    (layout.pub / MEMORY).write_bytes(bytes(data))
    with range_server(layout.pub) as src:
        write_layout(layout.pub.parent, _published(layout), src.url)
        with Server(layout.tdir, "--no-prefetch") as srv:
            srv.wait_mounted()
            fd = os.open(layout.mnt, os.O_RDONLY)
            try:
                assert os.pread(fd, 4096, good * CS) == layout.memory[good * CS:][:4096]
                with pytest.raises(OSError) as e:
                    os.pread(fd, 4096, bad * CS)
                assert e.value.errno == errno.EIO
                st = status(layout.tdir)
                assert st.state == BROKEN and st.cause is not None
                assert f"chunk {bad} " in st.cause and "sha256" in st.cause
                assert src.chunk_fetches() == {good: 1, bad: 2}
                # Broken: what is local is still served, nothing else is fetched.
                assert os.pread(fd, 4096, good * CS) == layout.memory[good * CS:][:4096]
                other = sorted(layout.nonzero)[5]
                with pytest.raises(OSError):
                    os.pread(fd, 4096, other * CS)
                assert other not in src.chunk_fetches()
            finally:
                os.close(fd)
            assert srv.stop() == 0
        assert not mounted(layout.tdir)
        assert status(layout.tdir).state == BROKEN


def test_source_gone_fails_reads_by_the_deadline(layout: Layout) -> None:
    first, second = sorted(layout.nonzero)[:2]
    with range_server(layout.pub) as src:
        write_layout(layout.pub.parent, _published(layout), src.url)
        with Server(layout.tdir, "--no-prefetch", "--deadline", "2") as srv:
            srv.wait_mounted()
            fd = os.open(layout.mnt, os.O_RDONLY)
            try:
                assert os.pread(fd, 100, first * CS) == layout.memory[first * CS:][:100]
                src.stop()
                with ThreadPoolExecutor(1) as pool:
                    fut = pool.submit(os.pread, fd, 100, second * CS)
                    with pytest.raises(OSError) as e:
                        fut.result(timeout=60)
                assert e.value.errno == errno.EIO
            finally:
                os.close(fd)
            st = status(layout.tdir)
            assert st.state == BROKEN and st.cause is not None
            assert src.url in st.cause and "\n" not in st.cause
            assert srv.stop() == 0
        assert not mounted(layout.tdir)


def test_unusable_template_dir_fails_at_start(tmp_path: Path) -> None:
    tdir = tmp_path / "tpl"
    tdir.mkdir(mode=0o700)
    (tdir / PUBLISHED_FILE).write_text('{"version": 1}')
    (tdir / SOURCE_FILE).write_text(json.dumps({"url": "http://127.0.0.1:9", "token_file": None}))
    with Server(tdir) as srv:
        assert srv.wait() == 1
        assert "published manifest is invalid" in srv.output()
    st = status(tdir)
    assert st.state == BROKEN and st.cause and "invalid" in st.cause
    assert not mounted(tdir) and private(tdir / STATUS_FILE) == 0o600


# -- a real clone through the mount -------------------------------------------------------
DATA = ("head -c 16777216 /dev/urandom > /root/data && "
        "md5sum /root/data | cut -d' ' -f1 > /root/data.md5")


@pytest.mark.qemu
def test_clone_of_a_demo_template_maps_its_memory_through_the_mount(
        env: Env, tmp_path: Path) -> None:
    env.cli("template", "create", "t", "--demo", "--memory", "256M", "--accel", "tcg",
            "--prepare", DATA, check=True, timeout=600)
    s = env.store()
    m = s.get_template("t")
    pub = tmp_path / "pub"
    pub.mkdir()
    (pub / MEMORY).symlink_to(m.memory_file)
    chunks = chunk_sha256s(Path(m.memory_file))
    nonzero = sum(c is not None for c in chunks) * CS
    p = Published(name="t", template=m, files={"state": PublishedFile(m.state_size,
                                                                      m.state_sha256)},
                  memory_size=m.memory_size, chunk_size=CS, chunks=chunks)
    with range_server(pub) as src:
        tdir = write_layout(tmp_path, p, src.url)
        with Server(tdir, "--no-prefetch") as srv:
            srv.wait_mounted()
            s.add_template(dataclasses.replace(m, name="lz",
                                               memory_file=str(tdir / MOUNT_DIR / MEMORY)))
            try:
                env.cli("clone", "lz", "c1", check=True)
                answered = status(tdir).fetched_bytes
                out = env.exec("c1", "md5sum /root/data | cut -d' ' -f1; cat /root/data.md5")
                got, want = out.split()
                assert got == want
                st = status(tdir)
                print(f"\nlazy clone: {answered} bytes fetched before it answered, "
                      f"{st.fetched_bytes} after md5sum of 16 MiB; {nonzero} bytes of "
                      f"non-zero chunks, memory {m.memory_size}")
                assert 0 < answered <= st.fetched_bytes < nonzero
                assert st.state == FETCHING
            finally:
                env.cli("stop", "c1")
                s.remove_template("lz")
            assert srv.stop() == 0
        assert not mounted(tdir)
    env.cli("template", "rm", "t", check=True)
    shutil.rmtree(pub)
