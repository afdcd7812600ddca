"""Live update: move a running guest into a new QEMU process, maybe another binary.

Owns choosing how to move the guest, the move itself, and rollback:

- ``cpr-transfer`` (QEMU >= 10): guest RAM (a memfd or a ``share=on`` file,
  with ``aux-ram-share=on``) passes to the new process as file descriptors
  over a UNIX socket; only device state is sent.
- ``ignore-shared``: local migration with ``x-ignore-shared``; the new QEMU
  maps the same ``share=on`` memory file, only device state is sent.
- ``copy``: classic local migration that copies RAM into a fresh memory file
  (or memfd) of the new QEMU; for VMs whose RAM is private (clones). It needs
  twice the guest's memory while it runs.

``auto`` picks the best mode that the VM's memory and both binaries support,
asking each QEMU over QMP (cached per binary, keyed by its inode), never by
parsing version strings.

Every step until the new QEMU runs the guest can fail: the new process does
not start, the migration fails or exceeds ``timeouts.migrate``, the guest does
not run afterwards. Then the new QEMU is killed, its sockets and memory file
are removed, the old QEMU (which still holds the guest, untouched) resumes it,
and the error names the cause. The new QEMU is started paused (``-S``) and
only resumed once the whole state has arrived, so the guest never runs in it
before the point of no return.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import psutil
from qemu.qmp import EventListener, QMPClient
from qemu.qmp.error import QMPError

from vmfork import vm
from vmfork.errors import (
    InvalidInput,
    LaunchError,
    MigrationError,
    StateError,
    VmforkError,
    VmforkTimeout,
)
from vmfork.qemu import migration
from vmfork.qemu.machine import Machine, deadline, log_tail
from vmfork.records import RetiredQemu, UpdateIntent, VMRecord
from vmfork.results import MigrationStats, UpdateReport
from vmfork.spec import MIB, MemorySpec, NetSpec, VMSpec, check_name
from vmfork.store import Store
from vmfork.timeouts import DEFAULT, Timeouts
from vmfork.update import recovery as update_recovery

log = logging.getLogger("vmfork.update")

Mode = Literal["auto", "cpr-transfer", "ignore-shared", "copy"]
MODES: tuple[str, ...] = ("auto", "cpr-transfer", "ignore-shared", "copy")
NO_COPY: tuple[str, ...] = ("cpr-transfer", "ignore-shared")
#: Local migrations are not throttled (QEMU's default is 128 MiB/s).
UNLIMITED_BANDWIDTH = 1 << 40
#: Phases reported to ``on_phase``, in order: ``launched`` (new QEMU spawned),
#: ``migrating`` (migration accepted by the old QEMU, still running),
#: ``migrated`` (state loaded in the new QEMU, guest not yet resumed),
#: ``resumed`` (guest runs in the new QEMU; no rollback after this).
PHASES = ("launched", "migrating", "migrated", "resumed")
PhaseHook = Callable[[str, int], Awaitable[None] | None]


# -- what a QEMU binary supports ------------------------------------------------
@dataclass(frozen=True)
class QemuFeatures:
    """What one QEMU binary supports for live update, as it says over QMP."""

    version: str
    cpr_transfer: bool
    ignore_shared: bool
    aux_ram_share: bool
    machines: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QemuFeatures:
        return cls(version=str(d["version"]), cpr_transfer=bool(d["cpr_transfer"]),
                   ignore_shared=bool(d["ignore_shared"]),
                   aux_ram_share=bool(d["aux_ram_share"]),
                   machines=tuple(d["machines"]))


Execute = Callable[[str, dict[str, Any] | None], Awaitable[Any]]


async def query_features(execute: Execute) -> QemuFeatures:
    """Ask a QEMU (running a VM or a bare probe) what it supports."""
    ver = (await execute("query-version", None))["qemu"]
    caps = await execute("query-migrate-capabilities", None)
    props = await execute("qom-list-properties", {"typename": "machine"})
    schema = await execute("query-qmp-schema", None)
    machines = await execute("query-machines", None)
    cpr = any(e.get("meta-type") == "enum" and "cpr-transfer" in e.get("values", ())
              for e in schema)
    return QemuFeatures(
        version=f"{ver['major']}.{ver['minor']}.{ver['micro']}",
        cpr_transfer=cpr,
        ignore_shared=any(c["capability"] == "x-ignore-shared" for c in caps),
        aux_ram_share=any(p["name"] == "aux-ram-share" for p in props),
        machines=tuple(sorted(str(m["name"]) for m in machines)))


def binary_id(path: str) -> str:
    """Identity of an executable file (``/proc/PID/exe`` works for a running one)."""
    st = os.stat(path)
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"


class FeatureCache:
    """QemuFeatures per binary identity, in ``$VMFORK_HOME/cache``."""

    def __init__(self, store: Store) -> None:
        self.path = store.home / "cache" / "qemu-features.json"

    def _load(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text())
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def get(self, key: str) -> QemuFeatures | None:
        d = self._load().get(key)
        try:
            return QemuFeatures.from_dict(d) if isinstance(d, dict) else None
        except (KeyError, TypeError):
            return None

    def put(self, key: str, features: QemuFeatures) -> None:
        data = self._load()
        data[key] = features.to_dict()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, self.path)


async def probe_features(qemu: str, log_path: Path, timeouts: Timeouts = DEFAULT) -> QemuFeatures:
    """Start *qemu* bare (``-machine none``) and ask it what it supports."""
    ours, theirs = socket.socketpair()
    argv = [qemu, "-machine", "none", "-nodefaults", "-no-user-config", "-nographic", "-S",
            "-chardev", f"socket,id=qmp_fd,fd={theirs.fileno()}",
            "-mon", "chardev=qmp_fd,mode=control"]
    try:
        with open(log_path, "ab") as logf:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf,
                                    stderr=subprocess.STDOUT, pass_fds=(theirs.fileno(),),
                                    start_new_session=True)
    except OSError as exc:
        ours.close()
        raise LaunchError(f"cannot start the new QEMU {qemu}: {exc.strerror}", argv=argv) \
            from exc
    finally:
        theirs.close()
    client = QMPClient("probe")
    client.logger = logging.getLogger("vmfork.qmp.probe")

    async def execute(cmd: str, args: dict[str, Any] | None) -> Any:
        return await deadline(client.execute(cmd, args), timeouts.qmp, f"QMP {cmd} of {qemu}")
    try:
        try:
            await deadline(client.connect(ours), timeouts.start, f"QMP of {qemu}")
        except (QMPError, OSError, VmforkTimeout) as exc:
            with contextlib.suppress(subprocess.TimeoutExpired):
                await asyncio.to_thread(proc.wait, 1.0)
            raise LaunchError(f"the new QEMU {qemu} did not start", exitcode=proc.poll(),
                              argv=argv, log_tail=log_tail(log_path, 5)) from exc
        try:
            return await query_features(execute)
        except (QMPError, KeyError, TypeError) as exc:
            raise LaunchError(f"cannot ask {qemu} what it supports: {exc}", argv=argv) from exc
    finally:
        with contextlib.suppress(Exception):
            await deadline(client.disconnect(), timeouts.qmp, "probe disconnect")
        ours.close()
        if proc.poll() is None:
            proc.kill()
        await asyncio.to_thread(proc.wait)


def resolve_binary(qemu: str) -> str:
    """Absolute path of a QEMU binary given as a path or a name on PATH."""
    if os.sep in qemu:
        path = os.path.abspath(qemu)
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    else:
        found = shutil.which(qemu)
        if found:
            return os.path.abspath(found)
    raise InvalidInput(f"QEMU binary {qemu!r} not found or not executable")


# -- choosing the mode -------------------------------------------------------------
def memory_kind(mem: MemorySpec) -> Literal["memfd", "shared-file", "private"]:
    if mem.backend == "memfd":
        return "memfd"
    return "shared-file" if mem.share and not mem.readonly else "private"


_KIND_TEXT = {"memfd": "a memfd", "shared-file": "a share=on memory file",
              "private": "private (mapped copy-on-write from a template)"}


def why_not(mode: str, spec: VMSpec, old: QemuFeatures, new: QemuFeatures) -> str | None:
    """Why *mode* cannot update a VM with *spec* between these binaries (None: it can)."""
    kind = memory_kind(spec.memory)
    if mode == "copy":
        return None
    if mode == "ignore-shared":
        if kind != "shared-file":
            return f"its RAM is {_KIND_TEXT[kind]}, not a share=on memory file"
        for who, f in (("running", old), ("new", new)):
            if not f.ignore_shared:
                return f"the {who} QEMU ({f.version}) lacks the x-ignore-shared capability"
        return None
    if mode == "cpr-transfer":
        if kind == "private":
            return f"its RAM is {_KIND_TEXT[kind]}; cpr-transfer needs shared memory"
        if not spec.aux_ram_share:
            return "it was started without -machine aux-ram-share=on"
        for who, f in (("running", old), ("new", new)):
            if not f.cpr_transfer:
                return f"the {who} QEMU ({f.version}) lacks migration mode cpr-transfer"
            if not f.aux_ram_share:
                return f"the {who} QEMU ({f.version}) lacks -machine aux-ram-share"
        return None
    raise InvalidInput(f"invalid update mode {mode!r}: use {', '.join(MODES)}")


def choose_mode(requested: str, spec: VMSpec, old: QemuFeatures,
                new: QemuFeatures) -> tuple[str, str]:
    """The mode to use and why; raise InvalidInput if *requested* cannot work."""
    kind = memory_kind(spec.memory)
    if requested == "auto":
        order = (("cpr-transfer", "copy") if kind == "memfd"
                 else ("ignore-shared", "cpr-transfer", "copy"))
        skipped: list[str] = []
        for mode in order:
            reason = why_not(mode, spec, old, new)
            if reason is None:
                why = f"RAM is {_KIND_TEXT[kind]}"
                if mode == "copy":
                    why += "; RAM is copied, which needs twice the guest memory"
                    if skipped:
                        why += f" (no-copy impossible: {skipped[0]})"
                return mode, why
            skipped.append(f"{mode}: {reason}")
        raise AssertionError("copy is always possible")  # pragma: no cover
    reason = why_not(requested, spec, old, new)
    if reason is not None:
        raise InvalidInput(f"{spec.name}: cannot update with {requested}: {reason}")
    return requested, "requested" + ("; needs twice the guest memory" if requested == "copy"
                                     else "")


# -- host memory ---------------------------------------------------------------------
def rss_anon(pid: int) -> int:
    """Private (anonymous) resident memory of *pid*; shared memory is counted
    once per file by :func:`shared_memory`, not per process."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def shared_memory(pids: tuple[int, ...], files: tuple[str, ...]) -> int:
    """Allocated bytes of the memory files and of the processes' memfds, each once."""
    seen: set[tuple[int, int]] = set()
    total = 0

    def add(path: str) -> None:
        nonlocal total
        with contextlib.suppress(OSError):
            st = os.stat(path)
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    for f in files:
        add(f)
    for pid in pids:
        fd_dir = f"/proc/{pid}/fd"
        with contextlib.suppress(OSError):
            for fd in os.listdir(fd_dir):
                with contextlib.suppress(OSError):
                    if os.readlink(f"{fd_dir}/{fd}").startswith("/memfd:"):
                        add(f"{fd_dir}/{fd}")
    return total


