"""What a QEMU binary is and can do, as QEMU itself says over QMP.

Owns the one way vmfork learns a QEMU's version and features (never by
parsing ``--version`` or comparing version numbers):

- :class:`QemuFeatures`: version, machine types, and the capabilities live
  update chooses by (``cpr-transfer``, ``x-ignore-shared``, ``aux-ram-share``).
- :func:`of_running`: ask a running QEMU (a VM's process).
- :func:`of_binary`: start a binary bare (``-machine none``, paused, no
  guest), ask it, kill it (:func:`probe`).
- :func:`binary_version`: the version string of a binary, synchronously.
- :func:`qemu_identity`: the version and the concrete machine type of a
  running VM, which a template or a saved state records.

Answers are cached per binary *file* (device, inode, size, mtime: a binary
replaced by a package upgrade is asked again) in memory and, given a
directory, on disk in ``qemu-features.json`` (:class:`FeatureCache`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

from qemu.qmp import QMPClient
from qemu.qmp.error import QMPError

from vmfork.errors import InvalidInput, LaunchError, QMPCommandError, VmforkTimeout
from vmfork.private import UMASK, make_dirs, opener, write_file
from vmfork.qemu.machine import Machine, deadline, log_tail, qmp_execute
from vmfork.timeouts import DEFAULT, Timeouts

T = TypeVar("T")
log = logging.getLogger("vmfork.features")

#: Runs one QMP command: ``execute(command, arguments)``.
Execute = Callable[[str, dict[str, Any] | None], Awaitable[Any]]


@dataclass(frozen=True)
class QemuFeatures:
    """What one QEMU binary supports, as it says over QMP."""

    version: str                  # "10.0.2"
    cpr_transfer: bool            # migration mode cpr-transfer
    ignore_shared: bool           # migration capability x-ignore-shared
    aux_ram_share: bool           # -machine aux-ram-share
    machines: tuple[str, ...]     # concrete machine types (no aliases)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QemuFeatures:
        return cls(version=str(d["version"]), cpr_transfer=bool(d["cpr_transfer"]),
                   ignore_shared=bool(d["ignore_shared"]),
                   aux_ram_share=bool(d["aux_ram_share"]),
                   machines=tuple(str(m) for m in d["machines"]))


def _version(answer: Any) -> str:
    q = answer["qemu"]
    return f"{q['major']}.{q['minor']}.{q['micro']}"


async def query_features(who: str, execute: Execute) -> QemuFeatures:
    """Ask a QEMU (running a VM, or a bare probe) what it supports."""
    ver = await execute("query-version", None)
    caps = await execute("query-migrate-capabilities", None)
    props = await execute("qom-list-properties", {"typename": "machine"})
    schema = await execute("query-qmp-schema", None)
    machines = await execute("query-machines", None)
    try:
        return QemuFeatures(
            version=_version(ver),
            cpr_transfer=any(e.get("meta-type") == "enum"
                             and "cpr-transfer" in e.get("values", ()) for e in schema),
            ignore_shared=any(c["capability"] == "x-ignore-shared" for c in caps),
            aux_ram_share=any(p["name"] == "aux-ram-share" for p in props),
            machines=tuple(sorted(str(m["name"]) for m in machines)))
    except (KeyError, TypeError, AttributeError) as exc:
        raise QMPCommandError(who, "query-version and friends", None,
                              f"unexpected answer ({exc!r})") from exc


def binary_id(path: str) -> str:
    """Identity of an executable file (``/proc/PID/exe`` works for a running
    one, even after its file was replaced); raises OSError."""
    st = os.stat(path)
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"


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


#: The in-memory layer of every :class:`FeatureCache`, by binary identity.
_MEMORY: dict[str, QemuFeatures] = {}


class FeatureCache:
    """QemuFeatures per binary identity: in this process, and in
    *directory*/``qemu-features.json`` if a directory is given."""

    def __init__(self, directory: Path | None = None) -> None:
        self.path = directory / "qemu-features.json" if directory else None

    def _load(self) -> dict[str, Any]:
        if self.path is None:
            return {}
        try:
            data = json.loads(self.path.read_text())
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def get(self, key: str) -> QemuFeatures | None:
        if key in _MEMORY:
            return _MEMORY[key]
        d = self._load().get(key)
        try:
            found = QemuFeatures.from_dict(d) if isinstance(d, dict) else None
        except (KeyError, TypeError, ValueError):
            return None
        if found is not None:
            _MEMORY[key] = found
        return found

    def put(self, key: str, features: QemuFeatures) -> None:
        """Remember *features*; a cache file that cannot be written only
        means the next process asks QEMU again."""
        _MEMORY[key] = features
        if self.path is None:
            return
        data = self._load()
        data[key] = features.to_dict()
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        try:
            make_dirs(self.path.parent)
            write_file(tmp, json.dumps(data, indent=1, sort_keys=True).encode())
            os.replace(tmp, self.path)
        except OSError as exc:
            log.warning("cannot write the QEMU feature cache %s: %s", self.path, exc.strerror)
            with contextlib.suppress(OSError):
                tmp.unlink()


async def of_running(m: Machine, cache: FeatureCache | None = None) -> QemuFeatures:
    """What the QEMU process behind *m* supports (asked over its QMP)."""
    cache = cache or FeatureCache()
    try:
        key: str | None = binary_id(f"/proc/{m.pid}/exe")
    except OSError:
        key = None
    found = cache.get(key) if key else None
    if found is not None:
        return found
    feats = await query_features(m.name, m.qmp)
    if key:
        cache.put(key, feats)
    return feats


async def of_binary(qemu: str, cache: FeatureCache | None = None,
                    log_path: Path | None = None, timeouts: Timeouts = DEFAULT) -> QemuFeatures:
    """What the binary *qemu* (a path or a name on PATH) supports; probes it
    (:func:`probe`) unless the cache knows."""
    cache = cache or FeatureCache()
    path = resolve_binary(qemu)
    try:
        key = binary_id(path)
    except OSError as exc:
        raise InvalidInput(f"QEMU binary {qemu!r} is unreadable: {exc.strerror}") from exc
    found = cache.get(key)
    if found is not None:
        return found
    feats = await probe(path, log_path, timeouts)
    cache.put(key, feats)
    return feats


def _run(coro: Coroutine[Any, Any, T]) -> T:
    """Run *coro* to the end from synchronous code, even when called from
    inside a running event loop (then in a thread with its own loop)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="vmfork-probe") as pool:
        # Bounded by the coroutine's own deadlines (start, qmp, stop).
        return pool.submit(asyncio.run, coro).result()


