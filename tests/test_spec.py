"""Unit tests for the pure parts of :mod:`vmfork.spec`: names, sizes, the VM
description, its JSON form and the QEMU command line built from it."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest

from vmfork.errors import InvalidInput
from vmfork.names import (
    MAX_NAME,
    MAX_TEMPLATE_NAME,
    POOL_ID_HEX,
    InternalName,
    build_name,
    check_name,
    check_new_name,
    derived,
    internal,
    pool_lock,
    pool_member_name,
)
from vmfork.spec import (
    CONSOLE_RING,
    DEFAULT_CPU,
    MIB,
    DiskSpec,
    MemorySpec,
    NetSpec,
    RunPaths,
    VMSpec,
    build_argv,
    new_mac,
    parse_memory,
    parse_ready,
    parse_size,
)
from vmfork.store import GEN_RESERVE, MAX_SOCKET_PATH, Store

PATHS = RunPaths(qmp="/run/v/qmp.sock", console="/run/v/console.sock",
                 console_log="/run/v/console.log", agent="/run/v/agent.sock")


def make_spec(**kw: object) -> VMSpec:
    base: dict[str, object] = {
        "name": "web1", "memory_mib": 256,
        "memory": MemorySpec(path="/dev/shm/vmfork/web1.mem"),
        "kernel": "/img/vmlinuz", "initrd": "/img/initrd.cpio", "append": "console=ttyS0",
        "vmgenid": "11111111-2222-3333-4444-555555555555"}
    base.update(kw)
    return VMSpec(**base)  # type: ignore[arg-type]


def opt(argv: list[str], flag: str) -> list[str]:
    """Every value given to *flag* in *argv*."""
    return [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == flag]


# -- names -------------------------------------------------------------------
@pytest.mark.parametrize("name", ["a", "web1", "A.b_c-d", "9lives", "x" * 63])
def test_check_name_accepts(name: str) -> None:
    assert check_name(name) == name


@pytest.mark.parametrize("name", [
    "", "a/b", "../x", "a b", " a", "-a", ".a", "x" * 64, "a\n", "a\nb", "a:b", "a,b",
    "é", "a\x00"])
def test_check_name_rejects(name: str) -> None:
    with pytest.raises(InvalidInput, match="invalid VM name"):
        check_name(name)


# vmfork's own names (pool members, builds, imports, benchmarks) start with "_":
# they are valid stored names, but a user cannot give one to a new VM.
@pytest.mark.parametrize("name", ["_a", "_pool.t.abcdef", "_build.t", "_import.0011aabb",
                                  "_bench.update-256"])
def test_internal_names_are_not_for_users(name: str) -> None:
    assert check_name(name) == name  # a lookup of one vmfork made is fine
    with pytest.raises(InvalidInput, match="vmfork's own"):
        check_new_name(name)
    with pytest.raises(InvalidInput, match="vmfork's own"):
        check_new_name(name, "template")
    assert check_new_name(InternalName(name)) == name


def test_internal_names_are_made_by_vmfork() -> None:
    assert pool_member_name("t", "abcdef") == "_pool.t.abcdef"
    assert build_name("t") == "_build.t"
    assert internal("import", "00ff") == "_import.00ff"
    for made in (pool_member_name("t", "abcdef"), build_name("t"), internal("bench", "x")):
        assert check_new_name(made) == made
    # A name derived from one of vmfork's stays in its namespace.
    assert check_new_name(derived("_bench.clone-ab12", "-1")) == "_bench.clone-ab12-1"
    assert not isinstance(derived("web", "-1"), InternalName)
    # An internal lock name cannot be a VM's lock name.
    with pytest.raises(InvalidInput, match="vmfork's own"):
        check_new_name(pool_lock("t"))


def test_template_name_leaves_room_for_derived_names() -> None:
    longest = "t" * MAX_TEMPLATE_NAME
    assert check_new_name(longest, "template") == longest
    for made in (pool_member_name(longest, "0" * POOL_ID_HEX), build_name(longest),
                 derived(longest, "-99999")):
        assert check_name(made) == made
    with pytest.raises(InvalidInput, match=rf"at most {MAX_TEMPLATE_NAME}.*pool members"):
        check_new_name(longest + "t", "template")
    # A VM name may be longer: nothing is derived from it.
    assert check_new_name(longest + "t" * 13) == longest + "t" * 13


def test_new_names_fit_the_socket_paths_of_the_home() -> None:
    """Every socket of a new VM (up to the reserved update generation), and of
    a template's pool members and clones, fits in a UNIX socket path."""
    base = Path(tempfile.mkdtemp(prefix="vf", dir="/tmp"))
    try:
        short = Store(base)
        assert short.check_new_name("x" * MAX_NAME) == "x" * MAX_NAME
        longest = "t" * MAX_TEMPLATE_NAME
        assert short.check_new_name(longest, "template") == longest
        short.close()
        room = MAX_SOCKET_PATH - len("/run/") - len("/console.999999.sock")
        s = Store(base / ("d" * (room - len(str(base)) - 1 - 10)))
        ok = "v" * 10
        assert s.check_new_name(ok) == ok
        s.run_paths(ok, GEN_RESERVE)  # what was checked works
        with pytest.raises(InvalidInput, match=r"too long for VMFORK_HOME.*UNIX socket"):
            s.check_new_name(ok + "v")
        with pytest.raises(InvalidInput, match="too long for VMFORK_HOME"):
            s.check_new_name("t" * 5, "template")  # its pool members' ids are longer
        s.close()
    finally:
        shutil.rmtree(base)