def host_memory(pids: tuple[int, ...], files: tuple[str, ...]) -> int:
    """Host memory of a VM's QEMU processes: their private RSS plus the guest
    memory they share (files, memfds), counted once."""
    return sum(rss_anon(p) for p in pids) + shared_memory(pids, files)


class MemorySampler:
    """Samples :func:`host_memory` in a thread every *interval* s; keeps the peak."""

    def __init__(self, pids: tuple[int, ...], files: tuple[str, ...],
                 interval: float = 0.005) -> None:
        self.pids = pids
        self.files = files
        self.interval = interval
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="vmfork-mem", daemon=True)

    def watch(self, pids: tuple[int, ...], files: tuple[str, ...]) -> None:
        self.pids, self.files = pids, files
        self.sample()

    def sample(self) -> int:
        value = host_memory(self.pids, self.files)
        self.peak = max(self.peak, value)
        self.samples += 1
        return value

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> MemorySampler:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()



# -- the update ------------------------------------------------------------------------
def _event_time(ev: Any) -> float | None:
    try:
        ts = ev["timestamp"]
        return float(ts["seconds"]) + float(ts["microseconds"]) / 1e6
    except (KeyError, TypeError, ValueError):
        return None


async def _call_hook(hook: PhaseHook | None, phase: str, pid: int) -> None:
    if hook is None:
        return
    result = hook(phase, pid)
    if inspect.isawaitable(result):
        await result


