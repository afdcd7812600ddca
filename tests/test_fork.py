"""Live fork on real QEMU (demo guest, TCG): what the children start from,
what they and the parent become, and what a failed or interrupted fork and
every order of removal leave behind.

- **One instant** (module fixture ``family``): a parent with a scratch disk
  runs a loop that counts, writing each number to the disk (synced, read
  back with O_DIRECT) and to a file in RAM, and checks at every turn that
  the disk holds what its RAM holds. It is forked into two children while
  it counts: every VM's loop finds disk and RAM in step across the fork,
  the frozen disk layer holds a number the parent reached between the fork
  request and its return, and the three loops go on independently. The
  20 MB written in RAM before the fork have one md5 everywhere. The parent
  keeps its MAC, hostname, machine-id and VM generation ID and logs no RNG
  reseed; each child has its own and logs one.
- **Any VM, any number of times**: five forks in a row of one parent (each
  child holds the parent's data as of its own fork), a tree of depth 3
  (parent, child, grandchild, great-grandchild), a fork of a clone.
- **Failure half-way**: a child's QEMU killed during the fork, the memory
  directory full, vmfork killed (SIGKILL) at each ``fork.*`` checkpoint and
  the next command run: the parent runs on with its data and identity, and
  nothing is left that no VM uses.
- **Removal in any order** (parent first, children first, a middle VM of the
  tree first, ``template rm --force`` of the parent's own template): at the
  end the home holds no VM, template (internal fork bases included), memory
  file, socket or QEMU process.

The disk-backed Debian guest is forked in tests/test_fork_disks.py.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest

import vmfork
from vmfork import vm
from vmfork.checkpoints import STALL_ENV
from vmfork.errors import VmforkError
from vmfork.fork.run import fork
from vmfork.images.demo import demo_image
from vmfork.results import ForkReport
from vmfork.store import Store
from vmfork.templates import catalog, clone, create

from .conftest import Env, module_env, qemu_processes, run
from .test_admission import fill, mounted

MIB = 1024 * 1024
RESEED = "crng reseeded due to virtual machine fork"
#: 20 MiB of random data in the guest's RAM (its root file system is an
#: initramfs), with its md5 beside it.
DATA = ("head -c 20971520 /dev/urandom > /root/data && md5sum /root/data | cut -d' ' -f1 "
        "> /root/data.md5")
SCRATCH_BYTES = 1 << 20
#: The sequence loop: counts; writes each number to sector 0 of the scratch
#: disk (O_DIRECT, synced) and then to /tmp/seq (RAM); before each step it
#: reads the disk back (O_DIRECT: from the VM's disk, not the guest's page
#: cache) and notes in /tmp/mismatch any turn where the disk does not hold
#: the number its RAM holds. /tmp/stop ends it after a whole turn; it writes
#: its last number to /tmp/stopped.
SEQ_LOOP = r"""
put() {
    printf '%s\n' "$1" | dd of=/dev/vda bs=512 count=1 conv=sync,fsync oflag=direct 2>/dev/null
}
get() { dd if=/dev/vda bs=512 count=1 iflag=direct 2>/dev/null | tr -d '\000' | head -n 1; }
n=0
put 0
echo 0 > /tmp/seq
while [ ! -e /tmp/stop ]; do
    d=$(get)
    [ "$d" = "$n" ] || echo "ram $n disk $d" >> /tmp/mismatch
    n=$((n + 1))
    put "$n"
    echo "$n" > /tmp/seq
