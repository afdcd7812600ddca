"""A hostile guest cannot make vmfork use unbounded host memory or disk.

The readers of both guest agents against socket servers that speak their
protocols (the serial agent's framing, qemu-guest-agent's delimited sync and
JSON) and flood them; then a demo guest on real QEMU that floods the serial
agent and the serial console (:mod:`vmfork.guest.limits`,
:mod:`vmfork.qemu.console_log`).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import stat
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from vmfork.errors import GuestError
from vmfork.guest import qga, serial
from vmfork.guest.limits import MAX_ANSWER, TooMuchOutput, b64_size
from vmfork.guest.qga import GuestAgent
from vmfork.guest.serial import SerialAgent
from vmfork.qemu import console_log

from .conftest import VMFORK, Env

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _serve(sock: str, handler: Handler, client: Callable[[], Awaitable[Any]]) -> Any:
    """Run *client* against a UNIX socket server at *sock* that runs *handler*
    for each connection; return what *client* returns."""
    async def guarded(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            await handler(reader, writer)
        writer.close()

    server = await asyncio.start_unix_server(guarded, sock)
    async with server:
        return await client()


async def _flood(writer: asyncio.StreamWriter, data: bytes, limit: int) -> int:
    """Write *data* over and over until the peer hangs up or *limit* bytes
    went out; return how many did."""
    sent = 0
    with contextlib.suppress(ConnectionError):
        while sent < limit:
            writer.write(data)
            await writer.drain()
            sent += len(data)
    return sent


# -- serial agent --------------------------------------------------------------------------
def test_serial_answer_over_the_cap_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(serial, "MAX_ANSWER", 1000)
    monkeypatch.setattr(serial, "MAX_ANSWER_B64", b64_size(1000) + 4)
    parser = serial.AnswerReader(b"n1", "g")
    parser.feed(b"n1 BEGIN\n")
    line = base64.b64encode(b"x" * 57) + b"\n"  # 76 characters, as base64(1) writes them
    with pytest.raises(TooMuchOutput, match=r"^g: guest answer over 1000 bytes"):
        for _ in range(100):
            parser.feed(line)
    # An END line that declares more than the cap is refused too (not asked again).
    parser = serial.AnswerReader(b"n1", "g")
    with pytest.raises(TooMuchOutput):
        parser.feed(b"n1 END 0 900 200\n")


def test_serial_flood_stops_at_the_cap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A guest that keeps answering is cut off at the cap: the agent reads no
    more than about the cap, closes the channel and names the cap."""
    monkeypatch.setattr(serial, "MAX_ANSWER", 100_000)
    monkeypatch.setattr(serial, "MAX_ANSWER_B64", b64_size(100_000) + 4)
    sent: list[int] = []

    async def agent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonce = (await reader.readline()).split()[0]
        writer.write(nonce + b" BEGIN\n")
        sent.append(await _flood(writer, (b"A" * 76 + b"\n") * 1000, 50_000_000))

    sock = str(tmp_path / "agent.sock")
    with pytest.raises(TooMuchOutput, match=r"over 97\.7 KiB"):
        asyncio.run(_serve(sock, agent, lambda: SerialAgent(
            sock, tmp_path / "agent.lock", name="g").exec("yes", timeout=30)))
    assert sent and sent[0] < 10_000_000  # the host hung up long before the flood ended


@pytest.mark.parametrize("line", [b"A" * 200_000 + b"\n", b"A" * 200_000])
def test_serial_line_over_the_cap_is_refused(tmp_path: Path, line: bytes) -> None:
    async def agent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonce = (await reader.readline()).split()[0]
        writer.write(nonce + b" BEGIN\n" + line)
        await writer.drain()
        await reader.read()  # until the host hangs up

    sock = str(tmp_path / "agent.sock")
    with pytest.raises(TooMuchOutput, match=r"^g: a line from the guest agent over 64 KiB"):
        asyncio.run(_serve(sock, agent, lambda: SerialAgent(
            sock, tmp_path / "agent.lock", name="g").exec("true", timeout=30)))