def binary_version(qemu: str, cache_dir: Path | None = None,
                   timeouts: Timeouts = DEFAULT) -> str:
    """Version of the QEMU binary *qemu* (a path or a name on PATH), e.g.
    ``10.0.2``, as the binary says over QMP; cached per binary file (in this
    process, and in *cache_dir* if given). Raises :class:`InvalidInput` if
    there is no such binary, :class:`LaunchError` if it does not start."""
    cache = FeatureCache(cache_dir)
    path = resolve_binary(qemu)
    with contextlib.suppress(OSError):
        found = cache.get(binary_id(path))
        if found is not None:
            return found.version
    return _run(of_binary(path, cache, None, timeouts)).version


async def probe(qemu: str, log_path: Path | None = None,
                timeouts: Timeouts = DEFAULT) -> QemuFeatures:
    """Start *qemu* bare (``-machine none``, paused), ask it what it
    supports, and kill it. Its output goes to *log_path* (default: a
    temporary file, removed afterwards)."""
    ours, theirs = socket.socketpair()
    argv = [qemu, "-machine", "none", "-nodefaults", "-no-user-config", "-nographic", "-S",
            "-chardev", f"socket,id=qmp_fd,fd={theirs.fileno()}",
            "-mon", "chardev=qmp_fd,mode=control"]
    tmp_log: Path | None = None
    try:
        if log_path is None:
            fd, name = tempfile.mkstemp(prefix="vmfork-probe-", suffix=".log")
            os.close(fd)
            log_path = tmp_log = Path(name)
        try:
            with open(log_path, "ab", opener=opener) as logf:
                proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf,
                                        stderr=subprocess.STDOUT, pass_fds=(theirs.fileno(),),
                                        start_new_session=True, umask=UMASK)
        except OSError as exc:
            raise LaunchError(f"cannot start QEMU {qemu}: {exc.strerror}", argv=argv) from exc
        finally:
            theirs.close()
        try:
            return await _ask(proc, ours, qemu, argv, log_path, timeouts)
        finally:
            if proc.poll() is None:
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                await asyncio.to_thread(proc.wait, timeouts.stop)
    finally:
        ours.close()
        if tmp_log is not None:
            with contextlib.suppress(OSError):
                tmp_log.unlink()


async def _ask(proc: subprocess.Popen[bytes], sock: socket.socket, qemu: str,
               argv: list[str], log_path: Path, timeouts: Timeouts) -> QemuFeatures:
    client = QMPClient("probe")
    client.logger = logging.getLogger("vmfork.qmp.probe")
    try:
        try:
            await deadline(client.connect(sock), timeouts.start, f"QMP of {qemu}")
        except (QMPError, OSError, EOFError, VmforkTimeout) as exc:
            if not isinstance(exc, VmforkTimeout):  # it is exiting: learn its status
                with contextlib.suppress(subprocess.TimeoutExpired):
                    await asyncio.to_thread(proc.wait, timeouts.stop)
            raise LaunchError(f"QEMU {qemu} did not start", exitcode=proc.poll(),
                              argv=argv, log_tail=log_tail(log_path, 5)) from exc

        async def execute(cmd: str, args: dict[str, Any] | None) -> Any:
            return await qmp_execute(client, qemu, cmd, args, timeouts.qmp)
        return await query_features(qemu, execute)
    finally:
        with contextlib.suppress(Exception):
            await deadline(client.disconnect(), timeouts.qmp, "probe disconnect")


async def running_version(m: Machine) -> str:
    """The version of the QEMU behind *m*, e.g. ``10.0.2``."""
    answer = await m.qmp("query-version")
    try:
        return _version(answer)
    except (KeyError, TypeError) as exc:
        raise QMPCommandError(m.name, "query-version", None,
                              f"unexpected answer ({exc!r})") from exc


async def running_machine(m: Machine) -> str:
    """The concrete machine type the QEMU behind *m* runs (an alias like
    ``q35`` resolved: another binary may mean a newer type by it)."""
    t = str(await m.qmp("qom-get", {"path": "/machine", "property": "type"}))
    return t.removesuffix("-machine")


async def qemu_identity(m: Machine) -> dict[str, str]:
    """``qemu_version`` and concrete ``machine`` of the QEMU behind *m*."""
    return {"qemu_version": await running_version(m), "machine": await running_machine(m)}


__all__ = ["FeatureCache", "QemuFeatures", "binary_id", "binary_version", "of_binary",
           "of_running", "probe", "qemu_identity", "query_features", "resolve_binary",
           "running_machine", "running_version"]