@dataclass
class _Move:
    """State of one update in progress, for the steps and for rollback."""

    store: Store
    rec: VMRecord
    old: Machine
    mode: str
    reason: str
    new_spec: VMSpec
    launch_spec: VMSpec
    gen: int
    timeouts: Timeouts
    hook: PhaseHook | None
    bandwidth: int | None
    was_running: bool
    old_params: dict[str, Any]
    old_features: QemuFeatures
    new: Machine | None = None
    new_memory_file: str | None = None
    stats: MigrationStats | None = None
    switch_seconds: float = 0.0
    phase: str = "launching"
    log_offset: int = 0
    stop_listener: EventListener = field(default_factory=lambda: EventListener("STOP"))
    resume_listener: EventListener = field(default_factory=lambda: EventListener("RESUME"))

    @property
    def name(self) -> str:
        return self.rec.name

    @property
    def mig_sock(self) -> Path:
        return self.store.run_dir(self.name) / f"mig.{self.gen}.sock"

    @property
    def cpr_sock(self) -> Path:
        return self.store.run_dir(self.name) / f"cpr.{self.gen}.sock"

    def remove_sockets(self) -> None:
        for p in (self.mig_sock, self.cpr_sock):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()

    # -- steps ----------------------------------------------------------------
    async def launch(self) -> Machine:
        self.remove_sockets()
        paths = self.store.run_paths(self.name, self.gen)
        mem = self.launch_spec.memory
        if mem.backend == "file" and mem.path:
            Path(mem.path).parent.mkdir(parents=True, exist_ok=True)
        logp = vm.qemu_log(self.store, self.name)
        with contextlib.suppress(OSError):
            self.log_offset = logp.stat().st_size
        if self.mode == "cpr-transfer":
            cpr = {"channel-type": "cpr", "addr": {"transport": "socket", "type": "unix",
                                                   "path": str(self.cpr_sock)}}
            new = await Machine.launch(self.launch_spec, paths, logp,
                                       incoming=(f"unix:{self.mig_sock}", json.dumps(cpr)),
                                       timeouts=self.timeouts, connect_qmp=False)
            self.new = new
            await deadline(self._wait_listening(new, self.cpr_sock), self.timeouts.start,
                           f"the new QEMU of {self.name} to listen for cpr state")
        else:
            self.new = new = await Machine.launch(self.launch_spec, paths, logp,
                                                  incoming=("defer",), timeouts=self.timeouts)
        return new

    async def _wait_listening(self, new: Machine, path: Path) -> None:
        while not path.exists():
            code = new.exitcode()
            if code is not None:
                raise LaunchError(f"{self.name}: the new QEMU exited during start",
                                  exitcode=code, argv=new.argv, log_tail=log_tail(new.log_path))
            await asyncio.sleep(0.002)

    async def prepare(self, new: Machine) -> dict[str, Any]:
        """Set capabilities and parameters on both sides; return migrate's args."""
        old = self.old
        params: dict[str, Any] = {"max_bandwidth": self.bandwidth or UNLIMITED_BANDWIDTH}
        if "mode" in self.old_params:
            params["mode"] = "cpr-transfer" if self.mode == "cpr-transfer" else "normal"
        await migration.set_parameters(old, **params)
        await migration.set_capabilities(old, x_ignore_shared=self.mode == "ignore-shared")
        if self.mode == "cpr-transfer":
            return {"channels": [
                {"channel-type": "main", "addr": {"transport": "socket", "type": "unix",
                                                  "path": str(self.mig_sock)}},
                {"channel-type": "cpr", "addr": {"transport": "socket", "type": "unix",
                                                 "path": str(self.cpr_sock)}}]}
        await migration.set_capabilities(new, x_ignore_shared=self.mode == "ignore-shared")
        await migration.start_incoming(new, f"unix:{self.mig_sock}")
        return {"uri": f"unix:{self.mig_sock}"}

    async def switch(self, new: Machine, args: dict[str, Any]) -> None:
        """Migrate, load the state in the new QEMU and resume the guest there."""
        t0 = time.monotonic()

        async def started() -> None:
            await _call_hook(self.hook, "migrating", new.pid)
        with self.old.events.listen(self.stop_listener):
            task = asyncio.ensure_future(migration.migrate(
                self.old, args, self.timeouts.migrate, "live update", on_started=started))
            try:
                if self.mode == "cpr-transfer":
                    await new.connect()  # QEMU greets once it has read the cpr state
                self.stats = await task
            finally:
                if not task.done():
                    task.cancel()
                elif not task.cancelled():
                    task.exception()  # seen; the failure that came first is reported
        await migration.wait_incoming(new, self.timeouts.migrate)
        await _call_hook(self.hook, "migrated", new.pid)
        if self.was_running:
            with new.events.listen(self.resume_listener):
                await new.resume()
                status = await new.status()
            if status != "running":
                raise StateError(f"{self.name}: the guest does not run in the new QEMU "
                                 f"(state {status!r})")
        self.switch_seconds = time.monotonic() - t0

    # -- rollback ---------------------------------------------------------------
    def new_exit_note(self) -> str:
        new = self.new
        if new is None:
            return ""
        code = new.exitcode()
        if code is None:
            return ""
        how = f"killed by signal {-code}" if code < 0 else f"exit status {code}"
        return f" (the new QEMU, pid {new.pid}, ended: {how})"

    async def rollback(self) -> None:
        """Kill the new QEMU, remove what it owned, let the old one run the guest."""
        new = self.new
        if new is not None:
            with contextlib.suppress(ProcessLookupError):
                if new.alive():
                    os.kill(new.pid, signal.SIGKILL)
            await new.kill()
        self.remove_sockets()
        if self.new_memory_file:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.new_memory_file)
        old = self.old
        await self._settle_old_migration()
        restore = {k.replace("-", "_"): self.old_params[k]
                   for k in ("mode", "max-bandwidth") if k in self.old_params}
        if restore:
            await migration.set_parameters(old, **restore)
        await migration.set_capabilities(old, x_ignore_shared=False)
        status = await old.status()
        if self.was_running and status != "running":
            if status not in ("paused", "postmigrate"):
                raise StateError(f"{self.name}: the old QEMU is in state {status!r}")
            await old.resume()
            status = await old.status()
        wanted = "running" if self.was_running else "paused"
        if status != wanted:
            raise StateError(f"{self.name}: the old QEMU is {status}, not {wanted}")

    async def _settle_old_migration(self) -> None:
        """Cancel the old QEMU's migration if it still runs; wait for its end."""
        old = self.old

        async def wait_final() -> None:
            cancelled = False
            while True:
                info = await old.qmp("query-migrate")
                st = info.get("status")
                if st in (None, "none", *migration.FINAL):
                    return
                if not cancelled:
                    await old.qmp("migrate_cancel")
                    cancelled = True
                await asyncio.sleep(0.01)
        await deadline(wait_final(), self.timeouts.migrate, f"cancelling the migration of "
                       f"{self.name}")


