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

import uuid
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from vmfork.errors import InvalidInput, LaunchError, TemplateError
from vmfork.files import sha256_file
from vmfork.names import check_name
from vmfork.ports import fresh_forwards
from vmfork.qemu import features
from vmfork.records import TemplateDisk, TemplateManifest
from vmfork.spec import DiskSpec, MemorySpec, NetSpec, VMSpec, new_mac
from vmfork.templates.kernel_stub import stub_for
from vmfork.timeouts import DEFAULT, Timeouts

if TYPE_CHECKING:
    from vmfork.store import Store

#: The manifest layout this vmfork writes (see the module docstring).
def disk_record(path: Path, index: int, backing: str | None) -> TemplateDisk:
    """The manifest entry of template disk *path* as it is now."""
    st = path.stat()
    if backing is None:
        return TemplateDisk(index, str(path), st.st_size, st.st_mtime_ns)
    bst = Path(backing).stat()
    return TemplateDisk(index, str(path), st.st_size, st.st_mtime_ns, backing,
                        bst.st_size, bst.st_mtime_ns)


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


def clone_spec(manifest: TemplateManifest, name: str, vdir: Path,
               kernel_stubs: Path | None = None) -> VMSpec:
    """The spec of a new clone (its files in *vdir*): template memory mapped
    privately, new VM generation ID, new MAC, own disk overlays, each of the
    template's port forwards on a free host port of its own, and (with
    *kernel_stubs*, their directory) a stub of the template's kernel and no
    initrd (:mod:`vmfork.templates.kernel_stub`)."""
    spec = manifest.spec
    stub = stub_for(kernel_stubs, spec.kernel) if kernel_stubs and spec.kernel else None
    if stub is not None:
        spec = spec.with_(kernel=stub, initrd=None, reboot_ends=True)
    net = NetSpec(mac=new_mac(), ports=fresh_forwards(spec.net.ports)) if spec.net else None
    return spec.with_(name=name, vmgenid=str(uuid.uuid4()), net=net,
                      disks=clone_disks(spec.disks, vdir),
                      memory=MemorySpec(backend="file", path=manifest.memory_file,
                                        share=False, readonly=True))
