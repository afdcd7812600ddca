"""The template manifest, the checks before a template is used, and the
specs of its clones.

Owns :class:`TemplateManifest`: a frozen, versioned value that
``template create`` writes to the catalog (and to ``manifest.json`` in the
template's directory, for people). Owns the checks that refuse a template
whose files or QEMU no longer match its manifest (memory file, state sha256,
disk overlays and the images under them, QEMU version, machine type), and the
spec of a new clone derived from it (template memory mapped privately, new VM
generation ID and MAC, an overlay of its own over each template disk).

Manifest versions (``version``):

* 0: the free dict vmfork wrote before manifests were typed (no ``version``
  key). Its keys are those of version 1 except ``version`` and
  ``imported_from``; the oldest also lack ``disks``, ``frozen``, ``on_clone``
  and, in ``save``, ``freeze_seconds`` and ``total_seconds``.
* 1: :class:`TemplateManifest`.

:meth:`TemplateManifest.from_dict` reads every version up to
:data:`MANIFEST_VERSION` into the current layout and refuses newer ones.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vmfork.errors import InvalidInput, LaunchError, TemplateError
from vmfork.files import sha256_file
from vmfork.qemu import features
from vmfork.results import MigrationStats, Result
from vmfork.spec import DiskSpec, MemorySpec, NetSpec, VMSpec, check_name, new_mac
from vmfork.timeouts import DEFAULT, Timeouts

if TYPE_CHECKING:
    from vmfork.store import Store

#: The manifest layout this vmfork writes (see the module docstring).
MANIFEST_VERSION = 1


def _known(cls: type[Any], d: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in d.items() if k in names}


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


def disk_record(path: Path, index: int, backing: str | None) -> TemplateDisk:
    """The manifest entry of template disk *path* as it is now."""
    st = path.stat()
    if backing is None:
        return TemplateDisk(index, str(path), st.st_size, st.st_mtime_ns)
    bst = Path(backing).stat()
    return TemplateDisk(index, str(path), st.st_size, st.st_mtime_ns, backing,
                        bst.st_size, bst.st_mtime_ns)


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
                imported_from=d.get("imported_from"))
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


def template_dir(store: Store, name: str) -> Path:
    """The directory of template *name*: its state, disk overlays, the kernel
    and initrd of an imported one, and ``manifest.json``."""
    return store.templates_dir / check_name(name, "template")


# -- checks -------------------------------------------------------------------
def check(manifest: TemplateManifest, qemu: str | None = None,
          timeouts: Timeouts = DEFAULT, cache_dir: Path | None = None) -> None:
    """Refuse (TemplateError) a template whose files or QEMU no longer match
    its manifest: memory file missing or resized, state file missing or
    corrupt, disks changed, another QEMU version, or a spec whose machine type
    is not the one the state was saved with. The machine type is the
    versioned one QEMU resolved at the save (e.g. ``pc-q35-10.0``), which
    every build of the same QEMU version provides."""
    name = manifest.name
    mem = manifest.memory_path
    if not mem.is_file():
        raise TemplateError(f"template {name}: memory file {mem} is missing")
    if mem.stat().st_size != manifest.memory_size:
        raise TemplateError(f"template {name}: memory file {mem} was resized "
                            f"({mem.stat().st_size} bytes, expected {manifest.memory_size})")
    state = manifest.state_path
    if not state.is_file():
        raise TemplateError(f"template {name}: state file {state} is missing")
    if sha256_file(state) != manifest.state_sha256:
        raise TemplateError(f"template {name}: state file {state} is corrupt "
                            "(sha256 differs from the manifest)")
    check_disks(manifest)
    if manifest.spec.machine != manifest.machine:
        raise TemplateError(f"template {name}: its spec has machine type "
                            f"{manifest.spec.machine}, the state was saved with "
                            f"{manifest.machine}")
    try:
        ver = features.binary_version(qemu or manifest.qemu, cache_dir, timeouts)
    except (InvalidInput, LaunchError) as exc:
        raise TemplateError(f"template {name}: {exc}") from exc
    if ver != manifest.qemu_version:
        raise TemplateError(f"template {name} was made with QEMU {manifest.qemu_version}, "
                            f"this QEMU is {ver}")


def check_disks(manifest: TemplateManifest) -> None:
    """Refuse a template whose disk overlays (or the images under them) are
    missing or were changed since it was made (size or mtime differs)."""
    name = manifest.name
    for entry in manifest.disks:
        path = Path(entry.path)
        try:
            st = path.stat()
        except FileNotFoundError:
            raise TemplateError(f"template {name}: disk overlay {path} is missing") from None
        if (st.st_size, st.st_mtime_ns) != (entry.size, entry.mtime_ns):
            raise TemplateError(f"template {name}: disk overlay {path} was modified "
                                "(size or mtime differs from the manifest)")
        if entry.backing is None or entry.backing_size is None:
            continue
        try:
            bst = Path(entry.backing).stat()
        except FileNotFoundError:
            raise TemplateError(f"template {name}: image {entry.backing} under its disk "
                                "is missing") from None
        if (bst.st_size, bst.st_mtime_ns) != (entry.backing_size, entry.backing_mtime_ns):
            raise TemplateError(f"template {name}: image {entry.backing} under its disk "
                                "changed since the template was made")


# -- clone specs --------------------------------------------------------------
def template_mac(manifest: TemplateManifest) -> str | None:
    """The MAC the template's guest has (its NIC keeps it in every clone
    until the clone's identity is applied)."""
    net = manifest.spec.net
    return net.mac if net else None


def clone_disks(disks: tuple[DiskSpec, ...], vdir: Path) -> tuple[DiskSpec, ...]:
    """A clone's disks: a fresh qcow2 overlay in its directory *vdir* over each
    of the template's overlays; read-only images are shared as they are."""
    return tuple(d if d.readonly and d.backing is None else
                 DiskSpec(path=str(vdir / f"disk{i}.qcow2"), format="qcow2", backing=d.path,
                          backing_format=d.format)
                 for i, d in enumerate(disks))


def move_disks(spec: VMSpec, old_dir: Path, new_dir: Path) -> VMSpec:
    """*spec* with the disks that lived in *old_dir* moved to *new_dir*
    (a pool member's directory renamed to its clone's)."""
    def moved(d: DiskSpec) -> DiskSpec:
        p = Path(d.path)
        if not p.is_relative_to(old_dir):
            return d
        return replace(d, path=str(new_dir / p.relative_to(old_dir)))
    return spec.with_(disks=tuple(moved(d) for d in spec.disks))


def clone_spec(manifest: TemplateManifest, name: str, vdir: Path) -> VMSpec:
    """The spec of a new clone (its files in *vdir*): template memory mapped
    privately, new VM generation ID, new MAC, own disk overlays."""
    spec = manifest.spec
    net = NetSpec(mac=new_mac(), ports=spec.net.ports) if spec.net else None
    return spec.with_(name=name, vmgenid=str(uuid.uuid4()), net=net,
                      disks=clone_disks(spec.disks, vdir),
                      memory=MemorySpec(backend="file", path=manifest.memory_file,
                                        share=False, readonly=True))