async def _old_features(store: Store, old: Machine) -> QemuFeatures:
    cache = FeatureCache(store)
    try:
        key: str | None = binary_id(f"/proc/{old.pid}/exe")
    except OSError:
        key = None
    cached = cache.get(key) if key else None
    if cached:
        return cached
    feats = await query_features(lambda c, a: old.qmp(c, a))
    if key:
        cache.put(key, feats)
    return feats


async def _new_features(store: Store, binary: str, old: Machine, old_feats: QemuFeatures,
                        timeouts: Timeouts) -> QemuFeatures:
    cache = FeatureCache(store)
    key = binary_id(binary)
    with contextlib.suppress(OSError):
        if key == binary_id(f"/proc/{old.pid}/exe"):
            return old_feats
    cached = cache.get(key)
    if cached:
        return cached
    feats = await probe_features(binary, vm.qemu_log(store, old.name), timeouts)
    cache.put(key, feats)
    return feats


def _memory_files(spec: VMSpec) -> tuple[str, ...]:
    mem = spec.memory
    return (mem.path,) if mem.backend == "file" and mem.path else ()


def _copy_headroom(spec: VMSpec, pid: int, memory_dir: Path) -> None:
    """Refuse a copy update that would not fit: it needs the guest's memory twice."""
    files = _memory_files(spec)
    need = min(spec.memory_mib * MIB, rss_anon(pid) + shared_memory((pid,), files))
    avail = psutil.virtual_memory().available
    with contextlib.suppress(OSError):
        if spec.memory.backend == "file":
            st = os.statvfs(memory_dir)
            avail = min(avail, st.f_bavail * st.f_frsize)
    if avail < need:
        raise StateError(f"{spec.name}: a copy update needs twice the guest's memory: "
                         f"{need // MIB} MiB more, but only {avail // MIB} MiB are free")


