"""What vmfork's operations return: frozen dataclasses with ``to_dict()``.

Every public operation returns one of these (or a handle, :mod:`vmfork.api`);
the CLI's ``--json`` output of a command is the ``to_dict()`` of its result,
so the keys here are the CLI's JSON keys. Floats are rounded to 4 decimals in
``to_dict()``; nested results become nested dicts and tuples become lists.
``from_dict()`` is the way back (the REST client rebuilds its results with
it). Pure values: nothing here does I/O."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Self


def _plain(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


_FIELD_TYPES: dict[type[Any], dict[str, Any]] = {}


def _field_types(cls: type[Any]) -> dict[str, Any]:
    hints = _FIELD_TYPES.get(cls)
    if hints is None:
        hints = _FIELD_TYPES[cls] = typing.get_type_hints(cls)
    return hints


def _rebuild(tp: Any, value: Any) -> Any:
    """*value* (plain JSON data) as the type *tp* of a result's field: nested
    results, tuples (of tuples), floats that JSON wrote as integers."""
    if value is None:
        return None
    origin = typing.get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        options = [a for a in typing.get_args(tp) if a is not type(None)]
        return _rebuild(options[0], value) if len(options) == 1 else value
    if isinstance(tp, type) and issubclass(tp, Result) and isinstance(value, dict):
        return tp.from_dict(value)
    if origin is tuple and isinstance(value, list | tuple):
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_rebuild(args[0], v) for v in value)
        return tuple(_rebuild(a, v) for a, v in zip(args, value, strict=False))
    if origin is list and isinstance(value, list | tuple):
        (arg,) = typing.get_args(tp)
        return [_rebuild(arg, v) for v in value]
    if origin is dict and isinstance(value, dict):
        return dict(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


class Result:
    """Base of every result: ``to_dict()`` gives plain JSON-ready data,
    ``from_dict()`` the result again."""

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = _plain(dataclasses.asdict(self))  # type: ignore[call-overload]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Self:
        """The result whose ``to_dict()`` is *d*: nested results and tuples
        rebuilt; keys the class does not know are ignored (a newer vmfork's),
        missing ones take their defaults (TypeError if one has none)."""
        hints = _field_types(cls)
        known = {f.name for f in dataclasses.fields(cls)  # type: ignore[arg-type]
                 if f.init}
        return cls(**{k: _rebuild(hints[k], v) for k, v in d.items() if k in known})


@dataclass(frozen=True)
class ExecResult(Result):
    """A guest command's exit code, its stdout and stderr (kept apart by both
    guest agents) and the seconds it took, host side.

    The guest's bytes are decoded as UTF-8 with ``errors="surrogateescape"``:
    text reads as text, and bytes that are not UTF-8 become lone surrogates,
    so ``stdout.encode(errors="surrogateescape")`` gives back exactly the
    bytes the command wrote (``vmfork exec`` writes those)."""

    exit_code: int
    stdout: str
    stderr: str
    seconds: float

    @classmethod
    def from_bytes(cls, exit_code: int, stdout: bytes, stderr: bytes,
                   seconds: float) -> ExecResult:
        """The result of a command that wrote the bytes *stdout* and *stderr*."""
        return cls(exit_code, stdout.decode(errors="surrogateescape"),
                   stderr.decode(errors="surrogateescape"), seconds)


@dataclass(frozen=True)
class OutputChunk:
    """Bytes a streamed guest command wrote (:mod:`vmfork.exec_stream`):
    *stream* is ``stdout`` or ``stderr``."""

    stream: str
    data: bytes


@dataclass(frozen=True)
class ExecExit(Result):
    """How a streamed guest command ended (:mod:`vmfork.exec_stream`): its
    output came before, in pieces."""

    exit_code: int
    seconds: float


@dataclass(frozen=True)
class FileResult(Result):
    """A file moved into a guest (:mod:`vmfork.guest_files`): where, how
    many bytes, the seconds it took and the agent that carried it."""

    name: str
    path: str
    size: int
    seconds: float
    agent: str


@dataclass(frozen=True)
class MigrationStats(Result):
    """What QEMU reports about a finished migration (a state save counts)."""

    status: str
    seconds: float             # host-observed, from migrate to completion
    total_time_ms: int | None  # QEMU's
    downtime_ms: int | None    # QEMU's
    ram_bytes: int             # RAM bytes transferred
    total_bytes: int           # all bytes transferred (RAM + device state)


@dataclass(frozen=True)
class VMStatus(Result):
    """A VM as the catalog and the host see it (``vmfork ls``, ``vmfork run``)."""

    name: str
    state: str
    pid: int | None
    memory_mib: int
    memory_file: str | None
    template: str | None
    accel: str
    age_seconds: float
    #: Seconds from launch to ready, for a booted VM.
    boot_seconds: float | None = None
    #: Host -> guest TCP port forwards on 127.0.0.1.
    ports: tuple[tuple[int, int], ...] = ()
    #: How a boot of the VM is known to be ready (``auto``, ``console:REGEX``, ...).
    ready: str = "auto"
    #: The guest agent known to answer (``qga``, ``serial``, ``none``), if known.
    agent: str | None = None
    #: The guest's OS as qemu-guest-agent named it (``pretty-name``), if known.
    os: str | None = None
    #: Why a ``dead`` VM died, when vmfork knows (its memory could not be
    #: fetched from a pulled template's source).
    cause: str | None = None
    #: Seconds without use after which vmfork pauses the VM (None: never),
    #: and whether it is paused for that now (:mod:`vmfork.idle`).
    idle_pause: float | None = None
    idle: bool = False


@dataclass(frozen=True)
class CloneResult(Result):
    """One clone and how long each step took (seconds from the clone's start)."""

    name: str
    pid: int
    pooled: bool
    spawn: float       # QEMU up, QMP answering (0 for a pooled process)
    state_loaded: float
    running: float
    responsive: float  # the guest agent answered (thawed, identity applied)
    #: The on-clone hook's exit status and output (None: no hook ran), and
    #: the time when it had finished.
    hook_status: int | None = None
    hook_output: str | None = None
    hook_done: float | None = None
    #: Port forwards (host, guest): each of the template's on a host port of
    #: the clone's own.
    ports: tuple[tuple[int, int], ...] = ()
    #: What the clone's identity step did, part by part (``rng``,
    #: ``hostname``, ``machine_id``, ``mac``, ``clock``): ``set``,
    #: ``vmgenid`` or ``skipped: <why>``; empty if no identity was asked for.
    identity: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ForkChild(Result):
    """One child of a fork; times in milliseconds from the fork request."""

    name: str
    pid: int
    running_ms: float    # its guest runs
    responsive_ms: float  # its agent answered with its own identity set
    hook_status: int | None = None
    hook_output: str | None = None
    ports: tuple[tuple[int, int], ...] = ()
    #: What its identity step did (see :attr:`CloneResult.identity`).
    identity: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ForkReport(Result):
    """What one fork of a running VM did and cost.

    The parent was paused once, for :attr:`parent_pause_ms` (host clock, from
    its guest stopping to running again in its new QEMU). RAM written for the
    fork: :attr:`captured_bytes` (pages the parent wrote since its memory was
    last frozen, copied while it was paused) and :attr:`base_copy_bytes`
    (a copy of an earlier frozen memory file, made before the pause)."""

    name: str
    #: The frozen state the children (and the parent) now run on: an internal
    #: template, removed with its last VM.
    base: str
    parent_pause_ms: float
    parent_old_pid: int
    parent_pid: int
    captured_bytes: int
    base_copy_bytes: int
    ram_bytes_written: int
    state_bytes: int
    #: Before the pause: the new QEMU of the parent started, a base copied.
    prepare_ms: float
    #: Request to the last child responsive (its hook run).
    total_ms: float
    children: tuple[ForkChild, ...] = ()
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class UpdateReport(Result):
    """What one live update did and cost."""

    name: str
    mode: str
    reason: str
    qemu: str
    qemu_version_before: str
    qemu_version_after: str
    old_pid: int
    new_pid: int
    generation: int
    pause_qemu_ms: float | None       # QEMU's downtime (source side)
    pause_host_ms: float | None       # guest stop (old) to resume (new), host clock
    total_seconds: float              # whole update, lock to old QEMU gone
    switch_seconds: float             # migrate command to guest resumed in the new QEMU
    ram_bytes_copied: int             # RAM page bytes sent
    bytes_transferred: int            # whole migration stream (RAM + device state)
    memory_before_bytes: int          # host memory of the VM before (one QEMU)
    peak_memory_bytes: int            # peak during the update (both QEMUs + memory)
    memory_file: str | None
    warnings: tuple[str, ...] = field(default=())

    @property
    def peak_memory_ratio(self) -> float:
        if not self.memory_before_bytes:
            return 0.0
        return self.peak_memory_bytes / self.memory_before_bytes

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        d["peak_memory_ratio"] = round(self.peak_memory_ratio, 3)
        return d


@dataclass(frozen=True)
class SaveResult(Result):
    """A save: device state written, RAM left in the memory file on disk."""

    name: str
    state: str
    state_file: str
    state_size: int
    sha256: str
    memory_file: str
    memory_size: int
    seconds: float
    downtime_seconds: float
    preflush_seconds: float
    flush_seconds: float
    migration: MigrationStats | None


@dataclass(frozen=True)
class RestoreResult(Result):
    """A restore: a new QEMU loaded the saved device state over the memory file."""

    name: str
    state: str
    pid: int | None
    seconds: float
    running_seconds: float
    check_seconds: float
    spawn_seconds: float
    load_seconds: float
    clock_synced: bool


@dataclass(frozen=True)
class ExportResult(Result):
    """A snapshot file written: header, kernel/initrd, the VM's RAM and state."""

    name: str
    file: str
    size: int
    allocated: int
    memory_mib: int
    seconds: float
    migration: MigrationStats


@dataclass(frozen=True)
class ImportResult(Result):
    """A VM started from a snapshot file."""

    name: str
    state: str
    pid: int | None
    file: str
    memory_file: str | None
    memory_mib: int
    seconds: float
    check_seconds: float
    load_seconds: float
    clock_synced: bool


@dataclass(frozen=True)
class PublishResult(Result):
    """A template's published layout written to a directory (``template publish``)."""

    name: str
    directory: str
    #: The files written, by their names in the layout.
    files: tuple[str, ...]
    #: Their apparent size, and the bytes of data in them (the memory's holes
    #: are left out).
    size: int
    data: int
    memory_size: int
    #: Memory chunks, those all zeros (never fetched), and those of the working set.
    chunks: int
    zero_chunks: int
    working_set: int
    seconds: float


@dataclass(frozen=True)
class PoolMemberStatus(Result):
    id: str
    pid: int
    warm: bool
    #: False while it is being started: no clone takes it yet.
    ready: bool = True


@dataclass(frozen=True)
class PoolStatus(Result):
    """A template's pool: the size it is kept at and the processes waiting."""

    template: str
    target: int
    warm: bool
    ready: int
    members: tuple[PoolMemberStatus, ...] = ()


@dataclass(frozen=True)
class TemplateStatus(Result):
    """A template as ``vmfork template ls`` shows it."""

    name: str
    memory_mib: int
    state_kib: int
    clones: int
    pool: int
    qemu: str
    age_seconds: float
    #: ``ready``; ``creating`` or ``removing`` while a command works on it
    #: (a template is usable only when ready).
    status: str = "ready"
    #: A pulled template (``vmfork template pull``): the URL it came from,
    #: and its memory's ``state`` (``fetching``, ``complete`` or ``broken``,
    #: with the one-line ``cause``), the share of it that is here and the
    #: bytes fetched so far. All None for a template made here.
    source: str | None = None
    state: str | None = None
    local_percent: float | None = None
    fetched_bytes: int | None = None
    cause: str | None = None


@dataclass(frozen=True)
class PullResult(Result):
    """A template pulled from another host (``vmfork template pull``).

    The template is usable when this returns. ``mode`` is ``lazy`` (its
    memory is served through FUSE and fetched on first read and in the
    background: ``state`` ``fetching``, or ``complete`` if it all came
    already) or ``eager`` (every non-zero chunk fetched and checked first:
    ``complete``). ``fetched_bytes`` counts what the pull itself fetched
    (manifest, state, boot files, disks and, eager, the memory)."""

    name: str
    source: str
    mode: str
    state: str
    memory_file: str
    memory_mib: int
    #: Bytes of the memory that are not all zeros (what an eager pull
    #: fetched, and a lazy one fetches in the end).
    memory_bytes: int
    fetched_bytes: int
    disks: int
    #: Seconds from the start of the pull to the template being usable, and
    #: of it fetching the manifest and device state.
    seconds: float
    manifest_seconds: float
