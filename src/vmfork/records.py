"""What the catalog keeps about each VM, typed: :class:`VMRecord` with its
:class:`VMInfo` (memory ownership, QEMU generation, an update in flight, a
saved state), and the saved-state manifest :class:`SavedState`.

Records are plain values; :mod:`vmfork.store` reads and writes them. Every
``from_dict`` accepts what older vmfork versions wrote (unknown keys are
ignored, missing ones take their defaults)."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from vmfork.errors import MigrationError
from vmfork.files import write_atomic
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

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"owns_memory": self.owns_memory, "gen": self.gen,
                             "updates": self.updates}
        for k in ("boot_seconds", "guest", "restored_at", "imported_from"):
            if getattr(self, k) is not None:
                d[k] = getattr(self, k)
        for k in ("update", "retire", "saved"):
            v = getattr(self, k)
            if v is not None:
                d[k] = v.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VMInfo:
        info = cls(**{k: v for k, v in _known(cls, d).items()
                      if k not in ("update", "retire", "saved")})
        if isinstance(d.get("update"), dict):
            info.update = UpdateIntent.from_dict(d["update"])
        if isinstance(d.get("retire"), dict):
            info.retire = RetiredQemu.from_dict(d["retire"])
        if isinstance(d.get("saved"), dict):
            info.saved = SavedState.from_dict(d["saved"])
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