def _new_memory(store: Store, rec: VMRecord, mode: str) -> MemorySpec:
    mem = rec.spec.memory
    if mode != "copy":
        return mem
    if mem.backend == "memfd":
        return MemorySpec(backend="memfd")
    if memory_kind(mem) == "shared-file" and mem.path:
        mdir = Path(mem.path).parent
    else:
        mdir = store.memory_dir
    return MemorySpec(backend="file", path=str(vm.memory_file_path(mdir, rec.name)),
                      share=True)


async def _concrete_machine(old: Machine) -> str:
    """The machine type the old QEMU really runs (an alias like q35 may mean a
    newer type in another binary, which could not load this state)."""
    t = str(await old.qmp("qom-get", {"path": "/machine", "property": "type"}))
    return t.removesuffix("-machine")


async def restore_port_forwards(new: Machine, net: NetSpec | None) -> list[str]:
    """Add the VM's host port forwards to the new QEMU once the old freed them."""
    warnings = []
    for host, guest in (net.ports if net else ()):
        try:
            out = await new.qmp("human-monitor-command", {
                "command-line": f"hostfwd_add net0 tcp:127.0.0.1:{host}-:{guest}"})
            if str(out).strip():
                warnings.append(f"port forward {host}:{guest} not restored: {str(out).strip()}")
        except VmforkError as exc:
            warnings.append(f"port forward {host}:{guest} not restored: {exc}")
    return warnings


