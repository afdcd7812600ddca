"""The CLI's error contract, without QEMU: bad usage is one line on stderr
and exit status 2; --help still works."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from .conftest import VMFORK


def vmfork(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([VMFORK, *args], capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL,
                          env={"VMFORK_HOME": str(tmp_path / "home"), "PATH": "/usr/bin:/bin"})


@pytest.mark.parametrize(("args", "words"), [
    (("run",), "Missing argument 'NAME'"),
    (("nosuch",), "No such command 'nosuch'"),
    (("run", "x", "--memory"), "requires an argument"),
    (("clone", "t", "-n", "zwei"), "'zwei' is not a valid integer"),
    (("update", "x", "--mode", "teleport"), "'teleport' is not one of"),
    (("run", "x", "--memory", "1Q", "--demo"), "invalid size '1Q'"),
    (("clone", "t", "-n", "3", "--max-starting", "0"), "'--max-starting'"),
    (("run", "x", "--demo", "--idle-pause", "soon"), "'soon' is not a valid float"),
    (("idle", "x", "soon"), "invalid idle pause 'soon'"),
])
def test_bad_usage_is_one_line_and_status_2(tmp_path: Path, args: tuple[str, ...],
                                            words: str) -> None:
    p = vmfork(tmp_path, *args)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vmfork: error: "), p.stderr
    assert words in lines[0]
    assert p.stdout == ""


def test_help_and_unknown_vm(tmp_path: Path) -> None:
    p = vmfork(tmp_path, "--help")
    assert p.returncode == 0 and "clone" in p.stdout and p.stderr == ""
    p = vmfork(tmp_path, "exec", "nosuchvm", "true")
    assert p.returncode == 1 and p.stderr.strip() == "vmfork: error: no VM named 'nosuchvm'"