done
echo "$n" > /tmp/stopped
"""
MAC_CMD = "for d in /sys/class/net/*; do [ ! -e $d/device ] || cat $d/address; done"
FORK_SOURCES = Path(__file__).resolve().parents[1] / "src" / "vmfork" / "fork"


# -- helpers ---------------------------------------------------------------------------
def fork_checkpoints() -> list[str]:
    """The ``fork.*`` steps at which a fork awaits a checkpoint, read from
    the sources of :mod:`vmfork.fork` (in the order they appear)."""
    steps: list[str] = []
    for src in sorted(FORK_SOURCES.glob("*.py")):
        for step in re.findall(r"""checkpoint\(\s*["'](fork\.[\w.-]+)["']""", src.read_text()):
            if step not in steps:
                steps.append(step)
    return steps


def do_fork(env: Env, name: str, names: list[str]) -> ForkReport:
    return run(fork(env.store(), name, names=names))


def boot(env: Env, name: str, *, net: bool = False, disk: bool = False,
         memory_mib: int = 256, memory_dir: Path | None = None) -> None:
    """Start a demo guest. With *disk* it gets a scratch disk (raw, 1 MiB)
    as /dev/vda: the demo image given as kernel and initrd, since ``--demo``
    takes no disk."""
    s = env.store()
    opts = vm.RunOptions(name=name, accel="tcg", memory_mib=memory_mib, demo=not disk,
                         net="user" if net else None,
                         memory_dir=str(memory_dir) if memory_dir else None)
    if disk:
        img = demo_image(s.images_dir)
        scratch = env.home / f"{name}-scratch.raw"
        with open(scratch, "wb") as f:
            f.truncate(SCRATCH_BYTES)
        opts = dataclasses.replace(opts, kernel=img.kernel, initrd=img.initrd,
                                   append=img.append, disks=(str(scratch),))
    run(vm.run(s, opts))


def md5_intact(env: Env, name: str) -> bool:
    now = env.exec(name, "md5sum /root/data | cut -d' ' -f1")
    return bool(now.strip()) and now == env.exec(name, "cat /root/data.md5")


async def _generation_id(store: Store, name: str) -> str:
    async with vm.attached(store, name) as (_rec, m):
        return str((await m.qmp("query-vm-generation-id"))["guid"])


@dataclass(frozen=True)
class Identity:
    """Who a guest is, as it and its QEMU say."""

    hostname: str
    machine_id: str
    mac: str
    vmgenid: str
    reseeds: int


def identity(env: Env, name: str) -> Identity:
    out = env.exec(name, f"cat /proc/sys/kernel/hostname /etc/machine-id; echo mac=$({MAC_CMD}); "
                         f"dmesg | grep -c '{RESEED}' || true").splitlines()
    hostname, machine_id, mac, reseeds = (x.strip() for x in out)
    return Identity(hostname, machine_id, mac.removeprefix("mac="),
                    run(_generation_id(env.store(), name)), int(reseeds))


def seq(env: Env, name: str) -> int:
    """*name*'s counter (-1 before its loop wrote one)."""
    return int(env.exec(name, "cat /tmp/seq 2>/dev/null || echo -1").strip())


def wait_seq_beyond(env: Env, name: str, value: int, timeout: float = 60) -> int:
    """Wait until *name*'s loop has counted past *value*; its number then."""
    deadline = time.monotonic() + timeout
    while True:
        now = seq(env, name)
        if now > value:
            return now
        assert time.monotonic() < deadline, f"{name}: the counter stays at {now}"
        time.sleep(0.2)


def stop_loop(env: Env, name: str, timeout: float = 60) -> tuple[int, int, int]:
    """End *name*'s loop after a whole turn; (last number, /tmp/seq, disk)."""
    env.exec(name, "touch /tmp/stop")
    deadline = time.monotonic() + timeout
    while env.exec(name, "cat /tmp/stopped 2>/dev/null || true").strip() == "":
        assert time.monotonic() < deadline, f"{name}: the loop did not stop"
        time.sleep(0.2)
    last, ram, disk = env.exec(name, "cat /tmp/stopped /tmp/seq; dd if=/dev/vda bs=512 count=1 "
                                     "iflag=direct 2>/dev/null | tr -d '\\000' | head -n 1"
                               ).split()
    return int(last), int(ram), int(disk)


def backing_chain(path: str) -> list[dict[str, Any]]:
    """``qemu-img info --backing-chain`` of an image in use (shared lock)."""
    p = subprocess.run(["qemu-img", "info", "-U", "--backing-chain", "--output=json", path],
                       capture_output=True, text=True, timeout=60, check=True)
    chain = json.loads(p.stdout)
    return chain if isinstance(chain, list) else [chain]


def disk_number(image: str, work: Path) -> int:
    """The number in sector 0 of qcow2 *image* (read through its chain)."""
    out = work / "sector.raw"
    subprocess.run(["qemu-img", "convert", "-U", "-f", "qcow2", "-O", "raw", image, str(out)],
                   capture_output=True, timeout=60, check=True)
    with open(out, "rb") as f:
        text = f.read(512).rstrip(b"\0").decode()
    out.unlink()
    return int(text.split()[0])


def orphans(env: Env) -> list[str]:
    """What the home holds that no VM uses: templates nobody uses, memory
    files no VM or template names, QEMU processes that are no VM's,
    sockets outside the run directories of the VMs (empty: all is well)."""
    s = env.store()
    vms = s.list_vms()
    found = []
    for name in s.template_names():
        if not (catalog.users(s, name) or s.pool_members(name)
                or catalog.children_of(s, name)):
            found.append(f"template {name} that no VM uses")
    known = {r.spec.memory.path for r in vms} | {t.memory_file for t in s.list_templates()}
    for d in {env.memory_dir, *(Path(p).parent for p in known if p)}:
        if d.is_dir():
            found += [f"memory file {f}" for f in d.iterdir()
                      if str(f) not in known and f.name != "filler"]
    pids = {r.pid for r in vms} | {m.pid for m in s.pool_members()}
    found += [f"QEMU process {p.pid}" for p in qemu_processes(str(env.home))
              if p.pid not in pids]
    run_dirs = {s.run_dir(r.name) for r in vms}
    found += [f"socket {x}" for x in env.home.rglob("*.sock") if x.parent not in run_dirs]
    return found


def holders(directory: Path, wait: float = 10) -> list[str]:
    """The processes that still map or hold open a file under *directory*
    after *wait* seconds (a QEMU that outlived its VM keeps a memory file
    busy, and its file system cannot be unmounted)."""
    deadline = time.monotonic() + wait
    prefix = f"{directory}/"
    while True:
        found = []
        for proc in psutil.process_iter(["pid", "cmdline"]):
            try:
                paths = [m.path for m in proc.memory_maps()]
                paths += [f.path for f in proc.open_files()]
            except psutil.Error:
                continue
            if any(p.startswith(prefix) for p in paths):
                found.append(f"{proc.pid}: {' '.join(proc.info['cmdline'] or [])[:200]}")
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def assert_home_empty(env: Env) -> None:
    """Nothing is left: no VM, no template (internal fork bases included),
    no memory file, no socket, no QEMU process."""
    s = env.store()
    assert [r.name for r in s.list_vms()] == []
    assert s.template_names() == []
    if s.templates_dir.exists():
        assert sorted(x.name for x in s.templates_dir.iterdir()) == []
    assert sorted(x.name for x in env.memory_dir.iterdir()) == []
    assert [p.pid for p in qemu_processes(str(env.home))] == []
    assert sorted(str(x) for x in env.home.rglob("*.sock")) == []


def stop(env: Env, *names: str, force: bool = False) -> None:
    """Stop VMs as a user does (the public API: a fork base goes with its
    last VM)."""
    async def go() -> None:
        async with vmfork.open_async(env.home, env.memory_dir) as host:
            for n in names:
                await (await host.vm(n)).stop(force=force)

    run(go())


# -- one instant: the module's family (a parent and two children) ------------------------
@dataclass
class Family:
    env: Env
    report: ForkReport
    #: The parent's identity before the fork.
    before: Identity
    #: The parent's counter read just before the fork request and just after
    #: the fork returned.
    seq_before: int
    seq_after: int


@pytest.fixture(scope="module")
def family(session_images: Path) -> Iterator[Family]:
    with module_env("vffk", session_images) as env:
        boot(env, "p", net=True, disk=True)
        env.exec("p", DATA)
        env.exec("p", f"cat > /root/seq.sh <<'EOF'\n{SEQ_LOOP}\nEOF\n"
                      "setsid sh /root/seq.sh </dev/null >/dev/null 2>&1 &")
        wait_seq_beyond(env, "p", 20)
        before = identity(env, "p")
        seq_before = seq(env, "p")
        report = do_fork(env, "p", ["c1", "c2"])
        seq_after = seq(env, "p")
        yield Family(env, report, before, seq_before, seq_after)


def test_report_names_the_children_and_the_parents_new_qemu(family: Family) -> None:
    r, s = family.report, family.env.store()
    assert r.name == "p"
    assert [c.name for c in r.children] == ["c1", "c2"]
    assert r.parent_pause_ms > 0
    assert r.parent_pid == s.get_vm("p").pid
    for c in r.children:
        assert c.pid == s.get_vm(c.name).pid
        assert 0 < c.running_ms <= c.responsive_ms <= r.total_ms
    assert r.base.startswith("_fork.")
    assert {x.name for x in s.list_vms()} == {"p", "c1", "c2"}
    assert not orphans(family.env)


def test_data_written_before_the_fork_is_everywhere(family: Family) -> None:
    env = family.env
    md5 = env.exec("p", "cat /root/data.md5")
    for name in ("p", "c1", "c2"):
        assert env.exec(name, "cat /root/data.md5") == md5
        assert md5_intact(env, name), name


def test_parent_keeps_its_identity_children_get_their_own(family: Family) -> None:
    env, before = family.env, family.before
    assert before.reseeds == 0  # a fresh boot: the guest never saw a fork
    assert identity(env, "p") == before
    kids = {c: identity(env, c) for c in ("c1", "c2")}
    for c, who in kids.items():
        assert who.hostname == c
        assert who.reseeds >= 1, f"{c}: no '{RESEED}' in its kernel log"
        rec = env.store().get_vm(c)
        assert rec.spec.net is not None and who.mac == rec.spec.net.mac
    for attr in ("hostname", "machine_id", "mac", "vmgenid"):
        values = [getattr(before, attr)] + [getattr(k, attr) for k in kids.values()]
        assert len(set(values)) == 3, f"{attr}: {values}"


def test_children_start_from_the_parents_instant_then_count_on_their_own(
        family: Family) -> None:
    env, s = family.env, family.env.store()
    chains = {n: backing_chain(s.get_vm(n).spec.disks[0].path) for n in ("p", "c1", "c2")}
    # Each VM writes to an overlay of its own over one frozen layer: the
    # parent's disk at the fork.
    tops = [chains[n][0]["filename"] for n in chains]
    assert len(set(tops)) == 3, tops
    frozen = {chains[n][0].get("full-backing-filename") for n in chains}
    assert len(frozen) == 1 and None not in frozen, chains
    (layer,) = frozen
    fork_number = disk_number(str(layer), env.home)
    # The parent had reached it: after the request and before the return
    # (its /tmp/seq follows its disk by at most one turn).
    assert family.seq_before <= fork_number <= family.seq_after + 1
    # Every loop goes on from there.
    now = {n: wait_seq_beyond(env, n, fork_number) for n in ("p", "c1", "c2")}
    # The first child stops counting; the others go on without it.
    c1_last, c1_ram, c1_disk = stop_loop(env, "c1")
    assert c1_last == c1_ram == c1_disk >= now["c1"]
    wait_seq_beyond(env, "p", max(now["p"], c1_last))
    wait_seq_beyond(env, "c2", max(now["c2"], c1_last))
    assert seq(env, "c1") == c1_last
    for n in ("p", "c2"):
        last, ram, disk = stop_loop(env, n)
        assert last == ram == disk > fork_number, n
    # At no turn, in any VM, did the disk hold another number than RAM:
    # RAM and disk of each child come from one instant.
    for n in ("p", "c1", "c2"):
        assert env.exec(n, "cat /tmp/mismatch 2>/dev/null || true") == "", n
    # Files written now stay in their VM.
    for n in ("p", "c1", "c2"):
        env.exec(n, f"echo {n} > /root/mark-{n}")
    for n in ("p", "c1", "c2"):
        assert env.exec(n, "ls /root | grep mark-").split() == [f"mark-{n}"]


def test_children_removed_first_then_the_parent_frees_everything(family: Family) -> None:
    env = family.env
    stop(env, "c1", "c2")
    assert md5_intact(env, "p")
    assert not orphans(env)
    stop(env, "p")
    assert_home_empty(env)


# -- any VM, any number of times -----------------------------------------------------------
def test_five_forks_in_a_row_then_the_parent_removed_first(env: Env) -> None:
    boot(env, "p")
    env.exec("p", DATA)
    children = [f"c{k}" for k in range(1, 6)]
    for k, child in enumerate(children, 1):
        env.exec("p", f"echo {k} > /root/m{k}")
        report = do_fork(env, "p", [child])
        assert [c.name for c in report.children] == [child]
    assert identity(env, "p").reseeds == 0
    for k, child in enumerate(children, 1):
        # The parent's data as of this child's fork, nothing written later.
        assert env.exec(child, "cat /root/m*").split() == [str(i) for i in range(1, k + 1)]
        assert md5_intact(env, child)
    assert not orphans(env)
    stop(env, "p")
    for child in children:
        assert md5_intact(env, child), child
    assert not orphans(env)
    stop(env, *children)
    assert_home_empty(env)


def test_fork_tree_of_depth_3_removed_from_the_middle(env: Env) -> None:
    boot(env, "p")
    env.exec("p", DATA)
    line = ["p", "c", "g", "gg"]
    for level, (parent, child) in enumerate(itertools.pairwise(line)):
        env.exec(parent, f"echo {level} > /root/level{level}")
        do_fork(env, parent, [child])
        env.exec(parent, f"echo after > /root/after-{parent}")
    for depth, name in enumerate(line):
        # Each VM holds its ancestors' levels and its own, nothing of its
        # descendants, nothing its parent wrote after the fork.
        levels = env.exec(name, "cat /root/level* 2>/dev/null || true").split()
        assert levels == [str(i) for i in range(min(depth + 1, 3))], name
        after = env.exec(name, "ls /root | grep after- || true").split()
        assert after == ([f"after-{name}"] if name != "gg" else []), name
        assert md5_intact(env, name)
    ids = [identity(env, n) for n in line]
    assert [i.hostname for i in ids[1:]] == line[1:]
    assert len({i.machine_id for i in ids}) == 4 and len({i.vmgenid for i in ids}) == 4
    assert ids[0].reseeds == 0 and all(i.reseeds >= 1 for i in ids[1:])
    # A middle VM first, then the root, then the leaves.
    for gone, left in (("c", ["p", "g", "gg"]), ("p", ["g", "gg"]), ("gg", ["g"])):
        stop(env, gone)
        for n in left:
            assert md5_intact(env, n), f"{n} after {gone} was removed"
        assert not orphans(env)
    stop(env, "g")
    assert_home_empty(env)


def test_fork_of_a_clone_then_its_template_removed_with_force(env: Env) -> None:
    run(create.create_demo(env.store(), "t", memory_mib=256, prepare=DATA, accel="tcg"))
    run(clone.clone(env.store(), "t", names=["q"]))
    env.exec("q", "echo mine > /root/q-only")
    do_fork(env, "q", ["f1", "f2"])
    for n in ("q", "f1", "f2"):
        assert md5_intact(env, n)
        assert env.exec(n, "cat /root/q-only").strip() == "mine"
    assert identity(env, "q").hostname == "q"
    assert {identity(env, n).hostname for n in ("f1", "f2")} == {"f1", "f2"}
    p = env.cli("template", "rm", "t", "--force")
    assert p.returncode == 0, p.stderr
    assert not env.store().has_template("t")
    # The VMs that run on a fork base of their own (its memory a file of
    # its own) may outlive t; those left run intact.
    left = [r.name for r in env.store().list_vms()]
    for n in left:
        assert md5_intact(env, n), n
    assert not orphans(env)
    stop(env, *left)
    assert_home_empty(env)


# -- failure half-way ------------------------------------------------------------------------
@dataclass(frozen=True)
class Snapshot:
    """What a failed fork must leave as it was."""

    vms: list[str]
    templates: list[str]
    memory_files: list[str]
    md5: str
    who: Identity
    #: What orphans() found then (reported as a failure of its own).
    orphans: list[str]


def snapshot(env: Env, name: str, memory_dir: Path) -> Snapshot:
    s = env.store()
    return Snapshot(sorted(r.name for r in s.list_vms()), s.template_names(),
                    sorted(x.name for x in memory_dir.iterdir()),
                    env.exec(name, "md5sum /root/data"), identity(env, name), orphans(env))


def assert_unchanged(env: Env, name: str, memory_dir: Path, before: Snapshot,
                     what: str = "") -> None:
    """*name* runs with the data and identity of *before*, no VM came or
    went, and the only new template and memory file are a base that *name*
    itself now runs on (if its fork failed after it moved there). *what*
    names the case in the messages."""
    s = env.store()
    assert s.get_vm(name).state == "running", what
    assert env.exec(name, "md5sum /root/data") == before.md5, what
    assert identity(env, name) == before.who, what
    assert sorted(r.name for r in s.list_vms()) == before.vms, what
    new_templates = set(s.template_names()) - set(before.templates)
    assert new_templates <= {s.get_vm(name).template}, (what, new_templates)
    new_files = {x.name for x in memory_dir.iterdir()} - set(before.memory_files)
    assert new_files <= {Path(s.get_template(t).memory_file).name for t in new_templates}, \
        (what, new_files)
    new_orphans = sorted(set(orphans(env)) - set(before.orphans))
    assert not new_orphans, (what, new_orphans)


#: Steps of the children's start (the clone of the fork base) during a fork.
CLONE_STEPS = ("clone.spawned", "clone.identity")


def kill_steps() -> list[str]:
    """Where a QEMU started by the fork runs and can be killed: the fork's
    own steps once the parent's new QEMU is launched, up to the guest running
    there (from ``fork.resumed`` on, that QEMU *is* the parent), then the
    children's start."""
    steps = fork_checkpoints()
    if "fork.launched" not in steps:
        return []
    own = steps[steps.index("fork.launched"):]
    return [s for s in own if s != "fork.resumed"] + list(CLONE_STEPS)


def test_memory_dir_full_fails_the_fork_and_leaves_the_parent_as_it_was(env: Env) -> None:
    """The parent was forked once (it now runs on a frozen base): its next
    fork needs a copy of that base in the memory directory, which is full."""
    with mounted("tmpfs", 320) as small:
        try:
            boot(env, "p", memory_mib=128, memory_dir=small)
            env.exec("p", DATA)
            do_fork(env, "p", ["c1"])
            env.exec("p", "echo later > /root/later")
            filler = fill(small, 1)
            before = snapshot(env, "p", small)
            with pytest.raises(VmforkError) as failed:
                do_fork(env, "p", ["c2"])
            assert "\n" not in str(failed.value)
            assert_unchanged(env, "p", small, before)
            assert env.exec("p", "cat /root/later").strip() == "later"
            assert md5_intact(env, "c1")
            # With room again the same fork works.
            filler.unlink()
            do_fork(env, "p", ["c2"])
            assert env.exec("c2", "cat /root/later").strip() == "later"
        finally:
            stop(env, *(r.name for r in env.store().list_vms()), force=True)
        assert holders(small) == []
        assert sorted(x.name for x in small.iterdir()) == []
    assert_home_empty(env)


# -- killed half-way: a QEMU the fork started, or vmfork itself (one parent for all) -----
FORK_SCRIPT = ("import asyncio, logging, sys\n"
               "logging.basicConfig(level=logging.WARNING)\n"
               "from vmfork.fork.run import fork\n"
               "from vmfork.store import Store\n"
               "asyncio.run(fork(Store(), sys.argv[1], names=sys.argv[2:]))\n")


@pytest.fixture(scope="module")
def killed_parent(session_images: Path) -> Iterator[Env]:
    """A parent 'p' with data, shared by the kill tests (each leaves it forkable)."""
    with module_env("vfkk", session_images) as env:
        boot(env, "p")
        env.exec("p", DATA)
        yield env


@pytest.mark.parametrize("step", kill_steps() or ["fork.launched"])
def test_qemu_killed_at_a_step_of_a_fork_leaves_the_parent_as_it_was(
        killed_parent: Env, step: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """At *step*, SIGKILL the QEMU the fork started that is not the
    parent's: the parent's new QEMU before the guest runs there, or a
    child's. The fork fails with one line; the parent runs with its data
    and identity (in its old QEMU if the guest never ran in the new one)."""
    if step not in kill_steps():
        pytest.skip(f"vmfork.fork has no {step} checkpoint")
    from vmfork import checkpoints

    env = killed_parent
    real = checkpoints.checkpoint
    before = snapshot(env, "p", env.memory_dir)
    pid = env.store().get_vm("p").pid
    known = {q.pid for q in qemu_processes(str(env.home))}
    killed: list[int] = []

    async def kill_at(name: str) -> None:
        if name == step and not killed:
            parent_now = env.store().get_vm("p").pid
            for q in qemu_processes(str(env.home)):
                if q.pid not in known and q.pid != parent_now:
                    q.send_signal(signal.SIGKILL)
                    killed.append(q.pid)
        await real(name)

    monkeypatch.setattr(checkpoints, "checkpoint", kill_at)
    try:
        # A hook: at clone.identity the child's start is not over yet.
        run(fork(env.store(), "p", names=["k1"], on_clone="true"))
    except VmforkError as exc:
        assert "\n" not in str(exc), str(exc)
    else:
        pytest.fail(f"the fork succeeded though QEMU {killed} was killed")
    finally:
        monkeypatch.setattr(checkpoints, "checkpoint", real)
    assert killed, "no QEMU to kill"
    assert_unchanged(env, "p", env.memory_dir, before, step)
    if step.startswith("fork."):  # undone: the guest is back in its QEMU
        assert env.store().get_vm("p").pid == pid
        assert env.store().template_names() == before.templates


@pytest.mark.parametrize("step", [*fork_checkpoints(), *CLONE_STEPS])
def test_vmfork_killed_at_a_step_then_the_next_command_settles(
        killed_parent: Env, step: str) -> None:
    """vmfork killed (SIGKILL) at *step* of a fork; the next command on the
    parent (``vmfork exec``) finds it running with its data and identity,
    and the fork either finished or undone. A child whose start was cut
    short is listed ``abandoned`` and removed by ``vmfork stop`` (as any
    clone's); nothing else is left."""
    if not step.startswith("clone.") and step not in fork_checkpoints():
        pytest.skip(f"vmfork.fork has no {step} checkpoint")
    env = killed_parent
    before = identity(env, "p")
    md5 = env.exec("p", "md5sum /root/data")
    orphans_before = orphans(env)
    log = env.home / f"kill-{step}.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-c", FORK_SCRIPT, "p", "k1"],
                                env={**env.environ, STALL_ENV: step},
                                stdin=subprocess.DEVNULL, stdout=err, stderr=err)
    try:
        deadline = time.monotonic() + 120
        while f"stalling at {step}".encode() not in log.read_bytes():
            assert proc.poll() is None, (f"the fork ended ({proc.returncode}) before {step}: "
                                         f"{log.read_text(errors='replace')}")
            assert time.monotonic() < deadline, f"{step} was not reached"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(30)
    p = env.cli("exec", "p", "--", "md5sum /root/data", timeout=120)
    assert (p.returncode, p.stdout) == (0, md5), p.stderr
    s = env.store()
    assert s.get_vm("p").state == "running"
    assert s.get_vm("p").info.fork is None
    assert identity(env, "p") == before
    p = env.cli("ls", "--json", timeout=120)
    assert p.returncode == 0, p.stderr
    states = {r["name"]: r["state"] for r in json.loads(p.stdout)}
    assert states.get("k1") in (None, "running", "abandoned"), states
    if states.get("k1") == "running":  # the fork was finished
        assert env.exec("k1", "md5sum /root/data") == md5
        assert identity(env, "k1").hostname == "k1"
    if "k1" in states:
        assert env.cli("stop", "k1", timeout=120).returncode == 0
    assert sorted(r.name for r in s.list_vms()) == ["p"]
    assert sorted(set(orphans(env)) - set(orphans_before)) == []


def test_fork_whose_hook_fails_leaves_the_parent_as_it_was(killed_parent: Env) -> None:
    """A child's on-clone hook fails: the fork fails and removes its
    children. The parent was forked before, so it now runs on a new base
    and the base it left must go too."""
    env = killed_parent
    do_fork(env, "p", ["k1"])  # the parent runs on a base of its own
    stop(env, "k1")
    before = snapshot(env, "p", env.memory_dir)
    with pytest.raises(VmforkError) as failed:
        run(fork(env.store(), "p", names=["k1", "k2"], on_clone="exit 3"))
    assert "\n" not in str(failed.value) and "status 3" in str(failed.value)
    assert_unchanged(env, "p", env.memory_dir, before, "hook failed")
    assert not orphans(env), orphans(env)


def test_after_the_kills_the_parent_forks_and_everything_is_freed(killed_parent: Env) -> None:
    env = killed_parent
    do_fork(env, "p", ["k1"])
    assert md5_intact(env, "k1") and md5_intact(env, "p")
    stop(env, "p", "k1")
    assert_home_empty(env)