async def update(store: Store, name: str, qemu: str | None = None, mode: str = "auto",
                 timeouts: Timeouts = DEFAULT, on_phase: PhaseHook | None = None,
                 max_bandwidth: int | None = None) -> UpdateReport:
    """Move VM *name*'s guest into a new QEMU (binary *qemu*, default the VM's own).

    *mode* is ``auto``, ``cpr-transfer``, ``ignore-shared`` or ``copy``. The
    move (migration, state load, resume) must finish within
    ``timeouts.migrate``. *max_bandwidth* (bytes/s) throttles a copy (default
    unthrottled). *on_phase(phase, new_pid)* is called at each of
    :data:`PHASES`; if it raises before ``resumed``, the update rolls back
    like any failure.

    On failure the old QEMU keeps (or resumes) the guest, the new one is
    removed, and the error names the cause.
    """
    if mode not in MODES:
        raise InvalidInput(f"invalid update mode {mode!r}: use {', '.join(MODES)}")
    check_name(name)
    t0 = time.monotonic()
    with store.lock(name):
        rec = store.get_vm(name)
        if rec.state == "updating":  # an earlier update was interrupted: settle it first
            rec = await update_recovery.recover(store, rec, timeouts)
        rec = vm.get_live(store, name)
        assert rec.pid is not None
        binary = resolve_binary(qemu or rec.spec.qemu)
        qemu_str = binary if qemu else rec.spec.qemu
        old = await Machine.attach(rec.spec, vm.paths_for(store, rec),
                                   vm.qemu_log(store, name), rec.pid, timeouts=timeouts)
        try:
            return await _update_attached(store, rec, old, binary, qemu_str, mode, timeouts,
                                          on_phase, max_bandwidth, t0)
        finally:
            await old.disconnect()


