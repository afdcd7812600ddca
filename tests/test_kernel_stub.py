"""The stub of a template's kernel that clones' QEMUs get (no QEMU here)."""

from __future__ import annotations

from pathlib import Path

from vmfork.templates.kernel_stub import stub_for


def bzimage(path: Path, setup_sects: int, size: int) -> bytes:
    data = bytearray(size)
    data[0x1F1] = setup_sects
    data[0x202:0x206] = b"HdrS"
    data[0x1000:0x1004] = b"code"
    path.write_bytes(bytes(data))
    return bytes(data)


def test_stub_keeps_the_header_and_one_page(tmp_path: Path) -> None:
    kernel = tmp_path / "vmlinuz"
    data = bzimage(kernel, 7, 1 << 20)
    cache = tmp_path / "stubs"
    stub = stub_for(cache, str(kernel))
    assert stub is not None and Path(stub).parent == cache
    assert Path(stub).read_bytes() == data[:8 * 512 + 4096]
    assert Path(stub).stat().st_mode & 0o777 == 0o600
    assert cache.stat().st_mode & 0o777 == 0o700
    assert stub_for(cache, str(kernel)) == stub  # made once
    other = tmp_path / "other"
    bzimage(other, 0, 1 << 20)  # 0 setup sectors mean 4
    stub2 = stub_for(cache, str(other))
    assert stub2 != stub and Path(str(stub2)).stat().st_size == 5 * 512 + 4096


def test_no_stub_for_what_is_not_a_bzimage(tmp_path: Path) -> None:
    elf = tmp_path / "vmlinux"
    elf.write_bytes(b"\x7fELF" + bytes(100_000))
    assert stub_for(tmp_path / "stubs", str(elf)) is None
    small = tmp_path / "stub-already"
    bzimage(small, 4, 5 * 512 + 4096)  # a stub itself: kept whole
    assert stub_for(tmp_path / "stubs", str(small)) is None
    assert stub_for(tmp_path / "stubs", str(tmp_path / "missing")) is None
    assert not (tmp_path / "stubs").exists()