# -- qemu-guest-agent ----------------------------------------------------------------------
def fake_qga(before_sync: Callable[[asyncio.StreamWriter], Awaitable[None]] | None = None,
             answer: Callable[[str, Any], Any] | None = None) -> Handler:
    """A qemu-guest-agent: *before_sync* writes what comes before the sync
    answer; *answer(command, arguments)* gives each command's reply (a value,
    or bytes sent as they are)."""
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        req = json.loads((await reader.readline()).lstrip(b"\xff"))
        if before_sync is not None:
            await before_sync(writer)
        writer.write(b"\xff" + json.dumps({"return": req["arguments"]["id"]}).encode() + b"\n")
        await writer.drain()
        buf = ""  # qemu.qmp sends JSON objects with no line ends between them
        while chunk := await reader.read(65536):
            buf = (buf + chunk.decode()).lstrip()
            while buf:
                try:
                    msg, end = json.JSONDecoder().raw_decode(buf)
                except ValueError:
                    break  # incomplete: read more
                buf = buf[end:].lstrip()
                reply = answer(msg["execute"], msg.get("arguments")) if answer else {}
                if not isinstance(reply, bytes):
                    reply = json.dumps({"return": reply, "id": msg["id"]}).encode() + b"\n"
                writer.write(reply)
                await writer.drain()
    return handler


def qga_run(tmp_path: Path, handler: Handler,
            session: Callable[[GuestAgent], Awaitable[Any]]) -> Any:
    sock = str(tmp_path / "qga.sock")

    async def client() -> Any:
        async with GuestAgent(sock, tmp_path / "qga.lock", name="g", timeout=20) as agent:
            return await session(agent)
    return asyncio.run(_serve(sock, handler, client))


def ping(agent: GuestAgent) -> Awaitable[None]:
    return agent.ping()


def test_qga_sync_skips_noise_in_one_pass(tmp_path: Path) -> None:
    """Stale replies and garbage before the sync answer are skipped: 4 MiB of
    lines and 0xFF-led lines that are not our sync."""
    async def noise(writer: asyncio.StreamWriter) -> None:
        await _flood(writer, b'{"return": {}}\n' * 4096 + b'\xff{"return": 1}\n', 4 << 20)
    qga_run(tmp_path, fake_qga(noise), ping)


def test_qga_sync_flood_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(qga, "MAX_SYNC_NOISE", 1 << 20)

    async def flood(writer: asyncio.StreamWriter) -> None:
        await _flood(writer, b"garbage\n" * 8192, 1 << 30)
    with pytest.raises(TooMuchOutput, match="before its sync answer over 1 MiB"):
        qga_run(tmp_path, fake_qga(flood), ping)


def test_qga_giant_sync_line_is_refused(tmp_path: Path) -> None:
    async def giant(writer: asyncio.StreamWriter) -> None:
        writer.write(b"\xff")
        await _flood(writer, b"x" * 65536, 1 << 30)
    with pytest.raises(TooMuchOutput, match="sync answer of the guest agent"):
        qga_run(tmp_path, fake_qga(giant), ping)