async def _update_attached(store: Store, rec: VMRecord, old: Machine, binary: str,
                           qemu_str: str, requested: str, timeouts: Timeouts,
                           hook: PhaseHook | None, bandwidth: int | None,
                           t0: float) -> UpdateReport:
    name = rec.name
    status = await old.status()
    if status not in ("running", "paused"):
        raise StateError(f"{name} is {status}; an update needs a running or paused guest")
    old_feats = await _old_features(store, old)
    new_feats = await _new_features(store, binary, old, old_feats, timeouts)
    chosen, reason = choose_mode(requested, rec.spec, old_feats, new_feats)
    machine = await _concrete_machine(old)
    if machine not in new_feats.machines:
        raise InvalidInput(f"{name}: the new QEMU ({new_feats.version}) lacks machine type "
                           f"{machine!r} that the guest runs on")
    if chosen == "copy":
        _copy_headroom(rec.spec, old.pid, store.memory_dir)
    new_spec = rec.spec.with_(qemu=qemu_str, machine=machine,
                              memory=_new_memory(store, rec, chosen))
    # Host port forwards stay with the old QEMU until it quits.
    launch_spec = new_spec.with_(qemu=binary)
    if new_spec.net and new_spec.net.ports:
        launch_spec = launch_spec.with_(net=NetSpec(mac=new_spec.net.mac))
    old_params = await old.qmp("query-migrate-parameters")
    gen = rec.info.gen + 1
    move = _Move(store=store, rec=rec, old=old, mode=chosen, reason=reason, new_spec=new_spec,
                 launch_spec=launch_spec, gen=gen, timeouts=timeouts, hook=hook,
                 bandwidth=bandwidth, was_running=status == "running",
                 old_params=old_params, old_features=old_feats)
    if chosen == "copy" and new_spec.memory.backend == "file":
        move.new_memory_file = new_spec.memory.path
    prev_state = "running" if move.was_running else "paused"
    rec.state = "updating"
    # Written before the new QEMU exists, so that a vmfork killed from here on
    # leaves enough behind to finish or undo the move (update_recovery).
    rec.info.update = UpdateIntent(gen, new_spec, chosen, move.was_running,
                                   move.new_memory_file)
    store.update_vm(rec)
    files = _memory_files(rec.spec) + _memory_files(new_spec)
    log.info("%s: updating (%s, pid %d)", name, chosen, old.pid)
    try:
        with MemorySampler((old.pid,), files) as sampler:
            before = sampler.peak
            try:
                new = await move.launch()
                sampler.watch((old.pid, new.pid), files)
                move.phase = "moving"
                await _call_hook(hook, "launched", new.pid)
                args = await move.prepare(new)
                await deadline(move.switch(new, args), timeouts.migrate,
                               f"live update of {name}")
                sampler.sample()
            except BaseException as exc:
                await _roll_back(move, exc)
                raise  # only reached for CancelledError / KeyboardInterrupt
    except BaseException:
        rec.state = prev_state
        rec.info.update = None
        store.update_vm(rec)
        raise
    # The guest runs in the new QEMU: commit, then end the old process.
    assert move.new is not None and move.stats is not None
    new = move.new
    info = await old.qmp("query-migrate")
    rec.spec = new_spec
    rec.pid, rec.pid_start = new.pid, new.start_time
    rec.state = prev_state
    rec.info.gen = gen
    rec.info.updates += 1
    rec.info.update = None
    rec.info.retire = RetiredQemu(pid=old.pid, pid_start=old.start_time, gen=gen - 1)
    if chosen == "copy":
        rec.info.owns_memory = True
    store.update_vm(rec)
    log.info("%s: now in pid %d (%s)", name, new.pid, chosen)
    warnings: list[str] = []
    try:
        await old.shutdown()
    except VmforkError as exc:
        warnings.append(f"the old QEMU (pid {old.pid}) did not end: {exc}")
    else:
        rec.info.retire = None
        store.update_vm(rec)
    move.remove_sockets()
    if chosen == "copy":
        remove_old_memory(rec.spec, old.spec, warnings)
    warnings += await restore_port_forwards(new, new_spec.net)
    await new.disconnect()
    await _call_hook(hook, "resumed", new.pid)
    return _report(move, info, before, sampler.peak, new_feats, qemu_str, t0, warnings)


