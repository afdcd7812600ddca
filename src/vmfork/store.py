"""vmfork's state directory and its SQLite catalog.

Owns where things live under ``$VMFORK_HOME`` (default
``~/.local/share/vmfork``): the catalog ``vmfork.db``, per-VM run directories
(sockets and logs), images and templates; and the default memory directory
(``$VMFORK_MEMORY_DIR``, default ``/dev/shm/vmfork-$UID``: one per user).
The home is private (:func:`vmfork.private.private_dir`: 0700, the user's
own, refused otherwise), so are its directories (0700) and the catalog
(0600). Records are plain dataclasses; the catalog does no QEMU work.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vmfork import locking
from vmfork.errors import AlreadyExists, InvalidInput, NotFound, StateError, VmforkError
from vmfork.names import POOL_ID_HEX, check_name, check_new_name, derived, pool_member_name
from vmfork.private import FILE_MODE, make_dirs, private_dir
from vmfork.timeouts import DEFAULT

# The record types are imported where records are read: listing an empty
# catalog (``vmfork ls`` on a new host) then never loads them.
if TYPE_CHECKING:
    from vmfork.records import PoolMember, TemplateManifest, TemplateWork, VMRecord
    from vmfork.spec import RunPaths

#: Longest path the kernel accepts for a UNIX socket (sun_path minus the NUL).
MAX_SOCKET_PATH = 107
#: The generation a new name's socket paths are checked with
#: (``qmp.<generation>.sock``; one more per live update): a VM can be updated
#: this many times before its socket paths grow past what was checked.
GEN_RESERVE = 999_999

_SCHEMA = """
CREATE TABLE IF NOT EXISTS vms (
    name      TEXT PRIMARY KEY,
    spec      TEXT NOT NULL,
    state     TEXT NOT NULL,
    pid       INTEGER,
    pid_start REAL,
    template  TEXT,
    created   REAL NOT NULL,
    info      TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS templates (
    name      TEXT PRIMARY KEY,
    manifest  TEXT NOT NULL,
    created   REAL NOT NULL,
    state     TEXT NOT NULL DEFAULT 'ready',
    work      TEXT
);
CREATE TABLE IF NOT EXISTS pool_members (
    id        TEXT PRIMARY KEY,
    template  TEXT NOT NULL,
    spec      TEXT NOT NULL,
    pid       INTEGER NOT NULL,
    pid_start REAL,
    created   REAL NOT NULL,
    warm      INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS pool_targets (
    template  TEXT PRIMARY KEY,
    size      INTEGER NOT NULL,
    warm      INTEGER NOT NULL DEFAULT 0
);
"""
#: Columns added after the first release: (table, column, declaration).
_ADDED_COLUMNS = (("pool_members", "warm", "INTEGER NOT NULL DEFAULT 0"),
                  ("pool_members", "ready", "INTEGER NOT NULL DEFAULT 1"),
                  ("pool_targets", "warm", "INTEGER NOT NULL DEFAULT 0"),
                  ("templates", "state", "TEXT NOT NULL DEFAULT 'ready'"),
                  ("templates", "work", "TEXT"),
                  ("templates", "idle_pause", "REAL"))




def _longest_socket(paths: RunPaths) -> str:
    return max((paths.qmp, paths.console, paths.agent, paths.qga), key=len)


def default_home() -> Path:
    env = os.environ.get("VMFORK_HOME")
    if env:
        return Path(env).expanduser().absolute()
    return Path.home() / ".local" / "share" / "vmfork"


def default_memory_dir() -> Path:
    """``$VMFORK_MEMORY_DIR``, else ``/dev/shm/vmfork-$UID``: a directory per
    user, so that no user can take another's place first."""
    env = os.environ.get("VMFORK_MEMORY_DIR")
    return Path(env or f"/dev/shm/vmfork-{os.geteuid()}").absolute()


def _private_file(path: Path, create: bool = True) -> None:
    """Create *path* 0600 if missing (with *create*); make an existing one 0600.

    An existing file is never opened: closing any descriptor of a SQLite
    file drops the POSIX locks that another connection of this process
    holds on it."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        if create:
            with contextlib.suppress(FileExistsError):
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                                 FILE_MODE))
        return
    if mode & 0o077:
        os.chmod(path, FILE_MODE)




class Store:
    """The state directory and catalog; cheap to create, one per command."""

    def __init__(self, home: Path | str | None = None,
                 memory_dir: Path | str | None = None) -> None:
        self.home = Path(home).absolute() if home else default_home()
        self.memory_dir = Path(memory_dir).absolute() if memory_dir else default_memory_dir()
        private_dir(self.home, "vmfork home")
        db = self.home / "vmfork.db"
        # SQLite gives its -wal and -shm files the mode of the database.
        _private_file(db)
        for extra in ("vmfork.db-wal", "vmfork.db-shm"):
            _private_file(self.home / extra, create=False)
        self._db = sqlite3.connect(db, timeout=DEFAULT.catalog, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA)
        for table, column, decl in _ADDED_COLUMNS:
            have = {r[1] for r in self._db.execute(f"PRAGMA table_info({table})")}
            if column not in have:
                self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {decl}")

    def close(self) -> None:
        self._db.close()

    # -- places -----------------------------------------------------------
    @property
    def images_dir(self) -> Path:
        return self.home / "images"

    @property
    def cache_dir(self) -> Path:
        """What vmfork learned about this host (QEMU binaries' features, the
        accelerator probe)."""
        return self.home / "cache"

    @property
    def kernel_stubs_dir(self) -> Path:
        """Stubs of template kernels for clones' QEMUs
        (:mod:`vmfork.templates.kernel_stub`)."""
        return self.home / "cache" / "kernel-stubs"

    @property
    def templates_dir(self) -> Path:
        return self.home / "templates"

    def diagnosis_file(self, name: str) -> Path:
        """Where a guest's account of a hang is kept (outlives the VM's
        run directory, which a failed clone removes)."""
        d = make_dirs(self.home / "diagnoses")
        return d / f"{check_name(name)}-{time.strftime('%Y%m%d-%H%M%S')}.txt"

    def run_dir(self, name: str) -> Path:
        return self.home / "run" / check_name(name)

    def run_paths(self, name: str, generation: int = 0) -> RunPaths:
        """Socket and log paths for a VM; *generation* separates the QEMU
        processes of one VM that live side by side during an update."""
        paths = self._paths(name, generation)
        longest = _longest_socket(paths)
        if len(longest) > MAX_SOCKET_PATH:
            raise InvalidInput(
                f"socket path {longest!r} is longer than {MAX_SOCKET_PATH} bytes: "
                "set a shorter VMFORK_HOME")
        return paths

    def _paths(self, name: str, generation: int) -> RunPaths:
        from vmfork.spec import RunPaths

        d = self.run_dir(name)
        sfx = f".{generation}" if generation else ""
        return RunPaths(qmp=str(d / f"qmp{sfx}.sock"), console=str(d / f"console{sfx}.sock"),
                        console_log=str(d / "console.log"), agent=str(d / f"agent{sfx}.sock"),
                        qga=str(d / f"qga{sfx}.sock"))

    def check_new_name(self, name: str, what: str = "VM") -> str:
        """:func:`vmfork.names.check_new_name`, and the socket paths of every
        VM whose name derives from *name* fit in :data:`MAX_SOCKET_PATH`
        under this home: the VM's own up to generation :data:`GEN_RESERVE`;
        for a template, its pool members' and its clones' (``<name>-99999``)."""
        check_new_name(name, what)
        if what == "template":
            derived_names = [(pool_member_name(name, "0" * POOL_ID_HEX), 0),
                             (derived(name, "-99999"), GEN_RESERVE)]
        else:
            derived_names = [(name, GEN_RESERVE)]
        for vm_name, gen in derived_names:
            longest = _longest_socket(self._paths(vm_name, gen))
            if len(longest) > MAX_SOCKET_PATH:
                raise InvalidInput(
                    f"{what} name {name!r} is too long for VMFORK_HOME {str(self.home)!r}: "
                    f"the socket path {longest!r} would be {len(longest)} bytes, over the "
                    f"{MAX_SOCKET_PATH} a UNIX socket allows; use a shorter name or a "
                    "shorter VMFORK_HOME")
        return name

    def vm_dir(self, name: str) -> Path:
        """A VM's own files that outlive its QEMU process (saved state, imported
        kernel); removed with the VM."""
        return self.home / "vms" / check_name(name)

    @contextlib.contextmanager
    def lock(self, name: str, wait: bool | float = True) -> Iterator[None]:
        """Serialise operations on one VM across vmfork processes.

        Waits up to ``DEFAULT.lock`` seconds (or *wait* seconds) for another
        process to finish; ``wait=False`` raises StateError at once if the
        lock is held."""
        with locking.held(*self._lock_args(name, wait)):
            yield

    @contextlib.asynccontextmanager
    async def lock_async(self, name: str, wait: bool | float = True) -> AsyncIterator[None]:
        """:meth:`lock` without blocking the event loop while it waits."""
        async with locking.held_async(*self._lock_args(name, wait)):
            yield

    def _lock_args(self, name: str, wait: bool | float) -> tuple[Path, float, str]:
        """The lock file, the seconds to wait and the message if still busy."""
        if not name or "/" in name or "\0" in name or name.startswith("."):
            raise InvalidInput(f"invalid lock name {name!r}")  # it becomes a file name
        locks = make_dirs(self.home / "locks")
        seconds = 0.0 if wait is False else DEFAULT.lock if wait is True else float(wait)
        busy = f"{name} is busy: another vmfork command is working on it"
        if seconds:
            busy += f" (waited {seconds:g} s)"
        return locks / f"{name}.lock", seconds, busy

    # -- VMs --------------------------------------------------------------
    def add_vm(self, rec: VMRecord) -> None:
        try:
            self._db.execute(
                "INSERT INTO vms (name, spec, state, pid, pid_start, template, created, info)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (rec.name, rec.spec.to_json(), rec.state, rec.pid, rec.pid_start,
                 rec.template, rec.created, json.dumps(rec.info.to_dict())))
        except sqlite3.IntegrityError as exc:
            raise AlreadyExists(f"a VM named {rec.name!r} exists already") from exc

    def update_vm(self, rec: VMRecord) -> None:
        self._db.execute(
            "UPDATE vms SET spec=?, state=?, pid=?, pid_start=?, template=?, info=? WHERE name=?",
            (rec.spec.to_json(), rec.state, rec.pid, rec.pid_start, rec.template,
             json.dumps(rec.info.to_dict()), rec.name))

    def set_state_if(self, name: str, expected: str, new: str) -> bool:
        """Atomically move VM *name* from state *expected* to *new*; False if it
        was not in *expected* (another process got there first)."""
        cur = self._db.execute("UPDATE vms SET state=? WHERE name=? AND state=?",
                               (new, name, expected))
        return cur.rowcount == 1

    def get_vm(self, name: str) -> VMRecord:
        row = self._db.execute(
            "SELECT name, spec, state, pid, pid_start, template, created, info FROM vms"
            " WHERE name=?", (name,)).fetchone()
        if row is None:
            raise NotFound(f"no VM named {name!r}")
        return self._vm(row)

    def has_vm(self, name: str) -> bool:
        return self._db.execute("SELECT 1 FROM vms WHERE name=?", (name,)).fetchone() is not None

    def list_vms(self) -> list[VMRecord]:
        rows = self._db.execute(
            "SELECT name, spec, state, pid, pid_start, template, created, info FROM vms"
            " ORDER BY created").fetchall()
        return [self._vm(r) for r in rows]

    def remove_vm(self, name: str) -> None:
        self._db.execute("DELETE FROM vms WHERE name=?", (name,))

    @staticmethod
    def _vm(row: tuple[Any, ...]) -> VMRecord:
        from vmfork.records import VMInfo, VMRecord
        from vmfork.spec import VMSpec

        return VMRecord(name=row[0], spec=VMSpec.from_json(row[1]), state=row[2], pid=row[3],
                        pid_start=row[4], template=row[5], created=row[6],
                        info=VMInfo.from_dict(json.loads(row[7])))

    # -- templates --------------------------------------------------------
    # A template's row is ``ready`` (its manifest is usable), ``creating``
    # (a reservation: the manifest is empty, ``work`` says what is in
    # flight) or ``removing`` (the manifest stays, ``work`` names the
    # remover); see :class:`vmfork.records.TemplateWork`.
    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def add_template(self, manifest: TemplateManifest) -> None:
        try:
            self._db.execute("INSERT INTO templates (name, manifest, created) VALUES (?, ?, ?)",
                             (manifest.name, json.dumps(manifest.to_dict()), manifest.created))
        except sqlite3.IntegrityError as exc:
            raise self.template_conflict(manifest.name) from exc

    def reserve_template(self, work: TemplateWork) -> None:
        """Take the name of a new template: a row in state ``creating``
        holding *work*; the error of :meth:`template_conflict` if the name
        is taken."""
        try:
            self._db.execute(
                "INSERT INTO templates (name, manifest, created, state, work)"
                " VALUES (?, '{}', ?, 'creating', ?)",
                (work.name, work.started, json.dumps(work.to_dict())))
        except sqlite3.IntegrityError as exc:
            raise self.template_conflict(work.name) from exc

    def template_conflict(self, name: str) -> VmforkError:
        """Why a new template cannot take *name*: AlreadyExists for a
        template, StateError for one being made or removed."""
        found = self.template_work(name)
        if found is None or found[1] is None:
            return AlreadyExists(f"a template named {name!r} exists already")
        state, work = found[0], found[1]
        verb = "created" if state == "creating" else "removed"
        return StateError(f"template {name} is being {verb} by another vmfork command "
                          f"(pid {work.pid})")

    def template_work(self, name: str) -> tuple[str, TemplateWork | None] | None:
        """The state of template *name*'s row and its work in flight (None
        for a ready template); None if there is no row."""
        from vmfork.records import TemplateWork

        row = self._db.execute("SELECT state, work FROM templates WHERE name=?",
                               (name,)).fetchone()
        if row is None:
            return None
        work = TemplateWork.from_dict(json.loads(row[1])) if row[1] else None
        return str(row[0]), work

    def template_works(self) -> list[tuple[str, TemplateWork]]:
        """Every template being made or removed (state, work), oldest first."""
        from vmfork.records import TemplateWork

        rows = self._db.execute("SELECT state, work FROM templates WHERE state != 'ready'"
                                " AND work IS NOT NULL ORDER BY created").fetchall()
        return [(str(r[0]), TemplateWork.from_dict(json.loads(r[1]))) for r in rows]

    def set_template_work(self, work: TemplateWork) -> None:
        """Record how far the work on a template being made or removed got."""
        self._db.execute("UPDATE templates SET work=? WHERE name=? AND state != 'ready'",
                         (json.dumps(work.to_dict()), work.name))

    def finish_template(self, manifest: TemplateManifest, source_vm: str | None) -> None:
        """Turn the reservation of *manifest*'s template into the template
        and remove the VM it was made from, in one transaction."""
        with self._transaction():
            cur = self._db.execute(
                "UPDATE templates SET manifest=?, created=?, state='ready', work=NULL"
                " WHERE name=? AND state='creating'",
                (json.dumps(manifest.to_dict()), manifest.created, manifest.name))
            if cur.rowcount != 1:
                raise StateError(f"template {manifest.name} is no longer reserved")
            if source_vm is not None:
                self._db.execute("DELETE FROM vms WHERE name=?", (source_vm,))

    def set_template_manifest(self, manifest: TemplateManifest) -> None:
        """Replace the manifest of ready template *manifest.name* (a pulled
        template whose memory moved from its FUSE mount to its cache);
        StateError if it is not ready."""
        cur = self._db.execute("UPDATE templates SET manifest=? WHERE name=? AND state='ready'",
                               (json.dumps(manifest.to_dict()), manifest.name))
        if cur.rowcount != 1:
            raise StateError(f"template {manifest.name} is not ready")

    def drop_reservation(self, name: str) -> None:
        """Remove the row of a template being made (not one that is ready)."""
        self._db.execute("DELETE FROM templates WHERE name=? AND state='creating'", (name,))

    def mark_template_removing(self, work: TemplateWork) -> bool:
        """Move a ready template to ``removing`` (clones and pools refuse it
        from now on); False if it was not ready."""
        cur = self._db.execute(
            "UPDATE templates SET state='removing', work=? WHERE name=? AND state='ready'",
            (json.dumps(work.to_dict()), work.name))
        return cur.rowcount == 1

    def get_template(self, name: str, usable: bool = True) -> TemplateManifest:
        """The manifest of template *name* (any version vmfork wrote, read into
        the current layout; TemplateError if unreadable). StateError for a
        template being made, or (with *usable*) being removed."""
        from vmfork.records import TemplateManifest

        row = self._db.execute("SELECT manifest, state FROM templates WHERE name=?",
                               (name,)).fetchone()
        if row is None:
            raise NotFound(f"no template named {name!r}")
        if row[1] == "creating" or (usable and row[1] != "ready"):
            raise StateError(f"template {name} is not complete: it is being "
                             f"{'created' if row[1] == 'creating' else 'removed'}")
        return TemplateManifest.from_json(row[0])

    def template_row(self, name: str) -> tuple[str, str] | None:
        """Template *name*'s manifest as the catalog holds it (JSON text)
        and its state, unparsed; None if there is no such row."""
        row = self._db.execute("SELECT manifest, state FROM templates WHERE name=?",
                               (name,)).fetchone()
        return None if row is None else (str(row[0]), str(row[1]))

    def has_template(self, name: str) -> bool:
        """Whether a row holds *name* (a template, or one being made or removed)."""
        return self._db.execute("SELECT 1 FROM templates WHERE name=?",
                                (name,)).fetchone() is not None

    def template_names(self) -> list[str]:
        """Every template's name, ready or not, oldest first."""
        return [str(r[0]) for r in
                self._db.execute("SELECT name FROM templates ORDER BY created").fetchall()]

    def list_templates(self) -> list[TemplateManifest]:
        """The manifests of the ready templates, oldest first."""
        from vmfork.records import TemplateManifest

        rows = self._db.execute("SELECT manifest FROM templates WHERE state='ready'"
                                " ORDER BY created").fetchall()
        return [TemplateManifest.from_json(r[0]) for r in rows]

    def remove_template(self, name: str) -> None:
        with self._transaction():
            self._db.execute("DELETE FROM templates WHERE name=?", (name,))
            self._db.execute("DELETE FROM pool_targets WHERE template=?", (name,))

    def template_idle_pause(self, name: str) -> float | None:
        """The idle policy of template *name*'s clones (:mod:`vmfork.idle`)."""
        row = self._db.execute("SELECT idle_pause FROM templates WHERE name=?",
                               (name,)).fetchone()
        return float(row[0]) if row and row[0] is not None else None

    def set_template_idle_pause(self, name: str, seconds: float | None) -> None:
        """Set it (None: its clones never pause for idling); NotFound if no
        template is called *name*."""
        cur = self._db.execute("UPDATE templates SET idle_pause=? WHERE name=? AND state='ready'",
                               (seconds, name))
        if cur.rowcount != 1:
            raise NotFound(f"no VM or template named {name!r}")

    # -- warm pool ----------------------------------------------------------
    def add_pool_member(self, m: PoolMember) -> None:
        self._db.execute(
            "INSERT INTO pool_members (id, template, spec, pid, pid_start, created, warm, ready)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (m.id, m.template, m.spec.to_json(), m.pid, m.pid_start, m.created, int(m.warm),
             int(m.ready)))

    def set_pool_member_ready(self, member_id: str) -> None:
        self._db.execute("UPDATE pool_members SET ready=1 WHERE id=?", (member_id,))

    def pool_members(self, template: str | None = None) -> list[PoolMember]:
        """Members of *template*'s pool (of every pool without), oldest first,
        ready or not (:attr:`PoolMember.ready`)."""
        from vmfork.records import PoolMember
        from vmfork.spec import VMSpec

        q = ("SELECT id, template, spec, pid, pid_start, created, warm, ready"
             " FROM pool_members")
        rows = (self._db.execute(q + " WHERE template=? ORDER BY created", (template,))
                if template else self._db.execute(q + " ORDER BY created"))
        return [PoolMember(r[0], r[1], VMSpec.from_json(r[2]), r[3], r[4], r[5], bool(r[6]),
                           bool(r[7])) for r in rows.fetchall()]

    def take_pool_member(self, member_id: str) -> bool:
        """Remove a member from the pool; False if another process took it first."""
        cur = self._db.execute("DELETE FROM pool_members WHERE id=?", (member_id,))
        return cur.rowcount == 1

    def pool_target(self, template: str) -> int:
        row = self._db.execute("SELECT size FROM pool_targets WHERE template=?",
                               (template,)).fetchone()
        return int(row[0]) if row else 0

    def pool_warm(self, template: str) -> bool:
        """Whether the pool of *template* keeps warm members (see PoolMember)."""
        row = self._db.execute("SELECT warm FROM pool_targets WHERE template=?",
                               (template,)).fetchone()
        return bool(row[0]) if row else False

    def set_pool_target(self, template: str, size: int, warm: bool | None = None) -> None:
        """Set the pool size of *template*; *warm* None keeps the current kind."""
        w = self.pool_warm(template) if warm is None else warm
        self._db.execute("INSERT OR REPLACE INTO pool_targets (template, size, warm) "
                         "VALUES (?, ?, ?)", (template, size, int(w)))
