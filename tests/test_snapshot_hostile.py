"""Snapshot files and template manifests as hostile input.

A snapshot file may come from anyone. These tests hand vmfork files whose
header tries path traversal, absolute paths, QEMU options smuggled into
MAC, ports, machine type, CPU model and kernel command line, a foreign QEMU
binary, oversized and sparse parts, overlapping or out-of-file offsets,
truncated and non-JSON headers, and 200 seeded random mutations of a valid
header. Each must either import normally (a harmless change) or end with one
InvalidInput line, write nothing outside the target directory, leave nothing
behind and run nothing (a ``guestfwd=...cmd:touch MARKER`` would create the
marker file).

Most of it runs what an import does before QEMU starts (header, checks,
extraction, spec and argv: :func:`unpack`), which needs no QEMU; the CLI
tests run ``vmfork snapshot import`` itself, and one runs a real import on
QEMU to show that only the local QEMU binary is started.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import random
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.test_units import sample_manifest
from vmfork.errors import BadSnapshotFile, InvalidInput, TemplateError, VmforkError
from vmfork.images.demo import demo_image
from vmfork.records import TemplateManifest
from vmfork.snapshots import export, imports
from vmfork.spec import DEFAULT_QEMU, MemorySpec, NetSpec, RunPaths, VMSpec, build_argv

if TYPE_CHECKING:
    from conftest import Env

#: The machine types the checks are told the local QEMU offers.
MACHINES = ("microvm", "pc-i440fx-10.0", "pc-q35-10.0")
KERNEL, INITRD, RAM = b"K" * 5000, b"I" * 3000, b"R" * 8192


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_file(path: Path, spec: VMSpec, kernel: bytes = KERNEL, initrd: bytes = INITRD,
              ram: bytes = RAM) -> dict[str, Any]:
    """Write a snapshot file as export lays one out (header, kernel, initrd,
    a stand-in for QEMU's stream); return its header as JSON."""
    k_at = export.HEADER_SIZE
    i_at = k_at + (len(kernel) + 4095) // 4096 * 4096
    r_at = (i_at + len(initrd) + export.ALIGN - 1) // export.ALIGN * export.ALIGN
    header = export.Header(
        name=spec.name, created=1_700_000_000.5, memory_mib=spec.memory_mib,
        qemu_version="10.0.2", machine="pc-q35-10.0", spec=spec,
        blobs={"kernel": export.Part(k_at, len(kernel), sha(kernel)),
               "initrd": export.Part(i_at, len(initrd), sha(initrd))},
        ram=export.Part(r_at, len(ram), sha(ram)))
    with open(path, "wb") as f:
        f.write(header.encode())
        for at, data in ((k_at, kernel), (i_at, initrd), (r_at, ram)):
            f.seek(at)
            f.write(data)
    return header.to_dict()


def write_header(path: Path, d: object) -> None:
    """Replace the header of snapshot file *path* by JSON *d* (cut at the
    header's size, so the parts after it stay as they are)."""
    head = export.MAGIC + json.dumps(d).encode()
    with open(path, "r+b") as f:
        f.write(head.ljust(export.HEADER_SIZE, b"\0")[:export.HEADER_SIZE])


def source_spec(marker: Path) -> VMSpec:
    return VMSpec(name="src", memory_mib=256, memory=MemorySpec(path="/dev/shm/x/src.mem"),
                  kernel="/img/vmlinuz", initrd="/img/initrd", append="console=ttyS0",
                  net=NetSpec(mac="52:54:00:12:34:56", ports=((2222, 22),)),
                  machine="pc-q35-10.0", qemu=str(marker.parent / "evil-qemu"))


def unpack(src: Path, target: Path, memory_dir: Path) -> list[str]:
    """What ``vmfork snapshot import`` does before QEMU starts, given that
    the local QEMU offers :data:`MACHINES`: read and check the header, check
    space and every sha256, extract the blobs into *target*, derive the
    spec; return the argv QEMU would get."""
    header = export.read_header(src)
    imports.check_machine(src, header, MACHINES, "10.0.2")
    imports.check_space(src, header, target, memory_dir)
    export.check_export(src, header)
    target.mkdir()
    imports.extract_blobs(src, header, target)
    spec = imports.import_spec(header, "imp", target, memory_dir / "imp.mem")
    run = target.parent / "run"
    return build_argv(spec, RunPaths(qmp=f"{run}/qmp.sock", console=f"{run}/con.sock",
                                     console_log=f"{run}/con.log", agent=f"{run}/agent.sock"),
                      incoming=("defer",))


def split_option(value: str) -> list[str]:
    """Split a QEMU option string at its commas (``,,`` is a comma in a value)."""
    parts, cur, i = [], "", 0
    while i < len(value):
        if value[i] == ",":
            if value[i + 1:i + 2] == ",":
                cur, i = cur + ",", i + 2
                continue
            parts.append(cur)
            cur = ""
        else:
            cur += value[i]
        i += 1
    return [*parts, cur]


#: Per QEMU option of vmfork's argv: what its first part may be (None: any)
#: and which keys may follow. Anything else was smuggled in.
OPTION_SHAPES: dict[str, tuple[set[str] | None, set[str]]] = {
    "-machine": (set(MACHINES), {"memory-backend", "aux-ram-share"}),
    "-object": ({"memory-backend-file"}, {"id", "size", "mem-path", "share", "readonly", "rom"}),
    "-chardev": ({"socket", "ringbuf", "hub"},
                 {"id", "path", "server", "wait", "size", "chardevs.0", "chardevs.1"}),
    "-netdev": ({"user"}, {"id", "hostfwd"}),
    "-device": ({"virtio-serial-pci", "virtconsole", "vmgenid", "virtio-rng-pci",
                 "virtio-net-pci", "virtserialport"},
                {"id", "chardev", "guid", "netdev", "mac", "bus", "name"}),
    "-name": ({"imp"}, {"debug-threads"}),
    "-qmp": (None, {"server", "wait"}),
    "-accel": ({"tcg", "kvm"}, {"tb-size"}),
}


def assert_safe_argv(argv: list[str]) -> None:
    assert argv[0] == DEFAULT_QEMU
    flags = [a for a in argv[1:] if a.startswith("-")]
    assert "-blockdev" not in flags and "-drive" not in flags
    for i, flag in enumerate(argv[:-1]):
        if flag not in OPTION_SHAPES:
            continue
        first, keys = OPTION_SHAPES[flag]
        head, *rest = split_option(argv[i + 1])
        assert first is None or head in first, (flag, argv[i + 1])
        for part in rest:
            assert "=" in part and part.split("=", 1)[0] in keys, (flag, argv[i + 1])
        for part in rest:
            if part.startswith("hostfwd="):
                assert part.split("=", 1)[1].startswith("tcp:127.0.0.1:"), part


def tree(root: Path, skip: tuple[Path, ...] = ()) -> dict[str, tuple[int, int]]:
    """Every path under *root* (not under *skip*) with its mode and size."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        d = Path(dirpath)
        if any(d == s or s in d.parents for s in skip):
            continue
        for n in dirnames + filenames:
            if d / n in skip:
                continue
            st = os.lstat(d / n)
            out[str(d / n)] = (st.st_mode, st.st_size if stat.S_ISREG(st.st_mode) else 0)
    return out


class Lab:
    """A valid snapshot file in a scratch directory, the directories an
    import may write, and a marker that only a command smuggled into QEMU's
    options would create."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.src = root / "in" / "file.snap"
        self.src.parent.mkdir()
        self.marker = root / "marker"
        self.memory_dir = root / "mem"
        self.memory_dir.mkdir()
        self.home = root / "home"
        self.home.mkdir()
        self.target = self.home / "vm"
        self.header = make_file(self.src, source_spec(self.marker))
        self.outside = tree(root, skip=(self.src, self.target))

    def attempt(self, d: object) -> tuple[list[str] | None, VmforkError | None]:
        """Import *d* as the header; assert the outcome is clean either way."""
        write_header(self.src, d)
        argv: list[str] | None = None
        error: VmforkError | None = None
        try:
            argv = unpack(self.src, self.target, self.memory_dir)
        except VmforkError as exc:
            error = exc
        assert not self.marker.exists()
        assert tree(self.root, skip=(self.src, self.target)) == self.outside
        if error is not None:
            msg = str(error)
            assert isinstance(error, InvalidInput), f"{type(error).__name__}: {msg}"
            assert msg and "\n" not in msg and len(msg) < 400, msg
            assert not self.target.exists() or not any(self.target.iterdir())
        else:
            assert argv is not None
            assert_safe_argv(argv)
            assert sorted(p.name for p in self.target.iterdir()) == ["initrd", "kernel"]
            assert (self.target / "kernel").read_bytes() == KERNEL
            assert (self.target / "initrd").read_bytes() == INITRD
            assert stat.S_IMODE((self.target / "kernel").stat().st_mode) == 0o600
        if self.target.exists():
            for p in self.target.iterdir():
                p.unlink()
            self.target.rmdir()
        return argv, error

    def refused(self, d: object, match: str) -> BadSnapshotFile:
        argv, error = self.attempt(d)
        assert isinstance(error, BadSnapshotFile), (argv, error)
        assert match in str(error), str(error)
        return error


@pytest.fixture
def lab(tmp_path: Path) -> Lab:
    return Lab(tmp_path)


def with_(d: dict[str, Any], path: str, value: object) -> dict[str, Any]:
    """A copy of *d* with the value at dotted *path* replaced (``...=DEL``: removed)."""
    d = copy.deepcopy(d)
    *keys, last = path.split(".")
    node: Any = d
    for k in keys:
        node = node[int(k)] if isinstance(node, list) else node[k]
    if value is DEL:
        del node[last]
    elif isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return d


DEL = object()
INJECTED_MAC = "52:54:00:00:00:01,romfile=/etc/passwd"


def guestfwd(marker: Path) -> str:
    return f"22,guestfwd=tcp:10.0.2.100:1-cmd:touch {marker}"


# -- the valid file, and what an import makes of it ---------------------------------
def test_valid_file_imports_with_local_qemu_and_own_paths(lab: Lab) -> None:
    argv, error = lab.attempt(lab.header)
    assert error is None and argv is not None
    assert argv[0] == DEFAULT_QEMU  # not the header's evil-qemu
    assert argv[argv.index("-kernel") + 1] == str(lab.target / "kernel")
    assert argv[argv.index("-initrd") + 1] == str(lab.target / "initrd")
    assert "mem-path=" + str(lab.memory_dir / "imp.mem") in argv[argv.index("-object") + 1]
    assert "hostfwd=tcp:127.0.0.1:2222-:22" in argv[argv.index("-netdev") + 1]


# -- hostile headers, one by one ------------------------------------------------------
def test_blob_names_are_allow_listed(lab: Lab) -> None:
    kernel = lab.header["blobs"]["kernel"]
    for name in ("../../outside", "/tmp/vmfork-hostile-abs", f"{lab.root}/outside",
                 "kernel/../../x", "vmlinuz", "", "kernel\x00"):
        blobs = {"kernel": kernel, name: lab.header["blobs"]["initrd"]}
        lab.refused(with_(lab.header, "blobs", blobs), "blobs has an unknown key")
    assert not Path("/tmp/vmfork-hostile-abs").exists()


@pytest.mark.parametrize(("path", "value", "match"), [
    ("spec.net.mac", INJECTED_MAC, "invalid MAC address"),
    ("spec.net.ports", [["22,guestfwd=tcp:10.0.2.100:1-cmd:touch MARKER", 22]], "invalid port"),
    ("spec.net.ports", [[2222, "22,guestfwd=tcp:10.0.2.100:1-cmd:touch MARKER"]],
     "invalid port"),
    ("spec.net.ports", [[2222, 70000]], "1-65535"),
    ("machine", "pc-q35-10.0,accel=kvm", "invalid machine type"),
    ("machine", "pc-q35-9.9", "is not one that the local QEMU 10.0.2 offers"),
    ("spec.machine", "q35,,romfile=/etc/passwd", "invalid machine type"),
    ("spec.cpu", "qemu64,romfile=/etc/passwd,x", "invalid CPU model"),
    ("spec.append", "console=ttyS0\n-device", "control characters"),
    ("spec.vmgenid", "00000000-0000-0000-0000-000000000000,romfile=/x", "generation ID"),
    ("spec.qga", "yes", "wrong type"),
    ("spec.disks", [{"path": "/etc/shadow", "format": "raw"}], "had disks"),
    ("spec.disks", [{"path": "/x", "format": "raw", "script": "/x"}], "unknown key 'script'"),
    ("spec.initrd", None, "blob initrd and its spec disagree"),
    ("spec.evil", 1, "unknown key 'evil'"),
    ("name", "../../outside", "invalid VM name"),
    ("qemu_version", "10.0.2; rm -rf /", "invalid QEMU version"),
    ("capabilities", {"mapped-ram": True, "x-exec": True}, "unknown key"),
    ("capabilities", {"mapped-ram": False}, "capability mapped-ram"),
    ("format", True, "format True is not supported"),
    ("format", 2, "format 2 is not supported"),
    ("created", "yesterday", "creation time"),
    ("ram", DEL, "lacks 'ram'"),
    ("blobs.kernel", DEL, "carries no kernel"),
    ("blobs.initrd", DEL, "blob initrd and its spec disagree"),
    ("blobs.kernel.sha256", "../x", "invalid kernel sha256"),
    ("blobs.kernel.path", "/etc/passwd", "unknown key 'path'"),
    ("memory_mib", 512, "differs from its spec"),
])
def test_hostile_header_fields_are_refused(lab: Lab, path: str, value: object,
                                           match: str) -> None:
    if value is not DEL:
        value = json.loads(json.dumps(value).replace("MARKER", str(lab.marker)))
    lab.refused(with_(lab.header, path, value), match)


def test_a_foreign_qemu_in_the_header_is_never_run(lab: Lab) -> None:
    for qemu in ("/bin/sh", f"{lab.root}/evil-qemu", "sh -c 'touch x'"):
        argv, error = lab.attempt(with_(lab.header, "spec.qemu", qemu))
        assert error is None and argv is not None and argv[0] == DEFAULT_QEMU


def test_commas_in_the_kernel_command_line_stay_there(lab: Lab) -> None:
    """-append is one argv element QEMU does not split: a comma in it is the
    guest's business and adds no QEMU option."""
    append = f"console=ttyS0,guestfwd=tcp:10.0.2.100:1-cmd:touch {lab.marker}"
    argv, error = lab.attempt(with_(lab.header, "spec.append", append))
    assert error is None and argv is not None
    assert argv[argv.index("-append") + 1] == append


@pytest.mark.parametrize(("part", "changes", "match"), [
    ("kernel", {"size": (1 << 30) + 1}, "kernel size"),
    ("ram", {"size": (256 << 20) + export.RAM_STREAM_SLACK + 1}, "RAM size"),
    ("kernel", {"offset": 4096}, "kernel offset 4096 is out of range"),
    ("kernel", {"offset": export.HEADER_SIZE + 100}, "not 4096-aligned"),
    ("initrd", {"offset": export.HEADER_SIZE}, "initrd (offset 65536) overlaps kernel"),
    ("ram", {"offset": export.HEADER_SIZE + 8192}, "not 1048576-aligned"),
    ("ram", {"offset": 1 << 40}, "truncated: RAM ends at byte"),
    ("initrd", {"size": 1 << 29}, "overlaps initrd"),
    ("kernel", {"size": -1}, "kernel size -1 is out of range"),
    ("kernel", {"offset": 65536.0}, "is not an integer"),
])
def test_parts_must_lie_inside_the_file_apart(lab: Lab, part: str, changes: dict[str, int],
                                              match: str) -> None:
    d = copy.deepcopy(lab.header)
    (d["ram"] if part == "ram" else d["blobs"][part]).update(changes)
    lab.refused(d, match)


def test_sparse_file_declaring_more_than_fits_is_refused_up_front(lab: Lab) -> None:
    """A small sparse file whose header declares a huge guest: refused by the
    free-space check before anything is written or hashed."""
    spec = source_spec(lab.marker).with_(memory_mib=1 << 20)  # 1 TiB
    big = lab.root / "in" / "big.snap"
    d = make_file(big, spec)
    d["ram"]["size"] = 1 << 40
    write_header(big, d)
    os.truncate(big, export.ALIGN + (1 << 40))
    assert big.stat().st_blocks * 512 < 1 << 20
    with pytest.raises(BadSnapshotFile, match=r"needs 1099511635776 bytes in .*mem, which "):
        unpack(big, lab.target, lab.memory_dir)
    assert not lab.target.exists()


def test_blobs_that_do_not_fit_the_target_are_refused(lab: Lab,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The blobs' declared sizes against the target's free space (a file
    system made small here by telling the check it has 4 KiB free)."""
    header = export.read_header(lab.src)
    monkeypatch.setattr(imports, "_free_bytes", lambda p: (hash(p), 4096))
    with pytest.raises(BadSnapshotFile, match=r"needs 8000 bytes in .*/vm, which has 4096 "):
        imports.check_space(lab.src, header, lab.target, lab.memory_dir)


@pytest.mark.parametrize(("head", "match"), [
    (b"", "not a vmfork snapshot file"),
    (b"QCOW\xfb" + b"\0" * 100, "not a vmfork snapshot file"),
    (export.MAGIC + b'{"format": 1, "name": "a"', "truncated in its header"),
    (export.MAGIC + b"not json".ljust(export.HEADER_SIZE, b"\0"), "corrupt .JSONDecodeError"),
    (export.MAGIC + b"\xff\xfe{}".ljust(export.HEADER_SIZE, b"\0"), "corrupt"),
    (export.MAGIC + (b"[" * 60000).ljust(export.HEADER_SIZE, b"\0"), "corrupt .RecursionError"),
    (export.MAGIC + b'{"a": 1, "a": 2}'.ljust(export.HEADER_SIZE, b"\0"), "appears twice"),
    (export.MAGIC + b"[]".ljust(export.HEADER_SIZE, b"\0"), "not a JSON object"),
    (export.MAGIC + b"{}\0junk".ljust(export.HEADER_SIZE, b"\0"), "data after its JSON"),
])
def test_truncated_and_foreign_headers_are_refused(lab: Lab, head: bytes, match: str) -> None:
    lab.src.write_bytes(head)
    with pytest.raises(BadSnapshotFile, match=match) as info:
        unpack(lab.src, lab.target, lab.memory_dir)
    assert "\n" not in str(info.value)
    assert not lab.target.exists()


def test_corrupt_part_is_refused_before_anything_is_written(lab: Lab) -> None:
    with open(lab.src, "r+b") as f:
        f.seek(export.HEADER_SIZE + 10)
        f.write(b"x")
    lab.refused(lab.header, "corrupt: the kernel sha256 differs")


def test_extraction_checks_again_and_cleans_up(lab: Lab) -> None:
    """A file changed after its check (the initrd here) is caught while
    copied; what was written is removed."""
    header = export.read_header(lab.src)
    lab.target.mkdir()
    with open(lab.src, "r+b") as f:
        f.seek(header.blobs["initrd"].offset)
        f.write(b"changed")
    with pytest.raises(BadSnapshotFile, match="its initrd changed"):
        imports.extract_blobs(lab.src, header, lab.target)
    assert list(lab.target.iterdir()) == []


def test_extraction_never_follows_or_replaces(lab: Lab) -> None:
    header = export.read_header(lab.src)
    victim = lab.root / "victim"
    victim.write_text("precious")
    lab.target.mkdir()
    (lab.target / "initrd").symlink_to(victim)
    with pytest.raises(InvalidInput, match="File exists"):
        imports.extract_blobs(lab.src, header, lab.target)
    assert victim.read_text() == "precious"
    assert sorted(p.name for p in lab.target.iterdir()) == ["initrd"]  # ours removed
    (lab.target / "initrd").unlink()
    lab.target.rmdir()
    lab.target.symlink_to(lab.root / "in")  # the directory itself a symlink
    with pytest.raises(InvalidInput, match="cannot open directory"):
        imports.extract_blobs(lab.src, header, lab.target)
    assert sorted(p.name for p in (lab.root / "in").iterdir()) == ["file.snap"]


def test_template_manifest_with_injected_options_is_refused() -> None:
    """A template manifest feeds the clones' argv through VMSpec: the same
    checks refuse it (a TemplateError naming the template)."""
    d = sample_manifest("t").to_dict()
    for path, value in (("spec.net", {"mac": INJECTED_MAC, "ports": []}),
                        ("spec.net", {"mac": "52:54:00:12:34:56",
                                      "ports": [["22,guestfwd=x", 22]]}),
                        ("spec.machine", "q35,accel=kvm")):
        with pytest.raises(TemplateError, match="template t: its manifest is unreadable"):
            TemplateManifest.from_dict(with_(d, path, value))


# -- 200 random mutations -------------------------------------------------------------
HOSTILE_VALUES: list[object] = [
    INJECTED_MAC, "22,guestfwd=tcp:10.0.2.100:1-cmd:touch MARKER", "../outside/x",
    "OUTSIDE/x", "/etc/passwd", "q35,accel=kvm", "a" * 5000, "", "\n", "é", "kernel",
    "initrd", "pc-q35-10.0", "microvm", "52:54:00:ab:cd:ef", "f" * 64, "0" * 64,
    0, -1, 1, 22, 4096, 65535, 65536, export.HEADER_SIZE, export.ALIGN, 1 << 31, 1 << 64,
    10 ** 30, 1.5, math.nan, math.inf, True, False, None, [], {}, [1, 2], [[2222, 22]],
    {"a": 1}, {"kernel": 1}, [[1, 2, 3]],
]
HOSTILE_KEYS = ["../outside/evil", "OUTSIDE/abs", "script", "kernel", "initrd", "romfile",
                "qemu", "path", "extra", ""]


def json_paths(node: object, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    if prefix:
        yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from json_paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from json_paths(v, (*prefix, i))


def mutate(d: dict[str, Any], rng: random.Random, root: Path, marker: Path) -> tuple[
        dict[str, Any], list[str]]:
    """*d* changed 1-3 times at random: a value replaced (hostile, another
    type, longer or shorter), a key removed, added or renamed."""
    d = copy.deepcopy(d)
    done = []

    def pick_value() -> object:
        v = copy.deepcopy(rng.choice(HOSTILE_VALUES))
        if isinstance(v, str):
            v = v.replace("MARKER", str(marker)).replace("OUTSIDE", f"{root}/outside")
        return v

    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        path = rng.choice(list(json_paths(d)))
        parent: Any = d
        for k in path[:-1]:
            parent = parent[k]
        key = path[-1]
        old = parent[key]
        op = rng.choice(("value", "value", "value", "type", "length", "delete", "add",
                         "rename"))
        if op == "value":
            parent[key] = pick_value()
        elif op == "type":
            parent[key] = (str(old) if not isinstance(old, str)
                           else [old] if rng.random() < 0.5 else len(old))
        elif op == "length":
            if isinstance(old, str):
                parent[key] = old[:len(old) // 2] if rng.random() < 0.5 else old * 3
            elif isinstance(old, list):
                parent[key] = old[:-1] if old and rng.random() < 0.5 else [*old, *old[-1:]]
            elif isinstance(old, int) and not isinstance(old, bool):
                parent[key] = old * rng.choice((2, 1 << 20)) + rng.choice((0, 1))
            else:
                parent[key] = pick_value()
        elif op == "delete":
            del parent[key]
        elif op == "add":
            if isinstance(parent, dict):
                parent[rng.choice(HOSTILE_KEYS).replace("OUTSIDE", str(root))] = pick_value()
            else:
                parent.append(pick_value())
        elif isinstance(parent, dict):  # rename
            parent[rng.choice(HOSTILE_KEYS).replace("OUTSIDE", str(root))] = parent.pop(key)
        else:
            parent[key] = pick_value()
        done.append(f"{op} {'.'.join(map(str, path))}")
    return d, done


def test_200_mutated_headers(lab: Lab) -> None:
    rng = random.Random(1212)
    outcomes = {"imported": 0, "refused": 0}
    for i in range(200):
        d, what = mutate(lab.header, rng, lab.root, lab.marker)
        try:
            _, error = lab.attempt(d)
        except AssertionError as exc:
            raise AssertionError(f"mutation {i} ({'; '.join(what)}): {exc}") from exc
        outcomes["refused" if error else "imported"] += 1
    assert not (lab.root / "outside").exists()
    # The seed gives both kinds: harmless changes import, the rest are refused.
    assert outcomes["imported"] >= 5 and outcomes["refused"] >= 100, outcomes


# -- the command line, and one import on real QEMU --------------------------------------
def home_tree(env: Env) -> dict[str, tuple[int, int]]:
    return {k: v for k, v in tree(env.home, skip=(env.home / "images",)).items()
            if not k.endswith((".snap", "-journal", "-wal", "-shm"))}


def test_cli_refuses_hostile_files_with_one_line(env: Env) -> None:
    marker = env.home / "marker"
    f = env.home / "hostile.snap"
    header = make_file(f, source_spec(marker))
    env.cli("ls", check=True)  # the catalog exists before the snapshot of the tree
    before = home_tree(env)
    for d, as_template in (
            (with_(header, "spec.net.ports", [[2222, guestfwd(marker)]]), False),
            (with_(header, "spec.net.mac", INJECTED_MAC), True),
            (with_(header, "blobs", {**header["blobs"], "../../evil": header["blobs"]["initrd"]}),
             True),
            ("not a header", False)):
        write_header(f, d)
        p = env.cli("snapshot", "import", str(f), "x", *(["--as-template"] * as_template))
        assert p.returncode == 2, p.stderr
        lines = p.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("vmfork: error: "), p.stderr
        assert not marker.exists()
        assert home_tree(env) == before
    store = env.store()
    assert not store.list_vms() and not store.list_templates()
    store.close()


def test_real_import_runs_only_the_local_qemu(env: Env) -> None:
    """A file that passes every check but names its own QEMU (a script that
    would leave a marker) and carries a stream QEMU cannot load: the local
    QEMU is started, refuses the stream, and nothing is left behind."""
    marker = env.home / "marker"
    evil = marker.parent / "evil-qemu"
    evil.write_text(f"#!/bin/sh\ntouch {marker}\nexec {DEFAULT_QEMU} \"$@\"\n")
    evil.chmod(0o700)
    img = demo_image(env.home / "images")
    f = env.home / "real.snap"
    make_file(f, source_spec(marker).with_(append=img.append),
              kernel=Path(img.kernel).read_bytes(), initrd=Path(img.initrd).read_bytes())
    env.cli("ls", check=True)
    before = home_tree(env)
    p = env.cli("snapshot", "import", str(f), "x")
    assert p.returncode == 1 and "x: loading the state failed" in p.stderr, p.stderr
    assert len(p.stderr.splitlines()) == 1, p.stderr
    assert not marker.exists()
    new_files = {Path(k).relative_to(env.home) for k in set(home_tree(env)) - set(before)
                 if not Path(k).is_dir()}
    # The feature cache of the local QEMU and the name's lock file stay; no VM
    # directory, run directory, kernel, initrd or memory file does.
    assert new_files <= {Path("cache/qemu-features.json"), Path("locks/x.lock")}, new_files
    store = env.store()
    assert not store.list_vms()
    store.close()
    assert not list(env.memory_dir.iterdir())
