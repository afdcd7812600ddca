"""What the catalog keeps, typed: each VM's :class:`VMRecord` with its
:class:`VMInfo` (memory ownership, QEMU generation, an update in flight, a
saved state, the launch in flight), the saved-state manifest
:class:`SavedState`, each template's versioned :class:`TemplateManifest`, a
template being made or removed (:class:`TemplateWork`), and pool members
(:class:`PoolMember`).

Records are plain values; :mod:`vmfork.store` reads and writes them. Every
``from_dict`` accepts what older vmfork versions wrote (unknown keys are
ignored, missing ones take their defaults)."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from vmfork.errors import InvalidInput, MigrationError, TemplateError
from vmfork.files import write_atomic
from vmfork.results import MigrationStats, Result
from vmfork.spec import VMSpec

#: The QEMU migration mode of a save (RAM stays in the memory file).
SAVE_MODE = "cpr-reboot"


def _known(cls: type[Any], d: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in d.items() if k in names}


@dataclass(frozen=True)
class SavedState:
    """What a save wrote and a restore checks: one JSON manifest per saved VM."""

    name: str
    state_file: str
    sha256: str
    size: int
    memory_file: str
    memory_size: int
    save_id: str
    saved_at: float
    qemu_version: str
    machine: str
    mode: str = SAVE_MODE
    #: The guest ran when it was saved: restore resumes it (else it stays paused).
    was_running: bool = True
    #: The memory file's device and inode at the save, and the boot they
    #: belong to: a restore refuses another file put at its path
    #: (:func:`vmfork.private.check_same`). None in manifests of earlier
    #: vmfork versions.
    memory_dev: int | None = None
    memory_ino: int | None = None
    boot_id: str | None = None
    #: The QEMU process (pid, start time) that wrote the state. The manifest
    #: holds only for that process, and only until it runs the guest again
    #: (:func:`vmfork.vm.invalidate_save` deletes it first); a dead VM whose
    #: last QEMU was another process is not saved. None in manifests of
    #: earlier vmfork versions.
    qemu_pid: int | None = None
    qemu_start: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SavedState:
        return cls(**_known(cls, d))

    def save_to(self, path: Path) -> None:
        write_atomic(path, json.dumps(self.to_dict(), indent=2).encode())

    @classmethod
    def load_from(cls, path: Path) -> SavedState:
        try:
            return cls.from_dict(json.loads(path.read_bytes()))
        except FileNotFoundError:
            raise
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise MigrationError(f"saved-state manifest {path} is unreadable: {exc}") from exc


@dataclass(frozen=True)
class UpdateIntent:
    """An update in flight, recorded before the new QEMU starts, so that the
    next command can finish or undo it (:mod:`vmfork.update.recovery`)."""

    gen: int
    spec: VMSpec
    mode: str
    was_running: bool = True
    new_memory_file: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"gen": self.gen, "spec": self.spec.to_json(), "mode": self.mode,
                "was_running": self.was_running, "new_memory_file": self.new_memory_file}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> UpdateIntent:
        return cls(gen=int(d["gen"]), spec=VMSpec.from_json(d["spec"]), mode=str(d["mode"]),
                   was_running=bool(d.get("was_running", True)),
                   new_memory_file=d.get("new_memory_file"))


@dataclass(frozen=True)
class RetiredQemu:
    """The old QEMU of a committed update, left in ``postmigrate`` until it
    is ended (it holds nothing the guest needs)."""

    pid: int
    pid_start: float | None
    gen: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RetiredQemu:
        return cls(pid=int(d["pid"]), pid_start=d.get("pid_start"), gen=int(d.get("gen", 0)))


@dataclass(frozen=True)
class Launcher:
    """The vmfork process (pid, start time) whose launch transaction made a
    VM record and has not committed it yet (:mod:`vmfork.launch`): when that
    process is gone, the launch was abandoned."""

    pid: int
    start: float | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Launcher:
        return cls(pid=int(d["pid"]), start=d.get("start"))


@dataclass(frozen=True)
class ForkWork:
    """A fork in flight, recorded in the parent's :class:`VMInfo` before its
    first step, so that the next command can finish or undo it when the
    vmfork doing it died (:mod:`vmfork.fork.recovery`)."""

    #: The fork base (an internal template, reserved ``creating``) and its directory.
    base: str
    directory: str
    #: The vmfork process doing the fork.
    pid: int
    pid_start: float | None
    #: The generation and spec of the parent's new QEMU.
    gen: int
    spec: VMSpec
    was_running: bool
    #: The parent's memory file renamed to the base's (shared memory), or
    #: None: the base's file is a copy (private memory).
    memory_from: str | None
    memory_to: str
    #: Disk overlays moved into the base: (the parent's path, the base's path).
    disks: tuple[tuple[str, str], ...] = ()
    #: The parent's template before the fork.
    template: str | None = None
    qemu_version: str = ""
    machine: str = ""
    #: Set before the guest is paused.
    paused: bool = False
    #: The new QEMU (pid, start time), recorded when it is spawned.
    new_pid: int | None = None
    new_start: float | None = None

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["spec"] = self.spec.to_json()
        d["disks"] = [list(x) for x in self.disks]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ForkWork:
        known = _known(cls, d)
        known["spec"] = VMSpec.from_json(d["spec"])
        known["disks"] = tuple((str(a), str(b)) for a, b in d.get("disks") or ())
        return cls(**known)


@dataclass
class VMInfo:
    """Facts about a VM beyond its spec and state."""

    #: The VM's memory file is its own (removed with it); a clone maps its
    #: template's file and owns nothing until an update gives it a copy.
    owns_memory: bool = True
    #: Generation of the QEMU process: sockets of generation *n* are
    #: ``qmp.n.sock`` and so on, so two QEMUs of one VM live side by side.
    gen: int = 0
    #: Completed live updates.
    updates: int = 0
    #: Seconds from launch to ready (a booted VM).
    boot_seconds: float | None = None
    #: The guest image kind ("demo", "debian") a template or clone came from.
    guest: str | None = None
    update: UpdateIntent | None = None
    retire: RetiredQemu | None = None
    saved: SavedState | None = None
    restored_at: float | None = None
    imported_from: str | None = None
    #: The guest agent known to answer: ``qga`` (qemu-guest-agent),
    #: ``serial`` (vmfork's), ``none`` (a template's guest had neither), or
    #: None (not known yet: :func:`vmfork.vm.choose_agent` asks).
    agent: str | None = None
    #: What qemu-guest-agent said of the guest's OS (``guest-get-osinfo``).
    guest_os: dict[str, str] | None = None
    #: Set while the launch that creates the VM is in flight (run, clone,
    #: import), cleared when it commits.
    launcher: Launcher | None = None
    #: Set while a fork of the VM is in flight.
    fork: ForkWork | None = None
    #: Seconds without use after which vmfork pauses the VM (None: never),
    #: and when it did (None: not paused for idling) (:mod:`vmfork.idle`).
    idle_pause: float | None = None
    idle_since: float | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"owns_memory": self.owns_memory, "gen": self.gen,
                             "updates": self.updates}
        for k in ("boot_seconds", "guest", "restored_at", "imported_from", "agent",
                  "guest_os", "idle_pause", "idle_since"):
            if getattr(self, k) is not None:
                d[k] = getattr(self, k)
        for k in ("update", "retire", "saved", "launcher", "fork"):
            v = getattr(self, k)
            if v is not None:
                d[k] = v.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VMInfo:
        info = cls(**{k: v for k, v in _known(cls, d).items()
                      if k not in ("update", "retire", "saved", "launcher", "fork")})
        if isinstance(d.get("update"), dict):
            info.update = UpdateIntent.from_dict(d["update"])
        if isinstance(d.get("retire"), dict):
            info.retire = RetiredQemu.from_dict(d["retire"])
        if isinstance(d.get("saved"), dict):
            info.saved = SavedState.from_dict(d["saved"])
        if isinstance(d.get("launcher"), dict):
            info.launcher = Launcher.from_dict(d["launcher"])
        if isinstance(d.get("fork"), dict):
            info.fork = ForkWork.from_dict(d["fork"])
        return info


@dataclass
class VMRecord:
    """One VM as the catalog knows it."""

    name: str
    spec: VMSpec
    state: str
    pid: int | None = None
    pid_start: float | None = None
    template: str | None = None
    created: float = field(default_factory=time.time)
    info: VMInfo = field(default_factory=VMInfo)


@dataclass
class PoolMember:
    """A QEMU process spawned for a template, waiting for its device state
    (or, *warm*, with the state loaded, run once and paused again)."""

    id: str
    template: str
    spec: VMSpec
    pid: int
    pid_start: float | None
    created: float
    warm: bool = False
    #: False while it is being started (or warmed up): no clone takes it. A
    #: member left not ready belongs to a filler that died; the next fill of
    #: the pool (under its lock) ends it.
    ready: bool = True


# -- templates ----------------------------------------------------------------------
MANIFEST_VERSION = 1


@dataclass(frozen=True)
class TemplateDisk:
    """A disk overlay the template took over (read-only, ``disk{index}.qcow2``
    in its directory), with what is needed to notice that it, or the image
    under it, changed."""

    index: int
    path: str
    size: int
    mtime_ns: int
    backing: str | None = None
    backing_size: int | None = None
    backing_mtime_ns: int | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if self.backing_size is None:  # no image under it: the keys are left out
            del d["backing_size"], d["backing_mtime_ns"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TemplateDisk:
        return cls(**_known(cls, d))


@dataclass(frozen=True)
class TemplateSave:
    """How the template's state save went (manifest key ``save``): QEMU's
    statistics of the save (``seconds``: the save alone), the file system
    freeze before the pause, and the whole request until the state was saved
    (freeze included), in seconds."""

    migration: MigrationStats
    freeze_seconds: float = 0.0
    total_seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**self.migration.to_dict(), "freeze_seconds": round(self.freeze_seconds, 4),
                "total_seconds": round(self.total_seconds, 4)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TemplateSave:
        stats = MigrationStats(**_known(MigrationStats, d))
        # A save without a freeze: the save was the whole request.
        return cls(stats, float(d.get("freeze_seconds", 0.0)),
                   float(d.get("total_seconds", stats.seconds)))


@dataclass(frozen=True, kw_only=True)
class TemplateManifest(Result):
    """What a template is: its files, the QEMU that made it, the spec its
    clones start from, and how it was made. ``to_dict()`` is the JSON of the
    catalog, of ``manifest.json`` and of ``vmfork template create --json``."""

    version: int = MANIFEST_VERSION
    name: str
    #: Wall-clock time of creation (seconds since the epoch).
    created: float
    #: The VM frozen into this template (it ended).
    source_vm: str
    #: The template the source VM was cloned from (a chained template).
    parent: str | None = None
    #: The read-only memory file every clone maps privately, and its size.
    memory_file: str
    memory_size: int
    #: The device state (x-ignore-shared: no RAM), its size and sha256.
    state_file: str
    state_size: int
    state_sha256: str
    #: QEMU's version and the concrete machine type (alias resolved) at the save.
    qemu_version: str
    machine: str
    #: The QEMU binary.
    qemu: str
    #: The template's own spec; a clone's is derived with :func:`clone_spec`.
    spec: VMSpec
    #: The guest image kind ("demo", "debian").
    guest: str = "demo"
    save: TemplateSave
    disks: tuple[TemplateDisk, ...] = ()
    #: The guest's file systems were frozen at the pause (each clone thaws).
    frozen: bool = False
    #: The default on-clone hook (a shell command run in each clone).
    on_clone: str | None = None
    #: The snapshot file this template was imported from.
    imported_from: str | None = None
    #: The guest agent its guest answered with (``qga``, ``serial``, ``none``;
    #: None: not known), which its clones start out knowing.
    agent: str | None = None
    #: A fork base (:mod:`vmfork.fork`): the VM whose fork froze it. It is
    #: vmfork's own and is removed with its last VM.
    fork_of: str | None = None
    #: The device state is an ``x-ignore-shared`` migration stream (loaded
    #: with that capability); False: device state alone, loaded without it.
    ignore_shared: bool = True

    @property
    def memory_path(self) -> Path:
        return Path(self.memory_file)

    @property
    def state_path(self) -> Path:
        return Path(self.state_file)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self)}
        d["spec"] = json.loads(self.spec.to_json())
        d["save"] = self.save.to_dict()
        d["disks"] = [disk.to_dict() for disk in self.disks]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TemplateManifest:
        """Read a manifest of any version up to :data:`MANIFEST_VERSION`
        (the result has the current layout); TemplateError if it is newer
        or lacks what a template needs."""
        name = d.get("name", "?")
        version = d.get("version", 0)
        if not isinstance(version, int) or isinstance(version, bool):
            raise TemplateError(f"template {name}: manifest version {version!r} is not a number")
        if version > MANIFEST_VERSION:
            raise TemplateError(f"template {name}: its manifest is version {version}, newer "
                                f"than this vmfork reads ({MANIFEST_VERSION})")
        try:
            return cls(
                name=d["name"], created=float(d["created"]), source_vm=d["source_vm"],
                parent=d.get("parent"), memory_file=d["memory_file"],
                memory_size=int(d["memory_size"]), state_file=d["state_file"],
                state_size=int(d["state_size"]), state_sha256=d["state_sha256"],
                qemu_version=d["qemu_version"], machine=d["machine"], qemu=d["qemu"],
                spec=VMSpec.from_dict(d["spec"]), guest=d.get("guest") or "demo",
                save=TemplateSave.from_dict(d["save"]),
                disks=tuple(TemplateDisk.from_dict(x) for x in d.get("disks") or ()),
                frozen=bool(d.get("frozen", False)), on_clone=d.get("on_clone"),
                imported_from=d.get("imported_from"),
                agent=d.get("agent") if d.get("agent") in ("qga", "serial", "none") else None,
                fork_of=d.get("fork_of"), ignore_shared=bool(d.get("ignore_shared", True)))
        except (KeyError, TypeError, ValueError, InvalidInput) as exc:
            raise TemplateError(f"template {name}: its manifest is unreadable "
                                f"({type(exc).__name__}: {exc})") from exc

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str | bytes) -> TemplateManifest:
        try:
            d = json.loads(text)
        except ValueError as exc:
            raise TemplateError(f"a template manifest is not JSON: {exc}") from exc
        if not isinstance(d, dict):
            raise TemplateError("a template manifest is not a JSON object")
        return cls.from_dict(d)


#: States of a template's catalog row: usable, being made, being removed.
TEMPLATE_READY, TEMPLATE_CREATING, TEMPLATE_REMOVING = "ready", "creating", "removing"


@dataclass(frozen=True)
class TemplateWork:
    """What a ``template create`` or ``template rm`` is doing, kept in the
    template's catalog row (states ``creating`` and ``removing``) from before
    its first step, so that the next command can finish or undo it when the
    vmfork that did it died (:mod:`vmfork.templates.recovery`).

    For a creation it says who works (pid and start time), on which VM, in
    which directory, and how far it got: the flags are recorded *before* the
    step they name is taken (``frozen`` before fsfreeze, ``paused`` before
    the pause), so a recovery never misses a frozen or paused guest."""

    name: str
    #: ``create`` or ``remove``.
    op: str
    pid: int
    pid_start: float | None
    started: float
    #: The VM frozen into the template.
    source_vm: str | None = None
    #: The source VM was made by this creation (the demo build VM, an
    #: import's temporary VM): undoing the creation removes it.
    source_owned: bool = False
    #: The template's directory (made by this creation, ``exist_ok=False``).
    directory: str = ""
    #: The path the source VM's memory file is renamed to.
    memory_file: str | None = None
    #: The guest's file systems are (or may be) frozen.
    frozen: bool = False
    #: vmfork paused the running guest.
    paused: bool = False
    #: QEMU's version and machine type, read before the save.
    qemu_version: str | None = None
    machine: str | None = None
    #: The state save completed (its statistics).
    saved: TemplateSave | None = None
    on_clone: str | None = None
    imported_from: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["saved"] = self.saved.to_dict() if self.saved else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TemplateWork:
        known = _known(cls, d)
        saved = known.pop("saved", None)
        return cls(**known, saved=TemplateSave.from_dict(saved) if saved else None)
