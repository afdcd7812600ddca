"""Host port forwards across a live update: they move to the new QEMU at the
switch-over (while the guest is paused), and an update killed anywhere —
also between a port's release by the old QEMU and its taking by the new
one — leaves them on whichever QEMU keeps the guest."""

from __future__ import annotations

import pytest

from vmfork import ports, vm

from .conftest import Env, run
from .test_admission import http_get, owner_of_listening_port
from .test_snapshot import kill9_at
from .test_update_recovery import killed_update

pytestmark = pytest.mark.qemu


def serve(env: Env, name: str) -> int:
    """Run VM *name* with an HTTP server behind a fresh host port; return the port."""
    port = ports.free_port()
    run(vm.run(env.store(), vm.RunOptions(name=name, demo=True, accel="tcg",
                                          ports=((port, 80),))))
    env.exec(name, f"mkdir -p /www && echo {name} > /www/index.html && httpd -h /www -p 80")
    return port


def served_by_vm(env: Env, name: str, port: int) -> None:
    """The VM's QEMU listens on *port* and the guest answers through it."""
    rec = env.store().get_vm(name)
    assert rec.state == "running" and owner_of_listening_port(port) == rec.pid
    assert http_get(f"http://127.0.0.1:{port}/").strip() == name


@pytest.mark.parametrize("mode", ["ignore-shared", "cpr-transfer"])
def test_forwards_move_with_the_guest(env: Env, mode: str) -> None:
    port = serve(env, "a")
    old = env.store().get_vm("a").pid
    p = env.cli("update", "a", "--mode", mode, "--json", check=True)
    assert '"warnings": []' in p.stdout, p.stdout
    assert env.store().get_vm("a").pid != old
    served_by_vm(env, "a", port)


def test_killed_update_leaves_forwards_where_the_guest_is(env: Env) -> None:
    port = serve(env, "a")
    # Killed with the port released by the old QEMU, not yet taken by the
    # new one: the next command completes the update and the new QEMU
    # takes the port.
    kill9_at(env, "update.port-released", "update", "a", "--mode", "ignore-shared")
    assert owner_of_listening_port(port) is None
    env.cli("exec", "a", "true", check=True)
    served_by_vm(env, "a", port)
    # Killed before the switch-over with the new QEMU up: rolled back, the
    # old QEMU keeps the port throughout.
    killed_update(env, "launched", "ignore-shared")
    assert owner_of_listening_port(port) == env.store().get_vm("a").pid
    env.cli("exec", "a", "true", check=True)
    served_by_vm(env, "a", port)
    # Killed with the state loaded in the new QEMU, before the hand-over:
    # completed, and the port follows the guest.
    killed_update(env, "migrated", "ignore-shared")
    env.cli("exec", "a", "true", check=True)
    served_by_vm(env, "a", port)
    run(vm.stop(env.store(), "a"))