def test_qga_reply_over_the_read_buffer_is_refused(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(qga, "READBUFLEN", 1 << 20)
    huge = b'{"return": "' + b"x" * (3 << 20) + b'"}\n'
    with pytest.raises(TooMuchOutput, match=r"reply of the guest agent \(QGA\) to guest-info "
                                            "over 1 MiB"):
        qga_run(tmp_path, fake_qga(answer=lambda cmd, args: huge), lambda a: a.info())


def test_qga_exec_output_over_the_cap_is_refused(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Output counts against the cap across guest-exec-status polls."""
    monkeypatch.setattr(qga, "MAX_ANSWER", 100_000)
    chunk = base64.b64encode(b"y" * 30_000).decode()

    def answer(cmd: str, args: Any) -> Any:
        if cmd == "guest-exec":
            return {"pid": 7}
        return {"exited": False, "out-data": chunk}
    with pytest.raises(TooMuchOutput, match=r"guest answer over 97\.7 KiB"):
        qga_run(tmp_path, fake_qga(answer=answer), lambda a: a.exec("yes"))
    ok = {"exited": True, "exitcode": 0, "out-data": chunk, "err-data": chunk}
    r = qga_run(tmp_path, fake_qga(answer=lambda cmd, args: {"pid": 7} if cmd == "guest-exec"
                                   else ok), lambda a: a.exec("true"))
    assert (r.exit_code, len(r.stdout), len(r.stderr)) == (0, 30_000, 30_000)


def test_qga_garbled_output_is_a_guest_error(tmp_path: Path) -> None:
    def answer(cmd: str, args: Any) -> Any:
        return {"pid": 7} if cmd == "guest-exec" else {"exited": True, "out-data": "%%"}
    with pytest.raises(GuestError, match="garbled out-data"):
        qga_run(tmp_path, fake_qga(answer=answer), lambda a: a.exec("true"))


# -- a demo guest on real QEMU -------------------------------------------------------------
#: Runs the vmfork CLI and prints its peak RSS (KiB) as stderr's last line.
PEAK_RSS = ("import resource, subprocess, sys; p = subprocess.run(sys.argv[1:]); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
            "sys.exit(p.returncode)")


@pytest.mark.qemu
def test_guest_flooding_the_serial_agent(env: Env, booted: str) -> None:
    """A command printing more than the cap fails with one line naming the
    cap; vmfork's memory stays bounded; the next command works."""
    baseline = subprocess.run([sys.executable, "-c", PEAK_RSS, VMFORK, "exec", booted, "true"],
                              env=env.environ, capture_output=True, text=True, timeout=120)
    assert baseline.returncode == 0, baseline.stderr
    p = subprocess.run([sys.executable, "-c", PEAK_RSS, VMFORK, "exec", booted,
                        f"head -c {MAX_ANSWER + (8 << 20)} /dev/zero"],
                       env=env.environ, capture_output=True, text=True, timeout=300)
    *lines, rss = p.stderr.splitlines()
    assert p.returncode == 1 and p.stdout == ""
    assert lines == [f"vmfork: error: {booted}: guest answer over 16 MiB (the most vmfork "
                     "accepts); the rest was dropped"]
    base_rss = int(baseline.stderr.splitlines()[-1])
    assert int(rss) < base_rss + 4 * (MAX_ANSWER >> 10), (rss, base_rss)
    assert env.exec(booted, "echo next") == "next\n"


@pytest.mark.qemu
def test_long_answer_arrives_whole_on_a_busy_host(env: Env, booted: str, tmp_path: Path) -> None:
    """QEMU's console drops what its socket cannot take at once: the agent
    paces a long answer, so a host too busy to read it promptly loses nothing
    (unpaced, three busy processes on two cores cut every 2 MB answer)."""
    want = env.exec(booted, "head -c 2500000 /dev/urandom > /root/r; md5sum /root/r").split()[0]
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(3)]
    try:
        for i in range(2):
            out = tmp_path / f"r{i}"
            env.cli("cp", f"{booted}:/root/r", str(out), check=True)
            assert hashlib.md5(out.read_bytes()).hexdigest() == want
    finally:
        for b in burners:
            b.kill()
            b.wait()
    assert env.exec(booted, "rm /root/r; echo next") == "next\n"


@pytest.mark.qemu
def test_guest_flooding_the_console(env: Env, booted: str) -> None:
    """``yes`` on the serial console for seconds: console.log and the file it
    rotated to stay under the cap (private), and the guest keeps answering."""
    flood = console_log.LOG_CAP + (64 << 10)  # ~7 s of the emulated UART
    env.exec(booted, f"(yes 0123456789abcdefghijklmnopqrstuvwxyz | head -c {flood} "
                     "> /dev/ttyS0; echo done > /run/flood) >/dev/null 2>&1 &")
    assert env.exec(booted, "echo alive") == "alive\n"
    env.exec(booted, "while [ ! -e /run/flood ]; do sleep 0.2; done")
    # Attaching the console drains what QEMU holds into console.log.
    c = env.cli("console", booted, input="echo hello-$((6*7))\n", timeout=60)
    assert c.returncode == 0 and "hello-42" in c.stdout, c.stderr
    log = env.home / "run" / booted / "console.log"
    old = console_log.rotated(log)
    for f in (log, old):
        assert f.stat().st_size <= console_log.LOG_CAP
        assert stat.S_IMODE(f.stat().st_mode) == 0o600
    assert "VMFORK-READY" in old.read_text(errors="replace")  # the boot, rotated out
    assert b"0123456789abcdefghijklmnopqrstuvwxyz\r\n" in log.read_bytes()[-4096:]
    assert env.exec(booted, "echo still") == "still\n"
