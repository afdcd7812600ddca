"""Guest RAM is moved, never changed: byte-for-byte checks of guest physical
memory (QMP ``pmemsave`` of a paused guest) across every kind of move.

These checks do not go through a guest agent, so they tell a transport
problem (an answer mangled on its way out of the guest) from a real change of
guest memory. The other suites check the same moves on running guests with
md5 sums taken inside the guest.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from vmfork import vm
from vmfork.snapshots import save as saving
from vmfork.templates import catalog, clone, create
from vmfork.update import live

from .conftest import Env, run

pytestmark = pytest.mark.qemu

MIB = 256


async def _dump(env: Env, name: str, path: Path) -> str:
    """Write the whole guest RAM of paused VM *name* to *path*; return its sha256."""
    async with vm.attached(env.store(), name) as (_, m):
        assert await m.status() in ("paused", "postmigrate", "prelaunch")
        await m.qmp("pmemsave", {"val": 0, "size": MIB << 20, "filename": str(path)})
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _differing_pages(a: Path, b: Path) -> list[int]:
    x, y = a.read_bytes(), b.read_bytes()
    assert len(x) == len(y) == MIB << 20
    return [i for i in range(0, len(x), 4096) if x[i:i + 4096] != y[i:i + 4096]]


def test_update_modes_move_a_clones_ram_unchanged(env: Env, tmp_path: Path) -> None:
    """A paused clone (private RAM) is moved by copy, then ignore-shared, then
    cpr-transfer: guest RAM is the same, byte for byte, after each move."""
    s = env.store()
    run(vm.run(s, vm.RunOptions(name="src", memory_mib=MIB, demo=True, accel="tcg")))
    env.exec("src", "head -c 8388608 /dev/urandom > /root/data")
    run(create.create_from_vm(s, "t", "src"))
    run(clone.clone(s, "t", ["c"]))
    run(vm.pause(s, "c"))
    before = tmp_path / "before.ram"
    digest = run(_dump(env, "c", before))
    for mode in ("copy", "ignore-shared", "cpr-transfer"):
        rep = run(live.update(s, "c", mode=mode))
        assert rep.mode == mode
        after = tmp_path / f"{mode}.ram"
        if run(_dump(env, "c", after)) != digest:
            pages = _differing_pages(before, after)
            pytest.fail(f"{mode} update changed {len(pages)} pages of guest RAM, first at "
                        f"{[hex(p) for p in pages[:5]]}")
        after.unlink()
    assert run(vm.status(s, "c")) == "paused"
    run(vm.stop(s, "c"))
    run(catalog.remove(s, "t"))


def test_save_restore_keeps_ram_unchanged(env: Env, tmp_path: Path) -> None:
    """A paused persistent VM saved and restored has the same guest RAM."""
    s = env.store()
    run(vm.run(s, vm.RunOptions(name="p", memory_mib=MIB, demo=True, accel="tcg",
                                persistent=True)))
    env.exec("p", "head -c 8388608 /dev/urandom > /root/data")
    run(vm.pause(s, "p"))
    before = tmp_path / "before.ram"
    digest = run(_dump(env, "p", before))
    run(saving.save(s, "p"))
    assert s.get_vm("p").state == "saved"
    run(saving.restore(s, "p", sync_clock=False))
    after = tmp_path / "after.ram"
    if run(_dump(env, "p", after)) != digest:
        pages = _differing_pages(before, after)
        pytest.fail(f"save/restore changed {len(pages)} pages of guest RAM")
    run(vm.stop(s, "p"))
