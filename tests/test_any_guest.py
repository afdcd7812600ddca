"""Guests vmfork did not build: a systemd Debian with qemu-guest-agent (booted
with the host's kernel, or through its own bootloader) and a busybox initrd
with no agent at all. None has vmfork's agent or boot marker; everything
is driven through the CLI as a user would."""

from __future__ import annotations

import json
import secrets
import urllib.request
from typing import Any

import pytest

from vmfork import ports, vm
from vmfork.images.debian import DiskImage
from vmfork.images.demo import GuestImage

from .conftest import Env, run
from .foreign_images import BUSYBOX_APPEND, BUSYBOX_HTTP_PORT, BUSYBOX_READY_RE, PLAIN_APPEND

RESEED = "crng reseeded due to virtual machine fork"


def as_json(env: Env, *args: str) -> Any:
    return json.loads(env.cli(*args, "--json", check=True, timeout=400).stdout)


def sh(env: Env, name: str, command: str) -> str:
    p = env.cli("exec", name, "--", command, timeout=120)
    assert p.returncode == 0, f"{command!r} in {name}: {p.returncode} {p.stderr}"
    return p.stdout


def nic_mac(env: Env, name: str) -> str:
    """The MAC of the guest's one NIC, as the guest sees it."""
    return sh(env, name, "for d in /sys/class/net/*; do if [ -e $d/device ]; then "
                         "cat $d/address; fi; done").strip()


@pytest.mark.slow
@pytest.mark.debian
def test_debian_with_qemu_guest_agent_end_to_end(env: Env, plain_debian: DiskImage) -> None:
    img = plain_debian
    st = as_json(env, "run", "deb", "--kernel", img.kernel, "--initrd", str(img.initrd),
                 "--append", PLAIN_APPEND, "--disk", img.disk, "--memory", "1G",
                 "--net", "user", "--persistent")
    # Ready when its qemu-guest-agent answered, with no readiness flag.
    assert (st["ready"], st["agent"]) == ("auto", "qga")
    assert "Debian" in (st["os"] or "")
    p = env.cli("exec", "deb", "--", "echo out; echo err >&2; exit 3")
    assert (p.returncode, p.stdout, p.stderr) == (3, "out\n", "err\n")
    token = secrets.token_hex(8)
    sh(env, "deb", f"echo {token} > /root/before && sync")

    # Update and save/restore keep RAM and disk.
    env.cli("update", "deb", check=True, timeout=300)
    assert sh(env, "deb", "cat /root/before").strip() == token
    env.cli("save", "deb", check=True, timeout=300)
    env.cli("restore", "deb", check=True, timeout=300)
    assert sh(env, "deb", "cat /root/before").strip() == token
    template_id = sh(env, "deb", "cat /etc/machine-id").strip()

    # Template and two clones, each a machine of its own.
    tpl = as_json(env, "template", "create", "tdeb", "--from", "deb")
    assert tpl["frozen"] and tpl["agent"] == "qga"
    clones = as_json(env, "clone", "tdeb", "-n", "2")
    seen = {}
    for c in clones:
        name = c["name"]
        assert c["identity"] == {"rng": "vmgenid", "hostname": "set", "machine_id": "set",
                                 "mac": "set", "clock": "set"}, c
        rec = env.store().get_vm(name)
        assert rec.spec.net is not None
        assert nic_mac(env, name) == rec.spec.net.mac
        assert sh(env, name, "hostname").strip() == name
        assert sh(env, name, "cat /root/before").strip() == token
        assert int(sh(env, name, f"dmesg | grep -c '{RESEED}' || true")) >= 1
        seen[name] = sh(env, name, "cat /etc/machine-id").strip()
    assert len(set(seen.values()) | {template_id}) == 3
    first, second = (c["name"] for c in clones)
    sh(env, first, "echo mine > /root/only-here && sync")
    assert sh(env, second, "test -e /root/only-here && echo yes || echo no").strip() == "no"
    env.cli("template", "rm", "tdeb", "--force", check=True)


@pytest.mark.slow
@pytest.mark.debian
def test_debian_boots_through_its_own_bootloader(env: Env, bootable_debian: str) -> None:
    st = as_json(env, "run", "boot", "--disk", bootable_debian, "--memory", "1G",
                 "--net", "user")
    assert (st["ready"], st["agent"]) == ("auto", "qga")
    cmdline = sh(env, "boot", "cat /proc/cmdline")
    assert "root=/dev/vda1" in cmdline and "BOOT_IMAGE" in cmdline, cmdline  # from extlinux
    env.cli("stop", "boot", check=True)


def http(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=20) as r:
        return str(r.read().decode())


@pytest.mark.slow
@pytest.mark.qemu
def test_busybox_guest_with_no_agent(env: Env, busybox_initrd: GuestImage) -> None:
    img = busybox_initrd
    port = ports.free_port()
    st = as_json(env, "run", "bb", "--kernel", img.kernel, "--initrd", str(img.initrd),
                 "--append", BUSYBOX_APPEND, "--ready", f"console:{BUSYBOX_READY_RE}",
                 "--port", f"{port}:{BUSYBOX_HTTP_PORT}")
    assert (st["ready"], st["agent"]) == (f"console:{BUSYBOX_READY_RE}", None)
    assert http(port) == "busybox guest\n"
    p = env.cli("exec", "bb", "true")
    assert p.returncode == 1 and p.stderr.count("\n") == 1
    assert "the guest has no agent" in p.stderr, p.stderr

    tpl = as_json(env, "template", "create", "tbb", "--from", "bb")
    assert tpl["agent"] == "none" and not tpl["frozen"]
    p = env.cli("clone", "tbb", "-n", "2", "--json", timeout=300)
    assert p.returncode == 0, p.stderr
    clones = json.loads(p.stdout)
    assert "hostname, machine-id, mac, clock not set (no guest agent)" in p.stderr
    s = env.store()
    for c in clones:
        assert c["identity"]["hostname"] == "skipped: no guest agent"
        assert c["identity"]["rng"] == "vmgenid"
        ((host, guest),) = c["ports"]
        assert guest == BUSYBOX_HTTP_PORT and host != port
        assert http(host) == "busybox guest\n"  # the clone runs and serves
        run(vm.drain_console(s, c["name"]))
        log = (env.home / "run" / c["name"] / "console.log").read_text(errors="replace")
        assert RESEED in log  # its kernel saw the new VM generation ID
    p = env.cli("exec", clones[0]["name"], "true")
    assert p.returncode == 1 and "the guest has no agent" in p.stderr
    env.cli("template", "rm", "tbb", "--force", check=True)
