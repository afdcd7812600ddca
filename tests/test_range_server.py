"""The test Range server (tests/range_server.py) against httpx: whole files,
single ranges, suffix ranges, 416 past the end, HEAD, 404 outside its root,
the rate limit, and a stop that drops a body in flight."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest

from .range_server import RangeServer, parse_range


def test_parse_range() -> None:
    assert parse_range("bytes=0-9", 100) == (0, 9)
    assert parse_range("bytes=90-", 100) == (90, 99)
    assert parse_range("bytes=90-200", 100) == (90, 99)
    assert parse_range("bytes=-10", 100) == (90, 99)
    assert parse_range("bytes=100-", 100) is None
    assert parse_range("bytes=5-4", 100) is None
    with pytest.raises(ValueError):
        parse_range("bytes=0-1,5-6", 100)


@pytest.fixture()
def served(tmp_path: Path) -> Path:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "f").write_bytes(bytes(range(256)) * 4)
    (tmp_path / "secret").write_bytes(b"x")
    return tmp_path / "sub"


def test_ranges_head_and_errors(served: Path) -> None:
    with RangeServer(served) as srv, httpx.Client(base_url=srv.url) as c:
        r = c.get("/f")
        assert r.status_code == 200 and len(r.content) == 1024
        assert r.headers["accept-ranges"] == "bytes"
        r = c.get("/f", headers={"Range": "bytes=256-259"})
        assert r.status_code == 206 and r.content == bytes([0, 1, 2, 3])
        assert r.headers["content-range"] == "bytes 256-259/1024"
        r = c.get("/f", headers={"Range": "bytes=-2"})
        assert r.status_code == 206 and r.content == bytes([254, 255])
        r = c.get("/f", headers={"Range": "bytes=1024-"})
        assert r.status_code == 416 and r.headers["content-range"] == "bytes */1024"
        r = c.head("/f")
        assert r.status_code == 200 and r.headers["content-length"] == "1024" and not r.content
        assert c.get("/missing").status_code == 404
        assert c.get("/../secret").status_code == 404
        assert c.get("/%2e%2e/secret").status_code == 404
        assert [m for m, _, _ in srv.requests].count("HEAD") == 1
    with RangeServer(served, refuse=(("f", 100, 199),)) as srv, httpx.Client() as c:
        assert c.get(f"{srv.url}/f", headers={"Range": "bytes=0-99"}).status_code == 206
        assert c.get(f"{srv.url}/f", headers={"Range": "bytes=199-300"}).status_code == 503
        assert c.get(f"{srv.url}/f").status_code == 503
        assert c.head(f"{srv.url}/f").status_code == 200


def test_rate_limit_and_stop(tmp_path: Path) -> None:
    (tmp_path / "big").write_bytes(b"\1" * (4 << 20))
    # 256 KiB/s: a 4 MiB body takes ~16 s, so it is still in flight at stop().
    srv = RangeServer(tmp_path, rate=256 * 1024)
    failed: list[BaseException] = []
    got: list[int] = []

    def fetch() -> None:
        try:
            with httpx.Client(timeout=30) as c:
                got.append(len(c.get(f"{srv.url}/big").content))
        except httpx.HTTPError as e:
            failed.append(e)

    t = threading.Thread(target=fetch)
    t.start()
    try:
        while srv.bytes_sent < 128 * 1024:
            threading.Event().wait(0.05)
    finally:
        srv.stop()
        srv.stop()
    t.join(timeout=30)
    assert not t.is_alive()
    assert failed and not got
    assert srv.bytes_sent < 4 << 20


def test_rate_only_some_files_and_the_process(tmp_path: Path) -> None:
    """With rate_only, other files are not held back; run as a process, the
    server prints its URL and serves until killed."""
    (tmp_path / "slow").write_bytes(b"\1" * (4 << 20))
    (tmp_path / "fast").write_bytes(b"\2" * (1 << 20))
    with RangeServer(tmp_path, rate=256 * 1024, rate_only=("slow",)) as srv:
        done = threading.Event()

        def fetch_slow() -> None:
            with contextlib.suppress(httpx.HTTPError), httpx.Client(timeout=30) as c:
                c.get(f"{srv.url}/slow")
            done.set()

        t = threading.Thread(target=fetch_slow)
        t.start()
        try:
            r = httpx.get(f"{srv.url}/fast", timeout=30)
            assert r.status_code == 200 and len(r.content) == 1 << 20
            # 4 MiB at 256 KiB/s take ~16 s: the slow answer is still going.
            assert not done.is_set()
        finally:
            srv.stop()
            t.join(timeout=30)
    proc = subprocess.Popen([sys.executable, "-m", "tests.range_server", str(tmp_path)],
                            stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).parent.parent)
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        assert httpx.get(f"{url}/fast", headers={"Range": "bytes=0-0"}).content == b"\2"
    finally:
        proc.kill()
        proc.wait(10)