def remove_old_memory(new: VMSpec, old: VMSpec, warnings: list[str]) -> None:
    mem = old.memory
    if memory_kind(mem) == "shared-file" and mem.path and mem.path != new.memory.path:
        try:
            os.unlink(mem.path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            warnings.append(f"old memory file {mem.path} not removed: {exc.strerror}")


async def _roll_back(move: _Move, exc: BaseException) -> None:
    """Undo a failed move and raise an error naming the cause (and the rollback)."""
    name = move.name
    note = move.new_exit_note()
    log.warning("%s: update failed (%s)%s; rolling back", name, exc, note)
    try:
        await move.rollback()
    except BaseException as rb_exc:
        if isinstance(rb_exc, asyncio.CancelledError):
            raise
        raise MigrationError(f"{name}: update failed ({exc}){note}, and the old QEMU "
                             f"(pid {move.old.pid}) could not take the guest back: "
                             f"{rb_exc}") from exc
    if not isinstance(exc, Exception):
        return  # CancelledError, KeyboardInterrupt: the caller re-raises
    done = f"rolled back, the guest runs on in the old QEMU (pid {move.old.pid})" \
        if move.was_running else f"rolled back, the guest stays in the old QEMU " \
        f"(pid {move.old.pid})"
    if isinstance(exc, VmforkTimeout):
        raise VmforkTimeout(exc.phase, exc.seconds, f"update {done}{note}") from exc
    if isinstance(exc, LaunchError) and move.phase == "launching":
        tail = _log_since(vm.qemu_log(move.store, name), move.log_offset) or exc.log_tail
        raise LaunchError(f"{name}: update {done}: the new QEMU did not start",
                          exitcode=exc.exitcode, argv=exc.argv, log_tail=tail) from exc
    if isinstance(exc, LaunchError):
        exc = MigrationError("the new QEMU ended during the move")
    raise MigrationError(f"{name}: update ({move.mode}) {done}: {exc}{note}") from exc


def _log_since(path: Path, offset: int) -> str:
    """What QEMU wrote to the shared qemu.log since *offset* (the new process's part)."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read(16384).decode(errors="replace")
    except OSError:
        return ""


def _report(move: _Move, info: dict[str, Any], before: int, peak: int,
            new_feats: QemuFeatures, qemu_str: str, t0: float,
            warnings: list[str]) -> UpdateReport:
    assert move.new is not None and move.stats is not None
    stops = [t for t in map(_event_time, move.stop_listener.history) if t is not None]
    resumes = [t for t in map(_event_time, move.resume_listener.history) if t is not None]
    pause_host = (resumes[-1] - stops[-1]) * 1000 if stops and resumes else None
    ram = info.get("ram", {})
    downtime = move.stats.downtime_ms
    return UpdateReport(
        name=move.name, mode=move.mode, reason=move.reason, qemu=qemu_str,
        qemu_version_before=move.old_features.version, qemu_version_after=new_feats.version,
        old_pid=move.old.pid, new_pid=move.new.pid, generation=move.gen,
        pause_qemu_ms=float(downtime) if downtime is not None else None,
        pause_host_ms=round(pause_host, 3) if pause_host is not None else None,
        total_seconds=round(time.monotonic() - t0, 4),
        switch_seconds=round(move.switch_seconds, 4),
        ram_bytes_copied=int(ram.get("normal-bytes", 0)),
        bytes_transferred=move.stats.ram_bytes,
        memory_before_bytes=before, peak_memory_bytes=peak,
        memory_file=move.new_spec.memory.path, warnings=tuple(warnings))


__all__ = ["MODES", "NO_COPY", "PHASES", "QemuFeatures", "choose_mode",
           "query_features", "update", "why_not"]