# -- sizes -------------------------------------------------------------------
@pytest.mark.parametrize(("text", "expected"), [
    ("256M", 256 * MIB), ("256m", 256 * MIB), ("1G", 1024 * MIB), ("1GiB", 1024 * MIB),
    ("1GB", 1024 * MIB), ("2T", 2 * 1024 * 1024 * MIB), ("512", 512 * MIB),
    (" 64M ", 64 * MIB), ("4096K", 4 * MIB), ("512KiB", 512 * 1024), ("100B", 100),
    (128, 128 * MIB)])
def test_parse_size(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["12Q", "", "M", "-1M", "1.5G", "1 G B", "0x10M", "1e3",
                                  "256MM", "G1"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(InvalidInput, match="invalid size"):
        parse_size(text)


@pytest.mark.parametrize(("text", "mib"), [("64M", 64), ("256", 256), ("1G", 1024),
                                           ("65536K", 64), ("1T", 1024 * 1024)])
def test_parse_memory(text: str, mib: int) -> None:
    assert parse_memory(text) == mib


@pytest.mark.parametrize(("text", "why"), [
    ("12Q", "invalid size"), ("0", "between"), ("63M", "between"), ("2T", "between"),
    ("1000K", "whole number of MiB"), ("100B", "whole number of MiB")])
def test_parse_memory_rejects(text: str, why: str) -> None:
    with pytest.raises(InvalidInput, match=why):
        parse_memory(text)


def test_new_mac_is_local_unicast_and_random() -> None:
    macs = {new_mac() for _ in range(50)}
    assert len(macs) == 50
    for mac in macs:
        parts = mac.split(":")
        assert len(parts) == 6 and all(len(p) == 2 for p in parts)
        assert mac.startswith("52:54:")
        first = int(parts[0], 16)
        assert first & 0x02 and not first & 0x01  # locally administered, unicast


# -- VMSpec validation and JSON ----------------------------------------------
@pytest.mark.parametrize(("changes", "why"), [
    ({"name": "a b"}, "invalid VM name"), ({"memory_mib": 10}, "invalid memory"),
    ({"cpus": 0}, "cpu count"), ({"cpus": 65}, "cpu count"), ({"accel": "auto"}, "auto"),
    ({"kernel": None}, "kernel or a disk")])
def test_spec_validation(changes: dict[str, object], why: str) -> None:
    with pytest.raises(InvalidInput, match=why):
        make_spec(**changes)


def test_spec_with_disk_needs_no_kernel() -> None:
    s = make_spec(kernel=None, initrd=None, disks=(DiskSpec("/d.qcow2"),))
    assert s.kernel is None


def test_spec_json_round_trip() -> None:
    s = make_spec(cpus=2, disks=(DiskSpec("/a.qcow2"), DiskSpec("/b.raw", "raw", True)),
                  net=NetSpec(mac="52:54:00:12:34:56", ports=((2222, 22), (8080, 80))),
                  memory=MemorySpec(path="/m/x,y.mem", share=False, readonly=True))
    text = s.to_json()
    assert json.loads(text)["net"]["ports"] == [[2222, 22], [8080, 80]]
    back = VMSpec.from_json(text)
    assert back == s
    assert isinstance(back.disks, tuple) and isinstance(back.net, NetSpec)
    assert back.net.ports == ((2222, 22), (8080, 80))
    assert VMSpec.from_json(back.to_json()) == s


def test_spec_json_round_trip_minimal() -> None:
    s = make_spec(memory=MemorySpec(backend="memfd"))
    assert VMSpec.from_json(s.to_json()) == s


def test_spec_with_keeps_original() -> None:
    s = make_spec()
    t = s.with_(memory_mib=512)
    assert (s.memory_mib, t.memory_mib) == (256, 512)
    assert t.vmgenid == s.vmgenid


def test_each_spec_gets_a_new_vmgenid() -> None:
    a = VMSpec(name="a", memory_mib=64, memory=MemorySpec(path="/m"), kernel="/k")
    b = VMSpec(name="a", memory_mib=64, memory=MemorySpec(path="/m"), kernel="/k")
    assert a.vmgenid != b.vmgenid


# -- memory backends -----------------------------------------------------------
def test_memory_file_shared() -> None:
    argv = build_argv(make_spec(), PATHS)
    assert opt(argv, "-object") == [
        "memory-backend-file,id=mem0,size=256M,mem-path=/dev/shm/vmfork/web1.mem,share=on"]
    assert opt(argv, "-m") == ["256M"]
    assert opt(argv, "-machine") == ["q35,memory-backend=mem0,aux-ram-share=on"]


def test_memory_file_private() -> None:
    argv = build_argv(make_spec(memory=MemorySpec(path="/m/t.mem", share=False)), PATHS)
    (obj,) = opt(argv, "-object")
    assert obj.split(",")[-1] == "share=off"
    assert "readonly" not in obj


def test_memory_file_readonly_copy_on_write() -> None:
    argv = build_argv(make_spec(memory=MemorySpec(path="/m/t.mem", share=False,
                                                  readonly=True)), PATHS)
    (obj,) = opt(argv, "-object")
    assert obj.split(",")[4:] == ["share=off", "readonly=on", "rom=off"]


def test_memory_memfd() -> None:
    argv = build_argv(make_spec(memory=MemorySpec(backend="memfd")), PATHS)
    assert opt(argv, "-object") == ["memory-backend-memfd,id=mem0,size=256M,share=on"]


def test_memory_file_needs_path() -> None:
    with pytest.raises(InvalidInput, match="needs a path"):
        build_argv(make_spec(memory=MemorySpec(path=None)), PATHS)


def test_aux_ram_share_off() -> None:
    argv = build_argv(make_spec(aux_ram_share=False), PATHS)
    assert opt(argv, "-machine") == ["q35,memory-backend=mem0"]


def test_hpet_off_and_specs_stored_without_it() -> None:
    spec = make_spec(hpet=False)
    assert opt(build_argv(spec, PATHS), "-machine") == [
        "q35,memory-backend=mem0,aux-ram-share=on,hpet=off"]
    assert VMSpec.from_json(spec.to_json()) == spec
    # A spec stored before the field (a template's) keeps QEMU's HPET: its
    # device state has one.
    d = json.loads(spec.to_json())
    del d["hpet"]
    assert VMSpec.from_dict(d).hpet is True
    with pytest.raises(InvalidInput, match="hpet"):
        make_spec(hpet="no")


# -- the rest of the command line ------------------------------------------------
def test_argv_basics() -> None:
    argv = build_argv(make_spec(), PATHS)
    assert argv[0] == "qemu-system-x86_64"
    assert opt(argv, "-name") == ["web1,debug-threads=on"]
    for flag in ("-nodefaults", "-no-user-config", "-nographic", "-S"):
        assert flag in argv
    assert opt(argv, "-accel") == ["tcg,tb-size=64"]
    assert opt(argv, "-cpu") == [DEFAULT_CPU]
    assert opt(argv, "-smp") == ["1"]
    assert opt(argv, "-kernel") == ["/img/vmlinuz"]
    assert opt(argv, "-initrd") == ["/img/initrd.cpio"]
    assert opt(argv, "-append") == ["console=ttyS0"]
    assert opt(argv, "-qmp") == ["unix:/run/v/qmp.sock,server=on,wait=off"]
    assert opt(argv, "-serial") == ["chardev:serial0"]
    assert "-incoming" not in argv
    assert "-netdev" not in argv and "-blockdev" not in argv
    # No announce after a load (a virtio-net guest could deadlock, see spec).
    assert opt(argv, "-global") == ["migration.announce-rounds=0"]


def test_argv_console_and_agent_chardevs() -> None:
    chardevs = opt(build_argv(make_spec(), PATHS), "-chardev")
    # The serial console goes to its socket and to a bounded ring buffer
    # through a hub; QEMU writes no log file of its own (it would be unbounded).
    assert "socket,id=con0,path=/run/v/console.sock,server=on,wait=off" in chardevs
    assert f"ringbuf,id=log0,size={CONSOLE_RING}" in chardevs
    assert "hub,id=serial0,chardevs.0=log0,chardevs.1=con0" in chardevs
    assert not any("logfile" in c for c in chardevs)
    assert CONSOLE_RING & (CONSOLE_RING - 1) == 0  # QEMU wants a power of two
    assert "socket,id=agent0,path=/run/v/agent.sock,server=on,wait=off" in chardevs


def test_argv_vmgenid() -> None:
    devices = opt(build_argv(make_spec(), PATHS), "-device")
    assert "vmgenid,id=vmgenid0,guid=11111111-2222-3333-4444-555555555555" in devices
    assert "virtconsole,chardev=agent0,id=agent0port" in devices


def test_argv_kvm_uses_host_cpu() -> None:
    argv = build_argv(make_spec(accel="kvm", cpus=4), PATHS)
    assert opt(argv, "-accel") == ["kvm"]
    assert opt(argv, "-cpu") == ["host"]
    assert opt(argv, "-smp") == ["4"]


def test_argv_no_initrd_no_append() -> None:
    argv = build_argv(make_spec(initrd=None, append=""), PATHS)
    assert "-initrd" not in argv and "-append" not in argv


def test_argv_running_and_incoming() -> None:
    argv = build_argv(make_spec(), PATHS, incoming=("defer", '{"channel-type":"cpr"}'),
                      start_paused=False)
    assert "-S" not in argv
    assert opt(argv, "-incoming") == ["defer", '{"channel-type":"cpr"}']


def test_argv_disks() -> None:
    spec = make_spec(disks=(DiskSpec("/img/root.qcow2"), DiskSpec("/img/data.raw", "raw",
                                                                   readonly=True)))
    argv = build_argv(spec, PATHS)
    assert opt(argv, "-blockdev") == [
        "driver=file,filename=/img/root.qcow2,node-name=file0",
        "driver=qcow2,file=file0,node-name=disk0",
        "driver=file,filename=/img/data.raw,node-name=file1,read-only=on",
        "driver=raw,file=file1,node-name=disk1,read-only=on"]
    devices = opt(argv, "-device")
    assert "virtio-blk-pci,drive=disk0,id=vblk0" in devices
    assert "virtio-blk-pci,drive=disk1,id=vblk1" in devices


def test_argv_net_with_port_forwards() -> None:
    spec = make_spec(net=NetSpec(mac="52:54:00:aa:bb:cc", ports=((2222, 22), (8080, 80))))
    argv = build_argv(spec, PATHS)
    assert opt(argv, "-netdev") == [
        "user,id=net0,hostfwd=tcp:127.0.0.1:2222-:22,hostfwd=tcp:127.0.0.1:8080-:80"]
    assert "virtio-net-pci,netdev=net0,mac=52:54:00:aa:bb:cc,id=nic0" in opt(argv, "-device")


def test_argv_net_without_ports() -> None:
    argv = build_argv(make_spec(net=NetSpec(mac="52:54:00:aa:bb:cc")), PATHS)
    assert opt(argv, "-netdev") == ["user,id=net0"]


def test_argv_escapes_commas_in_paths() -> None:
    paths = RunPaths(qmp="/h,1/qmp.sock", console="/h,1/con.sock",
                     console_log="/h,1/con.log", agent="/h,1/agent.sock")
    spec = make_spec(memory=MemorySpec(path="/m,x/a.mem"), disks=(DiskSpec("/d,1.qcow2"),))
    argv = build_argv(spec, paths)
    assert "mem-path=/m,,x/a.mem" in opt(argv, "-object")[0]
    assert opt(argv, "-qmp") == ["unix:/h,,1/qmp.sock,server=on,wait=off"]
    chardevs = " ".join(opt(argv, "-chardev"))
    assert "path=/h,,1/con.sock" in chardevs
    assert "path=/h,,1/agent.sock" in chardevs
    assert opt(argv, "-blockdev")[0].startswith("driver=file,filename=/d,,1.qcow2,")
    # -kernel takes a plain file name, not an option list: no escaping there.
    argv = build_argv(make_spec(kernel="/k,1/vmlinuz"), PATHS)
    assert opt(argv, "-kernel") == ["/k,1/vmlinuz"]


def test_parse_memory_list() -> None:
    from vmfork.spec import parse_memory_list
    assert parse_memory_list("256M, 1G,4G") == (256, 1024, 4096)
    for bad in ("", " , ", "256M,12Q"):
        with pytest.raises(InvalidInput):
            parse_memory_list(bad)


# -- hostile values: validated when a spec is made, escaped in the argv -------------
def spec_dict(**changes: object) -> dict[str, object]:
    d: dict[str, object] = json.loads(make_spec(
        net=NetSpec(mac="52:54:00:12:34:56", ports=((2222, 22),))).to_json())
    d.update(changes)
    return d


INJECTED_MAC = "52:54:00:00:00:01,romfile=/etc/passwd"
INJECTED_PORT = "22,guestfwd=tcp:10.0.2.100:1-cmd:touch /tmp/x"


@pytest.mark.parametrize(("net", "why"), [
    ({"mac": INJECTED_MAC, "ports": []}, "invalid MAC address"),
    ({"mac": "52:54:00:12:34", "ports": []}, "invalid MAC address"),
    ({"mac": "53:54:00:12:34:56", "ports": []}, "multicast"),
    ({"mac": "52:54:00:12:34:56", "ports": [[INJECTED_PORT, 22]]}, "invalid port"),
    ({"mac": "52:54:00:12:34:56", "ports": [[2222, INJECTED_PORT]]}, "invalid port"),
    ({"mac": "52:54:00:12:34:56", "ports": [[2222, 0]]}, "must be 1-65535"),
    ({"mac": "52:54:00:12:34:56", "ports": [[65536, 22]]}, "must be 1-65535"),
    ({"mac": "52:54:00:12:34:56", "ports": [[True, 22]]}, "invalid port"),
    ({"mac": "52:54:00:12:34:56", "ports": [[2222.0, 22]]}, "invalid port"),
    ({"mac": "52:54:00:12:34:56", "ports": [[1, 2, 3]]}, "invalid port forward"),
    ({"mac": "52:54:00:12:34:56", "ports": [[p, 22] for p in range(1, 100)]}, "port forwards"),
    ({"mac": "52:54:00:12:34:56", "ports": [], "script": "/x"}, "unknown key 'script'"),
])
def test_spec_refuses_hostile_net(net: dict[str, object], why: str) -> None:
    with pytest.raises(InvalidInput, match=why):
        VMSpec.from_dict(spec_dict(net=net))


@pytest.mark.parametrize(("changes", "why"), [
    ({"machine": "q35,accel=kvm"}, "invalid machine type"),
    ({"machine": "pc-q35-10.0,,x"}, "invalid machine type"),
    ({"cpu": "qemu64,+rdrand,romfile=/etc/passwd"}, "invalid CPU model"),
    ({"cpu": "qemu64 -x"}, "invalid CPU model"),
    ({"vmgenid": "11111111-2222-3333-4444-555555555555,romfile=/x"}, "generation ID"),
    ({"append": "console=ttyS0\n-x"}, "control characters"),
    ({"append": "x" * 5000}, "longer than 4096"),
    ({"kernel": "/k\x00"}, "control characters"),
    ({"kernel": ["/k"]}, "wrong type"),
    ({"cpus": "2"}, "wrong type"), ({"cpus": True}, "wrong type"),
    ({"memory_mib": 256.5}, "wrong type"), ({"qga": 1}, "wrong type"),
    ({"accel": "kvm,x=y"}, "invalid accelerator"),
    ({"qemu": ""}, "QEMU binary"), ({"name": 7}, "wrong type"),
    ({"disks": [{"path": "/d", "format": "qcow2,file.filename=/etc/shadow"}]}, "disk format"),
    ({"disks": "abc"}, "disk list"),
    ({"memory": {"backend": "file", "path": "/m", "share": "on"}}, "wrong type"),
    ({"memory": {"backend": "file", "path": "/m", "extra": 1}}, "unknown key"),
    ({"evil": 1}, "unknown key 'evil'"),
])
def test_spec_refuses_hostile_fields(changes: dict[str, object], why: str) -> None:
    with pytest.raises(InvalidInput, match=why):
        VMSpec.from_dict(spec_dict(**changes))


def test_spec_refuses_missing_fields() -> None:
    d = spec_dict()
    del d["memory_mib"]
    with pytest.raises(InvalidInput, match="'memory_mib' is missing"):
        VMSpec.from_dict(d)
    with pytest.raises(InvalidInput, match="not an object"):
        VMSpec.from_dict([])  # type: ignore[arg-type]


def test_spec_checks_values_from_every_source() -> None:
    """The checks are in the dataclasses, not only in from_dict: the CLI, the
    API and with_() go through them too."""
    with pytest.raises(InvalidInput, match="invalid MAC address"):
        NetSpec(mac=INJECTED_MAC)
    with pytest.raises(InvalidInput, match="invalid port"):
        NetSpec(mac="52:54:00:12:34:56", ports=((INJECTED_PORT, 22),))  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match="invalid machine type"):
        make_spec().with_(machine="q35,kernel-irqchip=off")
    with pytest.raises(InvalidInput, match="disk format"):
        DiskSpec("/d", "qcow2,x=y")


def test_spec_accepts_usual_values() -> None:
    s = make_spec(machine="pc-q35-10.0", cpu="Skylake-Client-v4,+rdrand,-hle,level=13",
                  net=NetSpec(mac="52:54:AB:cd:00:01", ports=((1, 65535),)))
    assert VMSpec.from_json(s.to_json()) == s


def test_argv_escapes_every_option_value() -> None:
    """Even a value that got past the checks (here forced in) cannot add an
    option: it is escaped where the argv is built."""
    spec = make_spec(net=NetSpec(mac="52:54:00:aa:bb:cc"), disks=(DiskSpec("/d"),))
    for obj, attr, value in ((spec, "machine", "q35,x=1"), (spec, "vmgenid", "u,x=2"),
                             (spec, "name", "n,x=3"), (spec.net, "mac", INJECTED_MAC),
                             (spec.disks[0], "format", "raw,x=4")):
        object.__setattr__(obj, attr, value)
    argv = build_argv(spec, PATHS)
    assert opt(argv, "-machine")[0].startswith("q35,,x=1,memory-backend=mem0")
    assert "vmgenid,id=vmgenid0,guid=u,,x=2" in opt(argv, "-device")
    assert opt(argv, "-name") == ["n,,x=3,debug-threads=on"]
    assert ("virtio-net-pci,netdev=net0,mac=52:54:00:00:00:01,,romfile=/etc/passwd,id=nic0"
            in opt(argv, "-device"))
    assert "driver=raw,,x=4,file=file0,node-name=disk0" in opt(argv, "-blockdev")
    object.__setattr__(spec.net, "ports", ((INJECTED_PORT, 22),))
    with pytest.raises(InvalidInput, match="invalid port"):
        build_argv(spec, PATHS)


# -- readiness ------------------------------------------------------------------------
@pytest.mark.parametrize(("text", "kind", "pattern", "port"), [
    ("auto", "auto", "", 0), ("qga", "qga", "", 0), ("none", "none", "", 0),
    ("console:login: $", "console", "login: $", 0), ("console:a:b", "console", "a:b", 0),
    ("tcp:22", "tcp", "", 22),
])
def test_readiness_parses_and_prints_back(text: str, kind: str, pattern: str,
                                          port: int) -> None:
    r = parse_ready(text)
    assert (r.kind, r.pattern, r.port) == (kind, pattern, port)
    assert str(r) == text


@pytest.mark.parametrize(("text", "needle"), [
    ("", "use auto, qga"), ("marker", "use auto, qga"), ("auto:x", "takes no argument"),
    ("console:", "use auto, qga"), ("console:(", "bad regular expression"),
    ("tcp:http", "must be a number"), ("tcp:0", "must be 1-65535"),
    ("tcp:70000", "must be 1-65535"), ("console:" + "a" * 300, "longer than"),
    ("console:a\nb", "control characters"), (3, "wrong type"),
])
def test_bad_readiness_is_refused(text: object, needle: str) -> None:
    with pytest.raises(InvalidInput, match=needle):
        parse_ready(text)


def test_spec_keeps_its_readiness() -> None:
    spec = make_spec(ready="console:ready")
    assert VMSpec.from_json(spec.to_json()).ready == "console:ready"
    with pytest.raises(InvalidInput, match="readiness"):
        make_spec(ready="sometime")
