"""Publishing templates on real QEMU and real HTTP: the published layout of a
template (files and sha256s, memory chunks, flattened disk, kernel/initrd,
the working set its first clone records), ``template publish`` into a
directory, and the daemon's file routes over TCP with their token, byte
ranges and rate limit."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from vmfork import ports, vm
from vmfork.errors import InvalidInput
from vmfork.fork.pages import PAGE, RamMapping
from vmfork.images.demo import demo_image
from vmfork.lazy import pack, publish, working_set
from vmfork.lazy.published import (
    CHUNK_SIZE,
    INITRD,
    KERNEL,
    MANIFEST,
    MEMORY,
    MEMORY_PACK,
    STATE,
    Published,
    disk_file,
)
from vmfork.records import TemplateManifest
from vmfork.service.template_files import RateLimit, parse_range, parse_rate
from vmfork.templates import catalog, clone, create
from vmfork.templates.manifest import template_dir

from .chunk_sums import chunk_sha256s
from .conftest import VMFORK, Env, module_env, run
from .daemon import start_daemon, stop_daemon

PREPARE = ("head -c 4194304 /dev/urandom > /root/data && md5sum /root/data | cut -d' ' -f1 "
           "> /root/data.md5")
TOKEN = "publish-test-token-0123456789"
#: The daemon's rate limit, bytes/s.
RATE = 32_000_000


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# -- pure parts ------------------------------------------------------------------------
def test_parse_range() -> None:
    assert parse_range("bytes=0-99", 1000) == (0, 99)
    assert parse_range("bytes=900-", 1000) == (900, 999)
    assert parse_range("bytes=990-5000", 1000) == (990, 999)
    assert parse_range("bytes=-10", 1000) == (990, 999)
    assert parse_range("bytes=-5000", 1000) == (0, 999)
    assert parse_range("bytes=1000-", 1000) is None
    assert parse_range("bytes=0-1,5-6", 1000) is None
    assert parse_range("bytes=0-", 0) is None
    for bad in ("bytes=5-1", "items=0-1", "bytes=-", "bytes=a-b", "0-1", "bytes=" + "1" * 300):
        with pytest.raises(InvalidInput):
            parse_range(bad, 1000)


def test_parse_rate() -> None:
    assert parse_rate("125M") == 125_000_000
    assert parse_rate("1G") == 1e9
    assert parse_rate("64KiB/s") == 65536
    assert parse_rate("1.5MB") == 1_500_000
    assert parse_rate("4096") == 4096
    for bad in ("", "fast", "-1M", "0", "1T"):
        with pytest.raises(InvalidInput):
            parse_rate(bad)


def test_rate_limit_is_a_lower_bound() -> None:
    """N bytes through a bucket of rate R take at least (N - burst) / R."""
    async def go() -> float:
        limit = RateLimit(4_000_000, burst=64 << 10)
        t0 = time.monotonic()
        for _ in range(16):
            await limit.take(64 << 10)
        return time.monotonic() - t0
    assert run(go()) >= (16 * (64 << 10) - (64 << 10)) / 4_000_000


def test_chunks_of_runs() -> None:
    m = RamMapping(start=0x7000_0000, end=0x7000_0000 + (8 << 20), offset=0)
    per_chunk = CHUNK_SIZE // PAGE
    runs = [(0, 1), (per_chunk - 1, 2), (5 * per_chunk, per_chunk)]
    assert working_set.chunks_of(m, runs) == [0, 1, 5]
    shifted = RamMapping(m.start, m.end, offset=CHUNK_SIZE)
    assert working_set.chunks_of(shifted, [(0, 1)]) == [1]


def test_working_set_read_converts_and_refuses_garbage(tmp_path: Path) -> None:
    (tmp_path / working_set.FILE).write_text(json.dumps(
        {"version": 1, "chunk_size": CHUNK_SIZE * 2, "chunks": [3, 0, 3]}))
    assert working_set.read(tmp_path) == (6, 7, 0, 1)
    (tmp_path / working_set.FILE).write_text("{not json")
    assert working_set.read(tmp_path) == ()
    (tmp_path / working_set.FILE).write_text(json.dumps({"chunk_size": 4096,
                                                         "chunks": [-1]}))
    assert working_set.read(tmp_path) == ()


# -- a template with a disk ------------------------------------------------------------
@pytest.fixture(scope="module")
def tenv(session_images: Path) -> Iterator[Env]:
    """A home with template ``t``: the demo guest with 4 MiB of data in RAM
    and a small disk (an overlay over an image with data in it)."""
    with module_env("vflp", session_images) as e:
        image = e.home / "data.qcow2"
        raw = e.home / "data.raw"
        with open(raw, "wb") as f:
            f.truncate(16 << 20)
            f.seek(1 << 20)
            f.write(os.urandom(1 << 20))
        subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw),
                        str(image)], check=True, timeout=60)
        raw.unlink()
        s = e.store()
        img = demo_image(s.images_dir)
        run(vm.run(s, vm.RunOptions(name="src", kernel=img.kernel, initrd=img.initrd,
                                    append=img.append, memory_mib=256, accel="tcg",
                                    disks=(str(image),))))
        e.exec("src", PREPARE)
        run(create.create_from_vm(s, "t", "src"))
        yield e


def manifest_of(env: Env) -> TemplateManifest:
    return env.store().get_template("t")


def test_layout_has_every_file_with_its_sha256(tenv: Env) -> None:
    s = tenv.store()
    m = manifest_of(tenv)
    published, paths = publish.layout(s, "t")
    assert published.name == "t" and published.template == m
    assert set(paths) == {MANIFEST, STATE, MEMORY, MEMORY_PACK, KERNEL, INITRD, disk_file(0)}
    assert set(published.files) == {STATE, KERNEL, INITRD, disk_file(0)}
    assert paths[MEMORY] == m.memory_path and paths[STATE] == m.state_path
    assert paths[KERNEL] == Path(m.spec.kernel or "") and paths[INITRD] == Path(m.spec.initrd
                                                                                or "")
    for name, f in published.files.items():
        assert (f.size, f.sha256) == (paths[name].stat().st_size, sha256(paths[name])), name
    assert published.files[STATE].sha256 == m.state_sha256
    # The memory: one sha256 per chunk, None for zero chunks; the data the
    # guest wrote made some chunks non-zero, most of a fresh 256 MiB are zeros.
    assert published.memory_size == m.memory_size == 256 << 20
    assert published.chunk_size == CHUNK_SIZE
    assert published.chunks == chunk_sha256s(m.memory_path)
    data = sum(c is not None for c in published.chunks)
    assert 4 << 20 <= data * CHUNK_SIZE < published.memory_size
    # The pack: each non-zero chunk's frame, in order, unpacking to the chunk.
    assert len(published.packed) == len(published.chunks)
    at = pack.offsets(published.packed)
    assert paths[MEMORY_PACK].stat().st_size == at[-1] < data * CHUNK_SIZE
    blob = paths[MEMORY_PACK].read_bytes()
    with open(m.memory_path, "rb") as mem:
        for i, c in enumerate(published.chunks):
            if c is not None:
                mem.seek(i * CHUNK_SIZE)
                raw = mem.read(CHUNK_SIZE)
                assert pack.unpack(blob[at[i]:at[i + 1]], CHUNK_SIZE) == raw, i
    # manifest.json is the manifest, and reads back as it.
    assert Published.from_json(paths[MANIFEST].read_bytes()) == published
    # The disk: one standalone qcow2 image holding what the overlay chain holds.
    info = json.loads(subprocess.run(["qemu-img", "info", "-U", "--output=json",
                                      str(paths[disk_file(0)])], capture_output=True,
                                     text=True, check=True, timeout=60).stdout)
    assert info["format"] == "qcow2" and "backing-filename" not in info
    same = subprocess.run(["qemu-img", "compare", "-U", m.spec.disks[0].path,
                           str(paths[disk_file(0)])], capture_output=True, text=True,
                          timeout=60)
    assert same.returncode == 0, same.stdout + same.stderr
    # Private files.
    pdir = template_dir(s, "t") / publish.PUBLISHED
    assert stat.S_IMODE(pdir.stat().st_mode) == 0o700
    for p in pdir.iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p


def test_layout_is_kept_and_rebuilt_when_its_sources_change(tenv: Env) -> None:
    s = tenv.store()
    tdir = template_dir(s, "t")
    published, paths = publish.layout(s, "t")
    before = paths[MANIFEST].stat().st_ino
    # A second vmfork process (the memo is per process) finds it built.
    code = ("import sys; from vmfork.store import Store; from vmfork.lazy import publish; "
            "p, paths = publish.layout(Store(), 't'); print(paths['manifest.json'])")
    out = subprocess.run([str(Path(VMFORK).with_name("python")), "-c", code],
                         env=tenv.environ, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert paths[MANIFEST].stat().st_ino == before
    # The chunk cache is used as it is: a forged entry shows in the manifest.
    cache = tdir / publish.PUBLISHED / "chunks.json"
    saved = cache.read_bytes()
    d = json.loads(saved)
    first = next(i for i, c in enumerate(d["chunks"]) if c is not None)
    d["chunks"][first] = "0" * 64
    cache.write_text(json.dumps(d))
    (tdir / publish.PUBLISHED / "manifest.key").write_text("stale")
    try:
        assert publish.layout_of(manifest_of(tenv), tdir)[0].chunks[first] == "0" * 64
    finally:
        cache.write_bytes(saved)
        (tdir / publish.PUBLISHED / "manifest.key").write_text("stale")
    assert publish.layout_of(manifest_of(tenv), tdir)[0] == published
    # A flattened disk that went away is made again.
    paths[disk_file(0)].unlink()
    again, paths2 = publish.layout(s, "t")
    assert paths2[disk_file(0)].exists() and again.files == published.files


def test_first_clone_records_the_working_set(tenv: Env) -> None:
    s = tenv.store()
    tdir = template_dir(s, "t")
    ws_file = tdir / working_set.FILE
    if ws_file.exists():
        ws_file.unlink()
    before, _ = publish.layout(s, "t")
    assert before.working_set == ()
    (first,) = run(clone.clone(s, "t", names=["c1"], use_pool=False))
    try:
        assert ws_file.exists()
        assert stat.S_IMODE(ws_file.stat().st_mode) == 0o600
        recorded = json.loads(ws_file.read_text())
        assert recorded["clone"] == "c1" and recorded["chunk_size"] == CHUNK_SIZE
        chunks = recorded["chunks"]
        n = (256 << 20) // CHUNK_SIZE
        # Each chunk once, in the order the clone used them.
        assert chunks and all(0 <= c < n for c in chunks) and len(chunks) == len(set(chunks))
        # The guest ran: it used some of its memory, not all of it.
        assert len(chunks) < n
        ident = ws_file.stat().st_mtime_ns
        # The manifest now carries it: the chunks in range that hold data.
        after, paths = publish.layout(s, "t")
        assert after.working_set
        assert all(after.chunks[i] is not None for i in after.working_set)
        assert set(after.working_set) == {c for c in chunks if after.chunks[c] is not None}
        assert Published.from_json(paths[MANIFEST].read_bytes()).working_set == \
            after.working_set
        # A later clone does not record it again.
        (second,) = run(clone.clone(s, "t", names=["c2"], use_pool=False))
        run(vm.stop(s, second.name))
        assert ws_file.stat().st_mtime_ns == ident
    finally:
        run(vm.stop(s, first.name))


def test_publish_to_a_directory(tenv: Env, tmp_path: Path) -> None:
    out = tmp_path / "pub"
    p = tenv.cli("template", "publish", "t", str(out), "--json", check=True)
    result = json.loads(p.stdout)
    published, paths = publish.layout(tenv.store(), "t")
    assert sorted(result["files"]) == sorted(paths)
    assert result["chunks"] == len(published.chunks)
    assert sorted(os.listdir(out)) == sorted(paths)
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    for name, src in paths.items():
        dst = out / name
        assert stat.S_IMODE(dst.stat().st_mode) == 0o600, name
        assert dst.stat().st_size == src.stat().st_size, name
        assert sha256(dst) == sha256(src), name
    # The memory keeps its holes.
    assert (out / MEMORY).stat().st_blocks * 512 < published.memory_size // 2
    assert Published.from_json((out / MANIFEST).read_bytes()) == published
    # A directory that is not empty is refused (bad input: exit 2), untouched.
    again = tenv.cli("template", "publish", "t", str(out))
    assert again.returncode == 2 and "not empty" in again.stderr
    assert sorted(os.listdir(out)) == sorted(paths)
    missing = tenv.cli("template", "publish", "nope", str(tmp_path / "other"))
    assert missing.returncode != 0 and not (tmp_path / "other").exists()


# -- the daemon's file routes --------------------------------------------------------
@pytest.fixture(scope="module")
def served(tenv: Env) -> Iterator[str]:
    """``vmfork serve`` on loopback TCP with a token and --rate-limit RATE;
    its base URL."""
    token = tenv.home / "token"
    token.write_text(TOKEN + "\n")
    token.chmod(0o600)
    port = ports.free_port()
    log = tenv.home / "serve.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen([VMFORK, "serve", "--listen", f"127.0.0.1:{port}",
                                 "--token-file", str(token), "--rate-limit", str(RATE)],
                                env=tenv.environ, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=out)
    url = f"http://127.0.0.1:{port}"
    try:
        end = time.monotonic() + 30
        while True:
            assert proc.poll() is None, log.read_text()
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/v1/health", timeout=5).status_code == 200:
                    break
            assert time.monotonic() < end, log.read_text()
            time.sleep(0.05)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            assert proc.wait(60) == 0, log.read_text()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.fixture
def http(served: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=f"{served}/v1/templates/t/files",
                      headers={"Authorization": f"Bearer {TOKEN}"}, timeout=120) as c:
        yield c


def test_files_need_the_token(served: str) -> None:
    for token in (None, "wrong-token-of-some-length"):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        r = httpx.get(f"{served}/v1/templates/t/files/{MANIFEST}", headers=headers,
                      timeout=30)
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
        r = httpx.head(f"{served}/v1/templates/t/files/{MEMORY}", headers=headers, timeout=30)
        assert r.status_code == 401


def test_files_whole_and_head(tenv: Env, http: httpx.Client) -> None:
    published, paths = publish.layout(tenv.store(), "t")
    r = http.get(MANIFEST)
    assert r.status_code == 200 and r.headers["accept-ranges"] == "bytes"
    assert r.headers["content-type"].startswith("application/json")
    assert r.content == paths[MANIFEST].read_bytes()
    assert Published.from_json(r.content) == published
    for name in (STATE, INITRD):
        r = http.get(name)
        assert r.status_code == 200 and r.content == paths[name].read_bytes(), name
        assert hashlib.sha256(r.content).hexdigest() == published.files[name].sha256
    r = http.head(MEMORY)
    assert r.status_code == 200 and r.content == b""
    assert int(r.headers["content-length"]) == published.memory_size
    assert r.headers["accept-ranges"] == "bytes"
    r = http.head(MEMORY, headers={"Range": "bytes=0-99"})
    assert r.status_code == 206 and r.headers["content-length"] == "100"
    assert r.headers["content-range"] == f"bytes 0-99/{published.memory_size}"
    for bad in ("nope", "..%2Fstate", "disk7.qcow2", "chunks.json"):
        r = http.get(bad)
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", bad
    r = httpx.get(f"{http.base_url}".replace("/t/files", "/none/files") + f"/{MANIFEST}",
                  headers=http.headers, timeout=30)
    assert r.status_code == 404


def test_files_byte_ranges(tenv: Env, http: httpx.Client) -> None:
    published, paths = publish.layout(tenv.store(), "t")
    size = published.memory_size
    i = next(i for i, c in enumerate(published.chunks) if c is not None)
    r = http.get(MEMORY, headers={"Range": f"bytes={i * CHUNK_SIZE}-{(i + 1) * CHUNK_SIZE - 1}"})
    assert r.status_code == 206
    assert r.headers["content-range"] == \
        f"bytes {i * CHUNK_SIZE}-{(i + 1) * CHUNK_SIZE - 1}/{size}"
    assert len(r.content) == CHUNK_SIZE
    assert hashlib.sha256(r.content).hexdigest() == published.chunks[i]
    with open(paths[MEMORY], "rb") as f:
        f.seek(size - 10)
        tail = f.read()
    r = http.get(MEMORY, headers={"Range": "bytes=-10"})
    assert r.status_code == 206 and r.content == tail
    assert r.headers["content-range"] == f"bytes {size - 10}-{size - 1}/{size}"
    r = http.get(MEMORY, headers={"Range": f"bytes={size - 3}-{size + 100}"})
    assert r.status_code == 206 and r.content == tail[-3:]
    state = paths[STATE].read_bytes()
    r = http.get(STATE, headers={"Range": "bytes=10-"})
    assert r.status_code == 206 and r.content == state[10:]
    for unsatisfiable in (f"bytes={size}-", "bytes=0-1,4-5"):
        r = http.get(MEMORY, headers={"Range": unsatisfiable})
        assert r.status_code == 416, unsatisfiable
        assert r.headers["content-range"] == f"bytes */{size}"
        assert r.json()["error"]["code"] == "range_not_satisfiable"
    r = http.get(MEMORY, headers={"Range": "bytes=9-3"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid"


def test_memory_of_a_template_made_again_under_its_name(tenv: Env, served: str) -> None:
    """The daemon keeps where a template's memory is while its catalog
    entry is the same: a template removed answers 404, one made again under
    the same name serves its own memory."""
    s = tenv.store()
    img = demo_image(s.images_dir)
    headers = {"Authorization": f"Bearer {TOKEN}", "Range": "bytes=4096-8191"}
    url = f"{served}/v1/templates/u/files/{MEMORY}"
    try:
        for round_ in range(2):
            run(vm.run(s, vm.RunOptions(name="usrc", kernel=img.kernel, initrd=img.initrd,
                                        append=img.append, memory_mib=128, accel="tcg")))
            tenv.exec("usrc", f"echo round {round_} > /dev/null")
            run(create.create_from_vm(s, "u", "usrc"))
            memory = Path(s.get_template("u").memory_file)
            for _ in range(2):  # the second answer from what the daemon kept
                r = httpx.get(url, headers=headers, timeout=60)
                assert r.status_code == 206
                assert r.content == memory.read_bytes()[4096:8192]
            run(catalog.remove(s, "u"))
            r = httpx.get(url, headers=headers, timeout=60)
            assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    finally:
        if s.has_vm("usrc"):
            run(vm.stop(s, "usrc", force=True))
        if s.has_template("u"):
            run(catalog.remove(s, "u", force=True))


def test_rate_limit_slows_a_large_answer(http: httpx.Client) -> None:
    """N bytes at RATE bytes/s take at least (N - burst) / RATE (a lower bound)."""
    n = 8 << 20
    t0 = time.monotonic()
    r = http.get(MEMORY, headers={"Range": f"bytes=0-{n - 1}"})
    elapsed = time.monotonic() - t0
    assert r.status_code == 206 and len(r.content) == n
    assert elapsed >= (n - (64 << 10)) / RATE


def test_stopped_publish_leaves_nothing(tenv: Env, tmp_path: Path) -> None:
    """A publish whose stop flag is set removes what it wrote."""
    import threading

    stop = threading.Event()
    stop.set()
    out = tmp_path / "stopped"
    s = tenv.store()
    with pytest.raises(Exception, match="stopped"):
        publish.write_layout(manifest_of(tenv), template_dir(s, "t"), out, stop=stop)
    assert not out.exists()


def test_layout_of_an_unknown_template(tenv: Env) -> None:
    from vmfork.errors import NotFound

    with pytest.raises(NotFound):
        publish.layout(tenv.store(), "nope")
    with pytest.raises(InvalidInput):
        publish.layout(tenv.store(), "../t")


def test_files_without_rate_limit_on_the_unix_socket(tenv: Env) -> None:
    """The daemon's default socket (no token, no rate limit) serves the same bytes."""
    published, paths = publish.layout(tenv.store(), "t")
    d = start_daemon(tenv)
    try:
        base = "/v1/templates/t/files"
        r = d.get(f"{base}/{STATE}")
        assert r.status_code == 200 and r.content == paths[STATE].read_bytes()
        i = next(i for i, c in enumerate(published.chunks) if c is not None)
        r = d.get(f"{base}/{MEMORY}",
                  headers={"Range": f"bytes={i * CHUNK_SIZE}-{(i + 1) * CHUNK_SIZE - 1}"})
        assert r.status_code == 206 and hashlib.sha256(r.content).hexdigest() == \
            published.chunks[i]
        r = d.get(f"{base}/{disk_file(0)}", headers={"Range": "bytes=0-3"})
        assert r.status_code == 206 and r.content == b"QFI\xfb"
    finally:
        assert stop_daemon(d) == 0, d.log.read_text()
