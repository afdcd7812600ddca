"""Unit tests for the pure parts outside spec.py: the cpio writer, the error
tree and its exit codes, the catalog, run paths, the accelerator choice and
the input checks of ``vm.build_spec`` (no QEMU is started here)."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from vmfork import admission, errors, ports, records, vm
from vmfork.cli import app, vms
from vmfork.guest import serial
from vmfork.guest.serial import SerialAgent
from vmfork.images.demo import Cpio
from vmfork.proc import process_alive
from vmfork.qemu import accel, console_log, features
from vmfork.qemu.machine import log_tail
from vmfork.records import Launcher, RetiredQemu, SavedState, UpdateIntent, VMInfo, VMRecord
from vmfork.results import ExecResult
from vmfork.spec import MemorySpec, VMSpec
from vmfork.store import MAX_SOCKET_PATH, Store
from vmfork.tasks import run_to_end
from vmfork.timeouts import check_seconds


# -- cpio ----------------------------------------------------------------------
def parse_newc(data: bytes) -> list[tuple[str, int, bytes]]:
    """(name, mode, data) of each entry of a newc archive, checking alignment."""
    entries = []
    pos = 0
    while True:
        assert pos % 4 == 0
        hdr = data[pos:pos + 110]
        assert hdr[:6] == b"070701", hdr[:6]
        fields = [int(hdr[6 + 8 * i:14 + 8 * i], 16) for i in range(13)]
        mode, filesize, namesize = fields[1], fields[6], fields[11]
        name_end = pos + 110 + namesize
        name = data[pos + 110:name_end - 1].decode()
        assert data[name_end - 1] == 0
        start = name_end + (-name_end % 4)
        body = data[start:start + filesize]
        pos = start + filesize + (-(start + filesize) % 4)
        if name == "TRAILER!!!":
            assert pos == len(data)
            return entries
        entries.append((name, mode, body))


def sample_archive() -> bytes:
    c = Cpio()
    c.dir("bin")
    c.file("init", b"#!/bin/sh\necho hi\n", 0o755)
    c.file("etc/odd-size", b"x" * 5)
    c.file("empty", b"")
    c.symlink("bin/sh", "/bin/busybox")
    return c.finish()


def test_cpio_headers_parse_back() -> None:
    entries = parse_newc(sample_archive())
    assert entries == [
        ("bin", 0o040755, b""),
        ("init", 0o100755, b"#!/bin/sh\necho hi\n"),
        ("etc/odd-size", 0o100644, b"xxxxx"),
        ("empty", 0o100644, b""),
        ("bin/sh", 0o120777, b"/bin/busybox"),
    ]


@pytest.mark.skipif(shutil.which("cpio") is None, reason="no cpio tool")
def test_cpio_readable_by_gnu_cpio(tmp_path: Path) -> None:
    data = sample_archive()
    listing = subprocess.run(["cpio", "-it", "--quiet"], input=data, capture_output=True,
                             check=True).stdout.decode().split()
    assert listing == ["bin", "init", "etc/odd-size", "empty", "bin/sh"]
    subprocess.run(["cpio", "-id", "--quiet", "--no-absolute-filenames"], input=data,
                   cwd=tmp_path, check=True, capture_output=True)
    assert (tmp_path / "init").read_bytes() == b"#!/bin/sh\necho hi\n"
    assert os.access(tmp_path / "init", os.X_OK)
    assert (tmp_path / "etc/odd-size").read_bytes() == b"xxxxx"
    assert os.readlink(tmp_path / "bin/sh") == "/bin/busybox"


# -- errors and the CLI's exit table ------------------------------------------------
@pytest.mark.parametrize(("exc", "code"), [
    (errors.InvalidInput("x"), 2), (errors.UnsafePath("x"), 2), (errors.NotFound("x"), 1),
    (errors.AlreadyExists("x"), 1), (errors.SetupError("x"), 1), (errors.LaunchError("x"), 1),
    (errors.StateError("x"), 1), (errors.GuestError("x"), 1), (errors.MigrationError("x"), 1),
    (errors.TemplateError("x"), 1), (errors.VmforkTimeout("boot", 3), 1),
    (errors.ResourceError("x"), 1), (errors.VmforkError("x"), 1),
    (errors.PartialClone([], [("a", errors.GuestError("x"))], 2), 1)])
def test_exit_codes(exc: errors.VmforkError, code: int) -> None:
    assert app.exit_code(exc) == code


def test_exit_table_covers_every_error_class() -> None:
    classes = {c for c in vars(errors).values()
               if isinstance(c, type) and issubclass(c, errors.VmforkError)}
    assert classes == {cls for cls, _ in app.EXIT_CODES}
    # The root comes last, so it never shadows a subclass.
    assert app.EXIT_CODES[-1][0] is errors.VmforkError


def test_launch_error_message_is_one_line() -> None:
    exc = errors.LaunchError("QEMU exited during start", exitcode=1, argv=["qemu"],
                             log_tail="line1\n\nline2\nqemu: -foo: invalid option\n")
    assert str(exc) == ("QEMU exited during start (exit status 1): "
                        "line1 | line2 | qemu: -foo: invalid option")
    assert "\n" not in str(exc)
    assert (exc.exitcode, exc.argv) == (1, ["qemu"])
    assert str(errors.LaunchError("no qemu")) == "no qemu"


def test_timeout_names_phase() -> None:
    exc = errors.VmforkTimeout("web1 to boot", 2.5, "console: x")
    assert str(exc) == "timed out after 2.5 s waiting for web1 to boot: console: x"
    assert exc.phase == "web1 to boot" and exc.seconds == 2.5


# -- the catalog ---------------------------------------------------------------------
def record(name: str, **kw: object) -> VMRecord:
    spec = VMSpec(name=name, memory_mib=64, memory=MemorySpec(path=f"/m/{name}.mem"),
                  kernel="/k")
    return VMRecord(name=name, spec=spec, state="running", **kw)  # type: ignore[arg-type]


def test_store_vm_crud(tmp_path: Path) -> None:
    s = Store(tmp_path / "home", tmp_path / "mem")
    assert s.list_vms() == [] and not s.has_vm("a")
    a = record("a", pid=123, pid_start=1.5, info=VMInfo(gen=2, owns_memory=False))
    s.add_vm(a)
    s.add_vm(record("b", created=time.time() + 1))
    assert s.has_vm("a")
    got = s.get_vm("a")
    assert got == a
    assert [r.name for r in s.list_vms()] == ["a", "b"]
    with pytest.raises(errors.AlreadyExists, match="'a' exists already"):
        s.add_vm(record("a"))
    got.state, got.pid, got.info = "paused", 456, VMInfo(boot_seconds=1.25)
    s.update_vm(got)
    again = s.get_vm("a")
    assert (again.state, again.pid, again.info) == ("paused", 456, VMInfo(boot_seconds=1.25))
    s.remove_vm("a")
    with pytest.raises(errors.NotFound, match="no VM named 'a'"):
        s.get_vm("a")
    assert [r.name for r in s.list_vms()] == ["b"]
    s.close()
    # The catalog is on disk: a second Store sees it.
    s2 = Store(tmp_path / "home", tmp_path / "mem")
    assert [r.name for r in s2.list_vms()] == ["b"]
    s2.close()


def test_store_template_crud(tmp_path: Path) -> None:
    s = Store(tmp_path, tmp_path / "mem")
    t1 = sample_manifest("t1")
    s.add_template(t1)
    assert s.has_template("t1")
    assert s.get_template("t1") == t1
    with pytest.raises(errors.AlreadyExists):
        s.add_template(sample_manifest("t1", parent="x"))
    assert s.list_templates() == [t1]
    s.remove_template("t1")
    with pytest.raises(errors.NotFound):
        s.get_template("t1")
    s.close()


def test_store_places(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMFORK_HOME", str(tmp_path / "h"))
    monkeypatch.setenv("VMFORK_MEMORY_DIR", str(tmp_path / "m"))
    s = Store()
    assert s.home == tmp_path / "h" and s.memory_dir == tmp_path / "m"
    assert (s.home / "vmfork.db").exists()
    assert s.run_dir("a") == s.home / "run" / "a"
    p0, p1 = s.run_paths("a"), s.run_paths("a", 1)
    assert p0.qmp == str(s.home / "run/a/qmp.sock")
    assert p1.qmp == str(s.home / "run/a/qmp.1.sock")
    assert p1.agent.endswith("agent.1.sock") and p1.console.endswith("console.1.sock")
    assert p0.console_log == p1.console_log
    s.close()


def test_store_rejects_bad_names(tmp_path: Path) -> None:
    s = Store(tmp_path, tmp_path / "mem")
    for bad in ("a/b", "../x", "a b"):
        with pytest.raises(errors.InvalidInput):
            s.run_dir(bad)
    for bad in ("a/b", "../x", "", ".hidden"):  # lock names become file names
        with pytest.raises(errors.InvalidInput), s.lock(bad):
            pass
    assert not (tmp_path / "x.lock").exists()
    s.close()


def test_socket_path_length_checked(tmp_path: Path) -> None:
    s = Store(tmp_path, tmp_path / "mem")
    assert len(s.run_paths("a").agent) <= MAX_SOCKET_PATH
    s.close()
    deep = tmp_path / ("d" * (MAX_SOCKET_PATH - len(str(tmp_path)) - 10))
    s = Store(deep, tmp_path / "mem")
    with pytest.raises(errors.InvalidInput, match="longer than 107 bytes"):
        s.run_paths("a")
    with pytest.raises(errors.InvalidInput, match="shorter VMFORK_HOME"):
        s.run_paths("b" * 63)
    s.close()


def test_store_lock_serialises(tmp_path: Path) -> None:
    s = Store(tmp_path, tmp_path / "mem")
    with s.lock("a"):
        code = ("import fcntl,sys; f=open(sys.argv[1],'w');"
                "fcntl.flock(f, fcntl.LOCK_EX|fcntl.LOCK_NB)")
        r = subprocess.run(["python3", "-c", code, str(tmp_path / "locks/a.lock")],
                           capture_output=True)
        assert r.returncode != 0  # held by us
    r = subprocess.run(["python3", "-c", code, str(tmp_path / "locks/a.lock")])
    assert r.returncode == 0
    s.close()


# -- accelerator choice ----------------------------------------------------------------
def test_accel_explicit_and_invalid(tmp_path: Path) -> None:
    assert accel.resolve_accel("tcg", "q", "/k", "/i", tmp_path) == "tcg"
    assert accel.resolve_accel("kvm", "q", "/k", "/i", tmp_path) == "kvm"
    with pytest.raises(errors.InvalidInput, match="auto, kvm or tcg"):
        accel.resolve_accel("hvf", "q", "/k", "/i", tmp_path)


def test_accel_auto_without_kvm_device(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(accel, "kvm_usable_device", lambda: False)
    monkeypatch.setattr(accel, "probe_kvm", lambda *a: pytest.fail("probed"))
    assert accel.resolve_accel("auto", "q", "/k", "/i", tmp_path) == "tcg"


@pytest.mark.parametrize("probe_ok", [True, False])
def test_accel_auto_probes_once_and_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           probe_ok: bool) -> None:
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"k" * 10)
    calls: list[tuple[str, ...]] = []

    def probe(*args: str) -> bool:
        calls.append(args)
        return probe_ok

    monkeypatch.setattr(accel, "kvm_usable_device", lambda: True)
    monkeypatch.setattr(accel, "probe_kvm", probe)
    want = "kvm" if probe_ok else "tcg"
    home = tmp_path / "home"
    assert accel.resolve_accel("auto", "qemu", str(kernel), "/i", home) == want
    assert json.loads((home / "accel.json").read_text())["accel"] == want
    assert accel.resolve_accel("auto", "qemu", str(kernel), "/i", home) == want
    assert len(calls) == 1
    # Another kernel (or QEMU binary) invalidates the cache.
    kernel.write_bytes(b"k" * 11)
    assert accel.resolve_accel("auto", "qemu", str(kernel), "/i", home) == want
    assert len(calls) == 2


def test_accel_probe_handles_missing_binary() -> None:
    assert accel.probe_kvm("/nonexistent/qemu", "/k", "/i", seconds=1) is False


# -- machine helpers -------------------------------------------------------------------
def test_log_tail(tmp_path: Path) -> None:
    f = tmp_path / "log"
    f.write_text("".join(f"line {i}\n" for i in range(100)))
    assert log_tail(f, 3) == "line 97\nline 98\nline 99"
    assert log_tail(tmp_path / "missing") == ""


def test_log_tail_continues_from_the_rotated_file(tmp_path: Path) -> None:
    f = tmp_path / "console.log"
    console_log.rotated(f).write_text("old 1\nold 2\n")
    f.write_text("new 1\n")
    assert log_tail(f, 2) == "old 2\nnew 1"


def test_console_log_append_rotates_at_the_cap(tmp_path: Path) -> None:
    f = tmp_path / "console.log"
    for i in range(10):
        console_log.append(f, bytes([65 + i]) * 40, cap=100)
        assert f.stat().st_size <= 100
        assert stat.S_IMODE(f.stat().st_mode) == 0o600
    old = console_log.rotated(f)
    assert old.stat().st_size <= 100 and stat.S_IMODE(old.stat().st_mode) == 0o600
    # The newest data is in console.log, the block before it in console.log.1.
    assert f.read_bytes() == b"I" * 40 + b"J" * 40
    assert old.read_bytes() == b"G" * 40 + b"H" * 40
    # One append larger than the cap keeps only its end.
    console_log.append(f, b"x" * 50 + b"y" * 100, cap=100)
    assert f.read_bytes() == b"y" * 100
    assert old.read_bytes() == b"I" * 40 + b"J" * 40
    assert sorted(p.name for p in tmp_path.iterdir()) == ["console.log", "console.log.1"]


def test_process_alive() -> None:
    assert process_alive(os.getpid())
    assert not process_alive(None) and not process_alive(0)
    assert not process_alive(os.getpid(), start_time=1.0)  # pid reused by another process
    p = subprocess.Popen(["true"])
    p.wait()
    assert not process_alive(p.pid)


# -- input checks before anything starts ------------------------------------------------
@pytest.mark.parametrize(("opts", "why"), [
    ({"name": "a/b", "demo": True}, "invalid VM name"),
    ({"name": "a"}, "nothing to boot"),
    ({"name": "a", "demo": True, "kernel": "/k"}, "cannot be combined"),
    ({"name": "a", "kernel": "/nonexistent/vmlinuz"}, "does not exist"),
    ({"name": "a", "disks": ("/nonexistent.qcow2",)}, "does not exist"),
    ({"name": "a", "kernel": "KERNEL", "qemu": "/nonexistent/qemu"}, "not found"),
    ({"name": "a", "kernel": "KERNEL", "memory_backend": "hugetlb"}, "memory backend"),
    ({"name": "a", "kernel": "KERNEL", "accel": "hvf"}, "invalid accelerator"),
    ({"name": "a", "kernel": "KERNEL", "memory_dir": "KERNEL"}, "not a directory"),
])
def test_build_spec_rejects(tmp_path: Path, opts: dict[str, object], why: str) -> None:
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"k")
    opts = {k: (str(kernel) if v == "KERNEL" else v) for k, v in opts.items()}
    s = Store(tmp_path / "home", tmp_path / "mem")
    with pytest.raises(errors.InvalidInput, match=why):
        vm.build_spec(s, vm.RunOptions(**opts))  # type: ignore[arg-type]
    assert s.list_vms() == []
    s.close()


def test_build_spec_kernel_and_disk(tmp_path: Path) -> None:
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"k")
    qcow = tmp_path / "a.qcow2"
    qcow.write_bytes(b"QFI\xfb" + b"\0" * 100)
    raw = tmp_path / "b.img"
    raw.write_bytes(b"\0" * 512)
    s = Store(tmp_path / "home", tmp_path / "mem")
    spec = vm.build_spec(s, vm.RunOptions(name="a", kernel=str(kernel), accel="tcg",
                                          disks=(str(qcow), str(raw)), ports=((2222, 22),),
                                          memory_mib=128, cpus=2))
    assert spec.kernel == str(kernel) and spec.initrd is None
    # Each disk is a qcow2 overlay in the VM's directory over the image given.
    assert [(d.backing, d.backing_format) for d in spec.disks] == [(str(qcow), "qcow2"),
                                                                   (str(raw), "raw")]
    assert [d.path for d in spec.disks] == [str(s.vm_dir("a") / f"disk{i}.qcow2")
                                            for i in range(2)]
    assert all(d.format == "qcow2" for d in spec.disks)
    assert spec.net is not None and spec.net.ports == ((2222, 22),)
    assert spec.memory.backend == "file" and spec.memory.share
    assert spec.memory.path is not None
    assert Path(spec.memory.path).parent == tmp_path / "mem"
    assert Path(spec.memory.path).name.startswith("a-")
    assert (spec.memory_mib, spec.cpus, spec.accel) == (128, 2, "tcg")
    memfd = vm.build_spec(s, vm.RunOptions(name="a", kernel=str(kernel), accel="tcg",
                                           memory_backend="memfd"))
    assert memfd.memory == MemorySpec(backend="memfd")
    assert memfd.net is None
    s.close()


@pytest.mark.parametrize(("text", "ok"), [("2222:22", (2222, 22)), ("1:65535", (1, 65535)),
                                          ("22", None), ("0:22", None), ("a:b", None),
                                          ("1:2:3", None), ("70000:22", None)])
def test_parse_port(text: str, ok: tuple[int, int] | None) -> None:
    if ok:
        assert vms.parse_port(text) == ok
    else:
        with pytest.raises(errors.InvalidInput, match="HOST:GUEST"):
            vms.parse_port(text)


# -- the guest agent's framing, against a fake agent ------------------------------------
def fake_agent_exec(tmp_path: Path, answer: Callable[[bytes], bytes],
                    timeout: float = 5.0,
                    resend: Callable[[bytes], bytes] | None = None) -> ExecResult:
    """Run SerialAgent.exec against a socket server answering with *answer(nonce)*
    and a request to resend with *resend(nonce)* (default: *answer*)."""
    sock = str(tmp_path / "agent.sock")

    async def main() -> ExecResult:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            line = await reader.readline()
            nonce, payload = line.split()
            assert base64.b64decode(payload) == b"echo hi"
            writer.write(answer(nonce))
            await writer.drain()
            while line := await reader.readline():
                nonce, payload = line.split()
                assert payload == b"!resend"
                writer.write((resend or answer)(nonce))
                await writer.drain()
            writer.close()

        server = await asyncio.start_unix_server(serve, sock)
        async with server:
            agent = SerialAgent(sock, tmp_path / "agent.lock", name="g")
            return await agent.exec("echo hi", timeout=timeout)

    return asyncio.run(main())


def frame(nonce: bytes, out: bytes, status: int, err: bytes = b"") -> bytes:
    """An answer of the agent: stdout and stderr apart, with their sizes."""
    return (nonce + b" BEGIN\n" + base64.encodebytes(out) + nonce + b" ERR\n"
            + base64.encodebytes(err) + b"%s END %d %d %d\n" % (nonce, status, len(out), len(err)))


def old_frame(nonce: bytes, output: bytes, status: int, size: int | None = None) -> bytes:
    """An answer of the agent that interleaved stdout and stderr (it may run
    in a template saved before): one section, ``END STATUS [SIZE]``."""
    end = b"%s END %d" % (nonce, status) + (b" %d" % size if size is not None else b"")
    return nonce + b" BEGIN\n" + base64.encodebytes(output) + end + b"\n"


def drop_lines(answer: bytes, *index: int) -> bytes:
    """*answer* with the lines at *index* lost in transit."""
    lines = answer.split(b"\n")
    return b"\n".join(ln for i, ln in enumerate(lines) if i not in index)


def read_answer(data: bytes, nonce: bytes = b"n1") -> serial.Answer | None:
    parser = serial.AnswerReader(nonce, "g")
    for line in data.splitlines(keepends=True):
        answer = parser.feed(line)
        if answer is not None:
            return answer
    return None


def test_answer_keeps_stdout_and_stderr_apart() -> None:
    assert read_answer(frame(b"n1", b"out\n", 3, b"err\n")) == serial.Answer(3, b"out\n", b"err\n")
    assert read_answer(frame(b"n1", b"", 0)) == serial.Answer(0, b"", b"")
    big = bytes(range(256)) * 40  # many base64 lines, bytes that are not UTF-8
    assert read_answer(frame(b"n1", big, 0, big[::-1])) == serial.Answer(0, big, big[::-1])


def test_answer_of_the_old_agent_is_all_stdout() -> None:
    old = old_frame(b"n1", b"out\nerr\n", 7, 8)
    assert read_answer(old) == serial.Answer(7, b"out\nerr\n", b"")
    assert read_answer(old_frame(b"n1", b"hi\n", 1)) == serial.Answer(1, b"hi\n", b"")
    with pytest.raises(serial.CutShort, match="cut short in transit"):
        read_answer(drop_lines(old_frame(b"n1", b"x" * 1000, 0, 1000), 3, 4))


def test_answer_skips_other_nonces() -> None:
    data = (frame(b"n0", b"late\n", 0, b"late err\n") + b"garbage\n"
            + frame(b"n1", b"hi\n", 0))
    assert read_answer(data) == serial.Answer(0, b"hi\n", b"")
    assert read_answer(frame(b"n0", b"late\n", 0)) is None


@pytest.mark.parametrize("lost", ["stdout line", "two stdout lines", "last stdout line",
                                  "ERR line", "stderr line"])
def test_answer_cut_short_is_detected(lost: str) -> None:
    """Lines lost from stdout, from stderr, or the ERR line (then stderr
    would count as stdout) never pass unnoticed."""
    answer = frame(b"n1", b"o" * 1000, 0, b"e" * 100)
    err = answer.split(b"\n").index(b"n1 ERR")
    index = {"stdout line": (1,), "two stdout lines": (2, 3), "last stdout line": (err - 1,),
             "ERR line": (err,), "stderr line": (err + 1,)}[lost]
    with pytest.raises(serial.CutShort):
        read_answer(drop_lines(answer, *index))


def test_answer_without_err_line_is_cut_short() -> None:
    with pytest.raises(serial.CutShort):
        read_answer(drop_lines(frame(b"n1", b"out\n", 0, b"err\n"), 2))


def test_answer_after_the_echo_of_the_request() -> None:
    """A request that reaches the guest before the agent turned the tty's
    echo off comes back (in part, without its newline) before the answer."""
    echo = b"n1 " + base64.b64encode(b"true")
    glued = echo[:5] + frame(b"n1", b"out\n", 0, b"err\n")
    assert read_answer(glued) == serial.Answer(0, b"out\n", b"err\n")
    whole = echo + b"\r\n" + frame(b"n1", b"", 1)
    assert read_answer(whole) == serial.Answer(1, b"", b"")


def test_answer_without_begin_line() -> None:
    assert read_answer(drop_lines(frame(b"n1", b"", 4), 0)) == serial.Answer(4, b"", b"")
    with pytest.raises(serial.CutShort):
        read_answer(drop_lines(frame(b"n1", b"out\n", 0), 0))


def test_answer_cut_short_within_a_line() -> None:
    answer = frame(b"n1", b"o" * 100, 0, b"e" * 100)
    with pytest.raises(serial.CutShort):
        read_answer(answer.replace(b"b2", b"", 1))  # two bytes of stdout's base64 lost


def test_agent_answer(tmp_path: Path) -> None:
    r = fake_agent_exec(tmp_path, lambda n: frame(n, b"hi\n" * 100, 3, b"\xffe\n"))
    assert (r.exit_code, r.stdout, r.stderr) == (3, "hi\n" * 100, "\udcffe\n")
    assert r.stderr.encode(errors="surrogateescape") == b"\xffe\n"


def test_agent_skips_stale_answers(tmp_path: Path) -> None:
    r = fake_agent_exec(tmp_path, lambda n: frame(b"0123456789ab", b"late\n", 0)
                        + b"garbage\n" + frame(n, b"hi\n", 0))
    assert (r.exit_code, r.stdout, r.stderr) == (0, "hi\n", "")


def test_agent_accepts_answers_of_the_old_agent(tmp_path: Path) -> None:
    r = fake_agent_exec(tmp_path, lambda n: old_frame(n, b"hi\n", 1))
    assert (r.exit_code, r.stdout, r.stderr) == (1, "hi\n", "")
    r = fake_agent_exec(tmp_path, lambda n: old_frame(n, b"out\nerr\n", 2, 8))
    assert (r.exit_code, r.stdout, r.stderr) == (2, "out\nerr\n", "")


def test_agent_detects_output_lost_in_transit(tmp_path: Path) -> None:
    with pytest.raises(errors.GuestError, match="cut short in transit"):
        fake_agent_exec(tmp_path, lambda n: drop_lines(frame(n, b"x" * 1000, 0), 3, 4))


def test_agent_asks_again_for_output_lost_in_transit(tmp_path: Path) -> None:
    r = fake_agent_exec(tmp_path, lambda n: drop_lines(frame(n, b"x" * 1000, 0, b"e"), 3, 4),
                        resend=lambda n: frame(n, b"x" * 1000, 0, b"e"))
    assert (r.exit_code, r.stdout, r.stderr) == (0, "x" * 1000, "e")


def test_agent_acknowledges_each_segment_of_a_paced_answer(tmp_path: Path) -> None:
    """The agent sends a long answer a segment at a time and waits after each
    (``NONCE MORE``) for ``NONCE !more``; the host sends it once it has read
    the segment, and the segments make one answer."""
    sock = str(tmp_path / "agent.sock")
    out = bytes(range(256)) * 500
    text = base64.encodebytes(out)
    cut = text.index(b"\n", len(text) // 2) + 1
    heard: list[bytes] = []

    async def main() -> ExecResult:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonce = (await reader.readline()).split()[0]
            writer.write(nonce + b" BEGIN\n")
            for part in (text[:cut], text[cut:]):
                writer.write(part + nonce + b" MORE\n")
                await writer.drain()
                heard.append(await asyncio.wait_for(reader.readline(), 5))
            writer.write(b"%s ERR\n%s END 0 %d 0\n" % (nonce, nonce, len(out)))
            await writer.drain()
            heard.append(await reader.readline())
            writer.close()

        server = await asyncio.start_unix_server(serve, sock)
        async with server:
            agent = SerialAgent(sock, tmp_path / "agent.lock", name="g")
            return await agent.exec("cat big", timeout=5)

    r = asyncio.run(main())
    assert r.stdout.encode(errors="surrogateescape") == out
    nonce = heard[0].split()[0]
    assert heard == [nonce + b" !more\n", nonce + b" !more\n", b""]


def test_agent_garbled_status(tmp_path: Path) -> None:
    with pytest.raises(errors.GuestError, match="garbled"):
        fake_agent_exec(tmp_path, lambda n: n + b" BEGIN\n" + n + b" END x\n")


def test_agent_unreachable(tmp_path: Path) -> None:
    agent = SerialAgent(str(tmp_path / "none.sock"), tmp_path / "agent.lock", name="g")
    with pytest.raises(errors.GuestError, match="cannot reach the guest agent"):
        asyncio.run(agent.exec("true"))


# -- templates with disks, clone identity, hooks (no QEMU) ------------------------------
from vmfork.guest import identity  # noqa: E402
from vmfork.results import CloneResult, MigrationStats  # noqa: E402
from vmfork.spec import DiskSpec, NetSpec  # noqa: E402
from vmfork.templates import catalog, clone, create  # noqa: E402
from vmfork.templates import manifest as tm  # noqa: E402


def fake_sysfs(tmp_path: Path, nics: dict[str, tuple[str, bool]]) -> Path:
    """A /sys/class/net look-alike: name -> (address, backed by a device)."""
    d = tmp_path / "net"
    d.mkdir()
    (d / "bonding_masters").write_text("")  # a file, not an interface
    for name, (addr, device) in nics.items():
        (d / name).mkdir()
        (d / name / "address").write_text(addr + "\n")
        if device:
            (d / name / "device").mkdir()
    return d


def run_mac_command(sysfs: Path, mac: str, old: str | None, shell: str = "sh"
                    ) -> subprocess.CompletedProcess[str]:
    cmd = identity.mac_command(mac, old).replace("/sys/class/net", str(sysfs))
    return subprocess.run([shell, "-c", 'ip() { echo "ip $*"; }; ' + cmd],
                          capture_output=True, text=True, timeout=10)


@pytest.mark.parametrize("shell", ["sh", "busybox"])
def test_mac_command_finds_the_nic_by_the_template_mac(tmp_path: Path, shell: str) -> None:
    if shutil.which(shell) is None:
        pytest.skip(f"no {shell}")
    sysfs = fake_sysfs(tmp_path, {"lo": ("00:00:00:00:00:00", False),
                                  "enp0s2": ("52:54:00:00:00:01", True),
                                  "enp0s3": ("52:54:00:00:00:02", True)})
    argv = [shell] if shell == "sh" else [shell, "sh"]
    cmd = identity.mac_command("52:54:00:AA:BB:CC", "52:54:00:00:00:02")
    p = subprocess.run([*argv, "-c", 'ip() { echo "ip $*"; }; ' +
                        cmd.replace("/sys/class/net", str(sysfs))],
                       capture_output=True, text=True, timeout=10)
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines() == ["ip link set dev enp0s3 down",
                                     "ip link set dev enp0s3 address 52:54:00:aa:bb:cc up"]


def test_mac_command_falls_back_to_the_only_device(tmp_path: Path) -> None:
    sysfs = fake_sysfs(tmp_path, {"lo": ("00:00:00:00:00:00", False),
                                  "eth0": ("52:54:00:00:00:09", True)})
    p = run_mac_command(sysfs, "52:54:00:aa:bb:cc", "52:54:00:00:00:01")
    assert p.returncode == 0 and "ip link set dev eth0 down" in p.stdout


def test_mac_command_fails_without_a_nic(tmp_path: Path) -> None:
    sysfs = fake_sysfs(tmp_path, {"lo": ("00:00:00:00:00:00", False),
                                  "a": ("52:54:00:00:00:08", True),
                                  "b": ("52:54:00:00:00:09", True)})
    p = run_mac_command(sysfs, "52:54:00:aa:bb:cc", "52:54:00:00:00:01")
    assert p.returncode != 0 and p.stdout == ""
    assert "no network interface to give the MAC 52:54:00:aa:bb:cc" in p.stderr


def test_identity_command_text() -> None:
    cmd = identity.identity_command(hostname="web-1", mac="52:54:00:aa:bb:cc",
                                    new_machine_id=True, old_mac="52:54:00:00:00:01")
    assert "echo web-1 > /proc/sys/kernel/hostname && echo web-1 > /etc/hostname" in cmd
    assert "127.0.1.1\t'web-1'" in cmd and "/etc/hosts" in cmd
    assert "> /etc/machine-id" in cmd and "[ -L /var/lib/dbus/machine-id ]" in cmd
    assert "52:54:00:00:00:01" in cmd and "address 52:54:00:aa:bb:cc up" in cmd
    assert "eth0" not in cmd
    bare = identity.identity_command(hostname="x", new_machine_id=False)
    assert "ip link" not in bare and "machine-id" not in bare
    assert subprocess.run(["sh", "-n", "-c", cmd], timeout=10).returncode == 0
    assert identity.clock_command(1700000000.4) == "date -u -s @1700000000 >/dev/null"


def test_identity_command_edits_hosts_and_machine_id(tmp_path: Path) -> None:
    root = tmp_path
    (root / "etc").mkdir()
    (root / "proc").mkdir()
    (root / "dbus").mkdir()
    (root / "etc/hosts").write_text("127.0.0.1\tlocalhost\n127.0.1.1\tvmfork\n::1\tip6\n")
    (root / "proc/uuid").write_text("0f8fad5b-d9cb-469f-a165-70867728950e\n")
    (root / "dbus/machine-id").write_text("old\n")
    cmd = identity.identity_command(hostname="c-2", new_machine_id=True)
    for real, fake in (("/proc/sys/kernel/hostname", "hostname.kernel"),
                       ("/proc/sys/kernel/random/uuid", "proc/uuid"),
                       ("/var/lib/dbus/", "dbus/"), ("/etc/", "etc/")):
        cmd = cmd.replace(real, f"{root}/{fake}")
    p = subprocess.run(["sh", "-c", cmd], capture_output=True, text=True, timeout=10)
    assert p.returncode == 0, p.stderr
    assert (root / "hostname.kernel").read_text() == "c-2\n"
    assert (root / "etc/hostname").read_text() == "c-2\n"
    hosts = "127.0.0.1\tlocalhost\n127.0.1.1\tc-2\n::1\tip6\n"
    assert (root / "etc/hosts").read_text() == hosts
    assert (root / "etc/machine-id").read_text() == "0f8fad5bd9cb469fa16570867728950e\n"
    assert (root / "dbus/machine-id").read_text() == "0f8fad5bd9cb469fa16570867728950e\n"


def sample_manifest(name: str, parent: str | None = None,
                    spec: VMSpec | None = None) -> records.TemplateManifest:
    """A manifest as create_from_vm makes one (no files behind it)."""
    spec = spec or VMSpec(name=name, memory_mib=256, kernel="/k", machine="pc-q35-10.0",
                          memory=MemorySpec(path=f"/m/{name}.mem", share=False, readonly=True))
    stats = MigrationStats(status="completed", seconds=0.0071, total_time_ms=7,
                           downtime_ms=7, ram_bytes=0, total_bytes=300_000)
    return records.TemplateManifest(
        name=name, created=1_700_000_000.25, source_vm=f"{name}.build", parent=parent,
        memory_file=f"/m/{name}.mem", memory_size=256 << 20, state_file=f"/h/{name}/state",
        state_size=300_000, state_sha256="ab" * 32, qemu_version="10.0.2",
        machine="pc-q35-10.0", qemu="qemu-system-x86_64", spec=spec,
        save=records.TemplateSave(stats, freeze_seconds=0.0, total_seconds=0.0093))


#: A manifest as vmfork wrote it before manifests were typed and versioned
#: (the catalog and manifest.json hold this dict): no ``version`` key.
UNVERSIONED_MANIFEST: dict[str, object] = {
    "name": "t", "created": 1764000000.5, "source_vm": "src", "parent": None,
    "memory_file": "/dev/shm/vmfork/tpl-t-1a2b3c4d.mem", "memory_size": 268435456,
    "state_file": "/h/templates/t/state", "state_sha256": "0f" * 32, "state_size": 651264,
    "disks": [{"index": 0, "path": "/h/templates/t/disk0.qcow2", "size": 2752512,
               "mtime_ns": 1764000000123456789, "backing": "/img/base.qcow2",
               "backing_size": 1073741824, "backing_mtime_ns": 1763000000000000000}],
    "frozen": True, "on_clone": "echo hi", "qemu_version": "10.0.2",
    "machine": "pc-q35-10.0", "qemu": "qemu-system-x86_64",
    "spec": {"accel": "tcg", "append": "", "aux_ram_share": True, "cpu": "qemu64,+rdrand",
             "cpus": 1, "disks": [{"backing": "/img/base.qcow2", "backing_format": "qcow2",
                                   "format": "qcow2", "path": "/h/templates/t/disk0.qcow2",
                                   "readonly": False}],
             "initrd": "/i", "kernel": "/k", "machine": "pc-q35-10.0",
             "memory": {"backend": "file", "path": "/dev/shm/vmfork/tpl-t-1a2b3c4d.mem",
                        "readonly": True, "share": False},
             "memory_mib": 256, "name": "t", "net": {"mac": "52:54:00:12:34:56", "ports": []},
             "qemu": "qemu-system-x86_64", "qga": True,
             "vmgenid": "888bbf89-cbcd-4f53-ac5f-20a6dc90f1c5"},
    "guest": "debian",
    "save": {"status": "completed", "seconds": 0.0113, "total_time_ms": 11,
             "downtime_ms": 11, "ram_bytes": 0, "total_bytes": 651264,
             "freeze_seconds": 0.0421, "total_seconds": 0.0587},
}


def test_manifest_round_trips_and_the_catalog_keeps_it(tmp_path: Path) -> None:
    m = disk_template_manifest(tmp_path)
    d = m.to_dict()
    assert d["version"] == records.MANIFEST_VERSION
    assert records.TemplateManifest.from_dict(d) == m
    assert records.TemplateManifest.from_json(m.to_json()) == m
    assert json.loads(json.dumps(d)) == d  # plain JSON
    s = Store(tmp_path / "home", tmp_path / "mem")
    s.add_template(m)
    assert s.get_template("t") == m and s.list_templates() == [m]
    s.close()


def test_unversioned_manifest_still_loads(tmp_path: Path) -> None:
    s = Store(tmp_path / "home", tmp_path / "mem")
    # As the previous store wrote a template row.
    s._db.execute("INSERT INTO templates (name, manifest, created) VALUES (?, ?, ?)",
                  ("t", json.dumps(UNVERSIONED_MANIFEST), 1764000000.5))
    m = s.get_template("t")
    s.close()
    assert m.version == records.MANIFEST_VERSION
    assert (m.name, m.parent, m.frozen, m.on_clone, m.guest) == ("t", None, True, "echo hi",
                                                                 "debian")
    assert m.memory_path == Path("/dev/shm/vmfork/tpl-t-1a2b3c4d.mem")
    assert m.disks == (records.TemplateDisk(0, "/h/templates/t/disk0.qcow2", 2752512,
                                       1764000000123456789, "/img/base.qcow2", 1073741824,
                                       1763000000000000000),)
    assert m.spec.machine == m.machine == "pc-q35-10.0" and m.spec.qga
    assert m.save.migration.seconds == 0.0113 and m.save.freeze_seconds == 0.0421
    assert tm.template_mac(m) == "52:54:00:12:34:56"
    # Every key keeps its value (template inspect / create --json); five
    # are added, and the spec gets its readiness (the default), QEMU's HPET
    # (its device state has one) and a reboot that reboots.
    d = m.to_dict()
    assert d["spec"].pop("ready") == "auto"
    assert d["spec"].pop("hpet") is True
    assert d["spec"].pop("reboot_ends") is False
    assert {k: d[k] for k in UNVERSIONED_MANIFEST} == UNVERSIONED_MANIFEST
    assert set(d) - set(UNVERSIONED_MANIFEST) == {"version", "imported_from", "agent",
                                                  "fork_of", "ignore_shared"}
    assert (d["fork_of"], d["ignore_shared"]) == (None, True)


def test_first_release_manifest_loads_with_defaults() -> None:
    """The first manifests had no disks, freeze, hook or total save time."""
    old = {k: v for k, v in UNVERSIONED_MANIFEST.items()
           if k not in ("disks", "frozen", "on_clone", "guest")}
    old["save"] = {"status": "completed", "seconds": 0.009, "total_time_ms": 9,
                   "downtime_ms": 9, "ram_bytes": 0, "total_bytes": 300000}
    m = records.TemplateManifest.from_dict(old)
    assert (m.disks, m.frozen, m.on_clone, m.guest) == ((), False, None, "demo")
    assert (m.save.freeze_seconds, m.save.total_seconds) == (0.0, 0.009)
    tm.check_disks(m)


def test_manifest_refuses_newer_or_incomplete() -> None:
    with pytest.raises(errors.TemplateError, match="template t: its manifest is version 99"):
        records.TemplateManifest.from_dict({**UNVERSIONED_MANIFEST, "version": 99})
    broken = {k: v for k, v in UNVERSIONED_MANIFEST.items() if k != "state_sha256"}
    with pytest.raises(errors.TemplateError, match="template t: its manifest is unreadable"):
        records.TemplateManifest.from_dict(broken)
    with pytest.raises(errors.TemplateError, match="not JSON"):
        records.TemplateManifest.from_json("{")


def test_check_refuses_a_spec_of_another_machine_type(tmp_path: Path) -> None:
    mem, state = tmp_path / "t.mem", tmp_path / "state"
    mem.write_bytes(b"\0" * 4096)
    state.write_bytes(b"device state")
    m = dataclasses.replace(sample_manifest("t"), memory_file=str(mem), memory_size=4096,
                            state_file=str(state), state_size=12,
                            state_sha256=hashlib.sha256(b"device state").hexdigest(),
                            qemu_version=features.binary_version("qemu-system-x86_64"))
    tm.check(m)
    other = dataclasses.replace(m, spec=m.spec.with_(machine="pc-i440fx-9.2"))
    with pytest.raises(errors.TemplateError, match=r"machine type pc-i440fx-9\.2"):
        tm.check(other)


def disk_template_manifest(tmp_path: Path) -> records.TemplateManifest:
    tdir = tmp_path / "templates" / "t"
    tdir.mkdir(parents=True)
    base = tmp_path / "base.qcow2"
    base.write_bytes(b"base")
    overlay = tdir / "disk0.qcow2"
    overlay.write_bytes(b"overlay")
    spec = VMSpec(name="t", memory_mib=256, memory=MemorySpec(path="/m/t.mem", share=False,
                                                              readonly=True),
                  kernel="/k", net=NetSpec(mac="52:54:00:00:00:01"),
                  disks=(DiskSpec(path=str(overlay), backing=str(base), backing_format="qcow2"),
                         DiskSpec(path="/iso/tools.raw", format="raw", readonly=True)))
    return dataclasses.replace(sample_manifest("t", spec=spec),
                               disks=(tm.disk_record(overlay, 0, str(base)),))


def test_clone_spec_gives_each_clone_its_own_overlays(tmp_path: Path) -> None:
    manifest = disk_template_manifest(tmp_path)
    vdir = tmp_path / "vms" / "c1"
    spec = tm.clone_spec(manifest, "c1", vdir)
    overlay, iso = spec.disks
    assert overlay == DiskSpec(path=str(vdir / "disk0.qcow2"), format="qcow2",
                               backing=str(tmp_path / "templates/t/disk0.qcow2"),
                               backing_format="qcow2")
    assert iso == DiskSpec(path="/iso/tools.raw", format="raw", readonly=True)
    assert spec.net is not None and spec.net.mac != "52:54:00:00:00:01"
    assert tm.template_mac(manifest) == "52:54:00:00:00:01"
    assert spec.memory == MemorySpec(path="/m/t.mem", share=False, readonly=True)
    # A pool member's directory renamed to its clone's: the disk paths follow.
    moved = tm.move_disks(spec, vdir, tmp_path / "vms" / "c2")
    assert moved.disks[0].path == str(tmp_path / "vms/c2/disk0.qcow2")
    assert moved.disks[0].backing == overlay.backing and moved.disks[1] == iso


def test_check_disks_refuses_missing_or_changed_overlays(tmp_path: Path) -> None:
    manifest = disk_template_manifest(tmp_path)
    tm.check_disks(manifest)
    overlay = tmp_path / "templates/t/disk0.qcow2"
    with open(overlay, "ab") as f:
        f.write(b"x")
    with pytest.raises(errors.TemplateError, match=r"disk0\.qcow2 was modified"):
        tm.check_disks(manifest)
    overlay.unlink()
    with pytest.raises(errors.TemplateError, match=r"disk0\.qcow2 is missing"):
        tm.check_disks(manifest)
    manifest = disk_template_manifest(tmp_path / "again")
    base = tmp_path / "again/base.qcow2"
    base.write_bytes(b"rebuilt base")
    with pytest.raises(errors.TemplateError, match=r"base\.qcow2 under its disk changed"):
        tm.check_disks(manifest)
    base.unlink()
    with pytest.raises(errors.TemplateError, match=r"base\.qcow2 under its disk is missing"):
        tm.check_disks(manifest)
    tm.check_disks(sample_manifest("old"))  # a template without disks


def test_adopt_files_moves_overlays_read_only_and_can_be_repeated_or_undone(
        tmp_path: Path) -> None:
    src, tdir = tmp_path / "vms/src", tmp_path / "templates/t"
    src.mkdir(parents=True)
    tdir.mkdir(parents=True)
    (src / "disk0.qcow2").write_bytes(b"overlay")
    (src / "kernel").write_bytes(b"imported kernel")
    (tmp_path / "src.mem").write_bytes(b"ram")
    base = tmp_path / "base.raw"
    base.write_bytes(b"base")
    spec = VMSpec(name="src", memory_mib=256, memory=MemorySpec(path=str(tmp_path / "src.mem")),
                  kernel=str(src / "kernel"), initrd="/boot/initrd",
                  disks=(DiskSpec(path=str(src / "disk0.qcow2"), backing=str(base),
                                  backing_format="raw"),
                         DiskSpec(path="/iso.raw", format="raw", readonly=True)))
    mem = tmp_path / "tpl-t.mem"
    disks, entries, files = create._adopt_files(spec, src, tdir, mem)
    assert disks[0].path == str(tdir / "disk0.qcow2") and disks[0].backing == str(base)
    assert disks[1] == spec.disks[1]
    for f in (tdir / "disk0.qcow2", tdir / "kernel", mem):
        assert f.stat().st_mode & 0o777 == 0o400
    assert not (src / "disk0.qcow2").exists() and not (tmp_path / "src.mem").exists()
    assert entries == [tm.disk_record(tdir / "disk0.qcow2", 0, str(base))]
    assert files == {"kernel": str(tdir / "kernel")}
    # A creation that died half-way repeats it: what was moved is taken as it is.
    os.rename(tdir / "kernel", src / "kernel")
    assert create._adopt_files(spec, src, tdir, mem) == (disks, entries, files)
    # Undoing puts everything back, writable.
    create._return_files(spec, src, tdir, str(mem))
    assert (src / "disk0.qcow2").read_bytes() == b"overlay"
    assert (tmp_path / "src.mem").read_bytes() == b"ram" and not mem.exists()
    assert (src / "kernel").stat().st_mode & 0o777 == 0o600
    # A file gone from both places cannot be adopted.
    (src / "kernel").unlink()
    with pytest.raises(FileNotFoundError):
        create._adopt_files(spec, src, tdir, mem)


def test_templates_need_overlays() -> None:
    spec = VMSpec(name="v", memory_mib=256, memory=MemorySpec(path="/m"),
                  disks=(DiskSpec(path="/img.raw", format="raw"),))
    with pytest.raises(errors.TemplateError, match="without an overlay"):
        create.check_disks_templatable(spec)
    create.check_disks_templatable(spec.with_(disks=(DiskSpec(path="/img.raw", readonly=True),)))


def test_hook_failure_message_is_one_line() -> None:
    msg = clone.hook_failure("c-1", 5, "step one\nstep two\n\nit broke\n")
    assert msg == "c-1: the on-clone hook failed with status 5: step one | step two | it broke"
    long = clone.hook_failure("c-1", 1, "x" * 1000 + "\nend")
    assert "\n" not in long and long.endswith("x | end") and len(long) < 400
    assert clone.hook_failure("c", 2, "") == "c: the on-clone hook failed with status 2 (no output)"


def test_clone_result_json_has_hook_fields() -> None:
    r = CloneResult("c", 1, False, 0.1, 0.2, 0.3, 0.44444, hook_status=0,
                        hook_output="hi\n", hook_done=0.55556)
    assert r.to_dict()["hook_output"] == "hi\n" and r.to_dict()["hook_done"] == 0.5556
    assert CloneResult("c", 1, True, 0, 0, 0, 0).to_dict()["hook_status"] is None


def test_template_rm_refuses_a_parent(tmp_path: Path) -> None:
    s = Store(tmp_path / "home", tmp_path / "mem")
    s.add_template(sample_manifest("t1"))
    s.add_template(sample_manifest("t2", parent="t1"))
    with pytest.raises(errors.StateError, match=r"t1 has child templates \(t2\)"):
        asyncio.run(catalog.remove(s, "t1", force=True))
    assert s.has_template("t1") and catalog.children_of(s, "t1") == ["t2"]
    s.close()


def test_nested_deadlines_end_at_the_outer_one() -> None:
    """A polling loop of short waits, each under its own deadline, ends at
    the outer deadline (with asyncio.wait_for under Python 3.11 the inner
    waits swallowed the outer cancellation 28 times in 30)."""
    from vmfork.qemu.machine import deadline

    async def poll() -> str:
        end = time.monotonic() + 0.5
        while time.monotonic() < end:
            await deadline(asyncio.sleep(0.001), 10, "one poll")
        return "ran to the end"

    async def go() -> None:
        for _ in range(30):
            t0 = time.monotonic()
            with pytest.raises(errors.VmforkTimeout, match="the poll"):
                await deadline(poll(), 0.02, "the poll")
            assert time.monotonic() - t0 < 0.3
        assert await deadline(asyncio.sleep(0, result=1), 1.0, "x") == 1

    asyncio.run(go())


def test_default_deadlines_follow_the_scale() -> None:
    """VMFORK_TIMEOUT_SCALE stretches the deadlines of every command (read at import)."""
    code = ("from vmfork.timeouts import DEFAULT; "
            "print(DEFAULT.boot, DEFAULT.exec)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "VMFORK_TIMEOUT_SCALE": "2.5"}, check=True)
    assert out.stdout.split() == ["300.0", "150.0"]


def test_vm_info_round_trip_and_old_records() -> None:
    spec = record("a").spec
    saved = SavedState(name="a", state_file="/s", sha256="ab", size=1, memory_file="/m",
                       memory_size=2, save_id="x", saved_at=1.0, qemu_version="10.0.2",
                       machine="pc-q35-10.0")
    info = VMInfo(owns_memory=False, gen=3, updates=2, boot_seconds=1.5, guest="debian",
                  update=UpdateIntent(4, spec, "copy", False, "/new.mem"),
                  retire=RetiredQemu(pid=9, pid_start=1.25, gen=2), saved=saved,
                  launcher=Launcher(pid=7, start=2.5))
    assert VMInfo.from_dict(json.loads(json.dumps(info.to_dict()))) == info
    # What earlier versions wrote: free keys, some missing, one unknown.
    old = {"owns_memory": True, "gen": 1, "boot_seconds": 2.0, "something_new": 1,
           "update": {"gen": 2, "spec": spec.to_json(), "mode": "ignore-shared"}}
    got = VMInfo.from_dict(old)
    assert (got.gen, got.updates, got.owns_memory, got.boot_seconds) == (1, 0, True, 2.0)
    assert got.update == UpdateIntent(2, spec, "ignore-shared", True, None)
    assert got.retire is None and got.saved is None and got.launcher is None
    assert VMInfo.from_dict({}) == VMInfo()


def test_an_abandoned_launch_is_one_whose_launcher_is_gone() -> None:
    from vmfork.launch import this_process
    from vmfork.listing import ABANDONED, launch_abandoned, observed_state

    dead = subprocess.Popen(["true"])
    dead.wait()
    rec = record("a", pid=dead.pid, pid_start=None)
    rec.state = "starting"
    assert not launch_abandoned(rec) and observed_state(rec) == "dead"
    rec.info.launcher = this_process()
    assert not launch_abandoned(rec) and observed_state(rec) == "dead"
    rec.info.launcher = Launcher(dead.pid, None)
    assert launch_abandoned(rec) and observed_state(rec) == ABANDONED
    rec.state = "running"  # a clone killed in its identity step: not committed either
    assert observed_state(rec) == ABANDONED


def test_run_to_end_holds_every_cancellation_until_the_step_ends() -> None:
    ended: list[str] = []

    async def step() -> None:
        await asyncio.sleep(0.05)
        ended.append("step")

    async def caller() -> None:
        try:
            await asyncio.sleep(10)
        finally:
            await run_to_end(step())
            ended.append("after")

    async def main() -> None:
        task = asyncio.create_task(caller())
        await asyncio.sleep(0)
        for _ in range(3):  # cancelled, then cancelled again during the step
            task.cancel()
            await asyncio.sleep(0.01)
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    asyncio.run(main())
    assert ended == ["step"]


def test_proc_matches_psutil() -> None:
    import psutil

    from vmfork import proc
    me = os.getpid()
    assert abs(proc.process_start_time(me) - psutil.Process(me).create_time()) < 0.02
    assert proc.process_alive(me) and proc.process_alive(me, psutil.Process(me).create_time())
    assert not proc.process_alive(me, psutil.Process(me).create_time() - 5)
    assert not proc.process_alive(None) and not proc.process_alive(2**22 + 7)
    child = subprocess.Popen(["true"])
    while psutil.Process(child.pid).status() != psutil.STATUS_ZOMBIE:
        time.sleep(0.01)
    assert not proc.process_alive(child.pid)  # a zombie is not alive
    child.wait()
    assert proc.process_start_time(child.pid) is None


# -- admission: memory, clone counts, host ports ---------------------------------------
def test_admission_names_the_need_and_both_numbers(tmp_path: Path) -> None:
    avail = admission.mem_available()
    free = admission.free_space(tmp_path / "not" / "yet")  # its nearest existing parent
    assert avail > 0 and free > 0
    admission.check_new_vm("small", 64, tmp_path)
    admission.check_clone("c", "t", 64)
    huge = 2 * max(avail, free) // admission.MIB + 1
    with pytest.raises(errors.ResourceError) as exc:
        admission.check_new_vm("big", huge, tmp_path)
    assert str(exc.value) == (f"big: {huge} MiB of guest memory do not fit: {tmp_path} has "
                              f"{free // admission.MIB} MiB free, MemAvailable is "
                              f"{avail // admission.MIB} MiB")
    with pytest.raises(errors.ResourceError, match=r"worst case of a clone of t.*MemAvailable"):
        admission.check_clone("c", "t", huge)


def test_clone_count_is_bounded() -> None:
    from vmfork.cli import templates as cli_templates
    from vmfork.templates import clone

    assert clone.check_count(1) == 1 and clone.check_count(clone.MAX_CLONES)
    for bad in (0, -1, clone.MAX_CLONES + 1):
        with pytest.raises(errors.InvalidInput, match=f"must be 1-{clone.MAX_CLONES} per call"):
            clone.check_count(bad)
    help_text = next(p.help for p in cli_templates.clone_cmd.params if p.name == "count")
    assert f"at most {clone.MAX_CLONES}" in str(help_text)
    starting = next(p for p in cli_templates.clone_cmd.params if p.name == "max_starting")
    assert starting.default == clone.MAX_STARTING
    assert 1 <= clone.MAX_STARTING <= clone.MAX_CLONES


def test_fresh_forwards_are_free_and_never_handed_out_twice() -> None:
    first = ports.fresh_forwards(((8080, 80), (2222, 22)))
    second = ports.fresh_forwards(((8080, 80), (2222, 22)))
    assert [g for _, g in first] == [80, 22]
    hosts = [h for h, _ in first + second]
    assert len(set(hosts)) == 4 and 8080 not in hosts
    import socket
    for h in hosts:  # free: each can be bound
        with socket.socket() as s:
            s.bind(("127.0.0.1", h))


def test_port_collision_is_recognised() -> None:
    taken = errors.LaunchError("QEMU exited during start", exitcode=1, log_tail=(
        "qemu-system-x86_64: -netdev user,id=net0,hostfwd=tcp:127.0.0.1:8080-:80: "
        "Could not set up host forwarding rule 'tcp:127.0.0.1:8080-:80'"))
    assert ports.collided(taken)
    assert not ports.collided(errors.LaunchError("QEMU exited", exitcode=1, log_tail="other"))
    assert not ports.collided(errors.StateError("x"))


@pytest.mark.parametrize("value", [0, -1, float("inf"), float("nan"), True, "5"])
def test_command_timeouts_must_be_deadlines(value: object) -> None:
    with pytest.raises(errors.InvalidInput, match=r"invalid exec timeout .*finite number"):
        check_seconds(value, "exec timeout")
    assert check_seconds(2, "exec timeout") == 2.0
