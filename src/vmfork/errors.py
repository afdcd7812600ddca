"""The exceptions vmfork raises; every one derives from :class:`VmforkError`.

::

    VmforkError
     +-- InvalidInput          bad user input: a size, a name, a path, an option
     |    +-- BadSnapshotFile  a snapshot file that is malformed, corrupt or hostile
     |    +-- UnsafePath       a directory vmfork would keep private files in is not private
     |    +-- TooLarge         more data than vmfork moves in one piece (a guest file)
     +-- NotFound              no VM, template or image by that name
     +-- AlreadyExists         a VM or template of that name exists already
     +-- SetupError            the host lacks something (QEMU, a kernel, busybox)
     |    +-- DaemonUnreachable  the client finds no vmforkd answering at its address
     +-- ResourceError         the host has no room for it (memory, space for RAM)
     +-- Busy                  too many requests of that kind at once; retry later
     +-- LaunchError           QEMU refused to start (exit code, argv, log tail)
     +-- StateError            the operation does not fit the VM's current state
     |    +-- QMPCommandError  QEMU refused a QMP command, or its monitor went away
     +-- GuestError            the guest agent failed or the guest is unreachable
     +-- SourceError           the source of a pulled template refused, failed or sent bad data
     +-- MigrationError        a state save/load or a migration failed
     +-- TemplateError         a template is unusable (manifest, checksum, files)
     +-- VmforkTimeout         a wait ran out of time; ``phase`` says which wait
     +-- PartialClone          some clones of one call failed, the others run

The CLI maps each class to a one-line message and an exit status in one table
(:mod:`vmfork.cli`). Wrappers keep their cause with ``raise ... from exc``;
:class:`asyncio.CancelledError` is never wrapped.
"""

from __future__ import annotations

from typing import Any


class VmforkError(Exception):
    """Root of every error vmfork raises on purpose."""


class InvalidInput(VmforkError):
    """User input that cannot be used (size, name, path, option)."""


class BadSnapshotFile(InvalidInput):
    """A snapshot file vmfork refuses to use: not one, of another format,
    truncated, corrupt, or with a header outside its strict schema (a field
    unknown, of the wrong type or out of bounds, parts overlapping or outside
    the file, more than the target directory can hold)."""


class UnsafePath(InvalidInput):
    """A directory that vmfork would keep private files in (its home, a memory
    directory) is a symbolic link, belongs to another user, or is writable
    by other users; vmfork writes nothing into it."""


class TooLarge(InvalidInput):
    """More data than vmfork moves in one piece: a file into or out of a
    guest over :data:`vmfork.guest_files.MAX_FILE`."""


class NotFound(VmforkError):
    """A named VM, template or image does not exist."""


class AlreadyExists(VmforkError):
    """A VM or template with that name exists already."""


class SetupError(VmforkError):
    """The host is missing something vmfork needs."""


class DaemonUnreachable(SetupError):
    """The REST client (:mod:`vmfork.client`) could not talk to vmforkd: no
    daemon listens at the address (not started, wrong socket or URL,
    connection refused), or it closed the connection before it answered."""


class ResourceError(VmforkError):
    """The host lacks the memory or space a VM needs (:mod:`vmfork.admission`),
    or ran out of it while vmfork worked."""


class Busy(VmforkError):
    """vmforkd has as many requests of this kind in flight and queued as it
    takes (e.g. QEMU starts); the same request may succeed later."""


class LaunchError(VmforkError):
    """QEMU did not start; carries its exit status, argv and the end of its log."""

    def __init__(self, message: str, exitcode: int | None = None,
                 argv: list[str] | None = None, log_tail: str = "") -> None:
        self.exitcode = exitcode
        self.argv = argv or []
        self.log_tail = log_tail
        detail = message
        if exitcode is not None:
            detail += (f" (exit status {exitcode})" if exitcode >= 0
                       else f" (killed by signal {-exitcode})")
        lines = [ln.strip() for ln in log_tail.strip().splitlines() if ln.strip()]
        tail = " | ".join(lines[-3:])
        if tail:
            detail += f": {tail}"
        super().__init__(detail)


