"""Live fork of a disk-backed guest on real QEMU: the plain Debian guest
(systemd, qemu-guest-agent, its root file system on a virtio disk).

What was written and synced on disk before the fork is in every child;
what the parent or a child writes afterwards stays in that VM. No disk
data is copied: each VM writes to a small qcow2 overlay of its own over
one frozen layer (the parent's disk at the fork), as ``qemu-img info
--backing-chain`` shows. The parent keeps its identity, each child gets
its own, and removing them frees everything.
"""

from __future__ import annotations

import secrets
import time

import pytest

from vmfork import vm
from vmfork.images.debian import DiskImage

from .conftest import Env, run
from .foreign_images import PLAIN_APPEND
from .test_fork import assert_home_empty, backing_chain, do_fork, identity, orphans, stop

MIB = 1024 * 1024
#: 20 MiB written to the guest's disk and synced before the fork.
BIG = ("head -c 20971520 /dev/urandom > /root/big && md5sum /root/big | cut -d' ' -f1 "
       "> /root/big.md5 && sync")
#: Read from the disk, not from the page cache the guest's RAM carried over.
DROP_CACHES = "sync && echo 3 > /proc/sys/vm/drop_caches"


def on_disk(env: Env, name: str, path: str) -> bool:
    out = env.exec(name, f"{DROP_CACHES} && if [ -e {path} ]; then echo yes; else echo no; fi")
    return out.strip() == "yes"


@pytest.mark.slow
@pytest.mark.debian
def test_fork_of_a_debian_guest_shares_its_disk_without_copying(
        env: Env, plain_debian: DiskImage) -> None:
    img = plain_debian
    run(vm.run(env.store(), vm.RunOptions(
        name="deb", kernel=img.kernel, initrd=str(img.initrd), append=PLAIN_APPEND,
        disks=(img.disk,), memory_mib=512, net="user", accel="tcg")))
    token = secrets.token_hex(8)
    env.exec("deb", f"echo {token} > /root/before && {BIG}")
    # qemu-guest-agent answers before udev has loaded virtio-net: the MAC
    # appears in the guest a moment after the VM is ready.
    end = time.monotonic() + 60
    while not (before := identity(env, "deb")).mac:
        assert time.monotonic() < end, "the Debian guest never showed its NIC"
        time.sleep(0.5)

    do_fork(env, "deb", ["d1", "d2"])
    vms = ("deb", "d1", "d2")

    # The disks: one small overlay per VM over one frozen layer, itself over
    # the image.
    s = env.store()
    chains = {n: backing_chain(s.get_vm(n).spec.disks[0].path) for n in vms}
    assert len({chains[n][0]["filename"] for n in vms}) == 3
    frozen = {chains[n][0].get("full-backing-filename") for n in vms}
    assert len(frozen) == 1 and None not in frozen, chains
    for n in vms:
        assert chains[n][-1]["filename"] == img.disk, chains[n]
        # The 20 MiB file written before the fork is not in the VM's overlay.
        assert chains[n][0]["actual-size"] < 8 * MIB, (n, chains[n][0]["actual-size"])

    # Written and synced before: everywhere, read back from the disk.
    for n in vms:
        assert env.exec(n, f"{DROP_CACHES} && cat /root/before").strip() == token, n
        assert env.exec(n, "md5sum /root/big | cut -d' ' -f1") == \
            env.exec(n, "cat /root/big.md5"), n

    # Written afterwards: only in the VM that wrote it.
    for n in vms:
        env.exec(n, f"echo {n} > /root/after-{n} && sync")
    for n in vms:
        for other in vms:
            assert on_disk(env, n, f"/root/after-{other}") == (n == other), (n, other)

    # Identity: the parent's unchanged, the children's their own.
    assert identity(env, "deb") == before
    kids = [identity(env, n) for n in ("d1", "d2")]
    assert [k.hostname for k in kids] == ["d1", "d2"]
    assert before.reseeds == 0 and all(k.reseeds >= 1 for k in kids)
    for attr in ("machine_id", "mac", "vmgenid"):
        values = [getattr(before, attr)] + [getattr(k, attr) for k in kids]
        assert len(set(values)) == 3, f"{attr}: {values}"

    assert not orphans(env)
    stop(env, "deb", "d1", "d2")
    assert_home_empty(env)