class StateError(VmforkError):
    """The operation does not fit the VM's state (e.g. resume a running VM)."""


class QMPCommandError(StateError):
    """A QMP command failed: QEMU answered with an error (``error_class`` is
    QEMU's class, e.g. ``GenericError``, ``CommandNotFound``) or the monitor
    connection broke before the answer (``error_class`` None: QEMU is gone).
    Either way the VM's QEMU could not do it in its current state. Raised by
    :meth:`vmfork.qemu.machine.Machine.qmp`; modules that give the failure a
    meaning (a migration failed) wrap it with ``raise ... from``."""

    def __init__(self, vm: str, command: str, error_class: str | None, desc: str) -> None:
        self.vm = vm
        self.command = command
        self.error_class = error_class
        self.desc = desc
        super().__init__(f"{vm}: QMP {command} failed: {desc}")


class GuestError(VmforkError):
    """The guest agent did not answer properly."""


class SourceError(VmforkError):
    """The source of a pulled template (:mod:`vmfork.lazy.source`) refused a
    request (401/403/404), kept failing until its deadline, or sent data that
    does not match its manifest."""


class MigrationError(VmforkError):
    """Saving, loading or moving device state failed."""


class TemplateError(VmforkError):
    """A template cannot be used: changed files, other QEMU, bad manifest."""


class VmforkTimeout(VmforkError):
    """A wait exceeded its deadline."""

    def __init__(self, phase: str, seconds: float, detail: str = "") -> None:
        self.phase = phase
        self.seconds = seconds
        msg = f"timed out after {seconds:g} s waiting for {phase}"
        if detail:
            msg += f": {detail}"
        super().__init__(msg)


class PartialClone(VmforkError):
    """Some clones of one call failed; the others run (they are not removed
    unless the call asked for all or nothing). *clones*: the results of
    those that run; *failures*: (name, error) of each that failed, undone."""

    def __init__(self, clones: list[Any], failures: list[tuple[str, VmforkError]],
                 total: int) -> None:
        self.clones = clones
        self.failures = failures
        causes = "; ".join(str(e) for _, e in failures[:3])
        more = f"; and {len(failures) - 3} more" if len(failures) > 3 else ""
        super().__init__(f"{len(failures)} of {total} clones failed (the other "
                         f"{len(clones)} run): {causes}{more}")


#: The REST API's name and HTTP status of each error class (the first class
#: an error is an instance of decides); the daemon answers with them and the
#: client raises the same class again (:func:`error_from`).
HTTP_ERRORS: tuple[tuple[type[VmforkError], str, int], ...] = (
    (BadSnapshotFile, "bad_snapshot", 400), (UnsafePath, "unsafe_path", 400),
    (TooLarge, "too_large", 413), (InvalidInput, "invalid", 400), (NotFound, "not_found", 404),
    (AlreadyExists, "exists", 409), (SetupError, "setup", 503),
    (ResourceError, "no_room", 503), (Busy, "busy", 429), (LaunchError, "launch_failed", 500),
    (QMPCommandError, "qmp", 409), (StateError, "conflict", 409),
    (GuestError, "guest", 502), (SourceError, "source", 502), (MigrationError, "migration", 500),
    (TemplateError, "template", 409), (VmforkTimeout, "timeout", 504),
    (PartialClone, "partial", 500), (VmforkError, "error", 500),
)


def http_error(exc: VmforkError) -> tuple[str, int]:
    """The REST API's error code and HTTP status for *exc*."""
    return next((code, status) for cls, code, status in HTTP_ERRORS if isinstance(exc, cls))


def error_from(code: str, message: str) -> VmforkError:
    """An error of the class the REST API names *code* (VmforkError for a code
    this version does not know), carrying *message* as it came."""
    cls = next((c for c, name, _ in HTTP_ERRORS if name == code), VmforkError)
    err = cls.__new__(cls)
    Exception.__init__(err, message)
    if isinstance(err, VmforkTimeout):
        err.phase, err.seconds = "an answer of the daemon", 0.0
    if isinstance(err, LaunchError):
        err.exitcode, err.argv, err.log_tail = None, [], ""
    if isinstance(err, PartialClone):
        err.clones, err.failures = [], []
    return err
