"""vmfork: instant clone, live update and save/restore of QEMU VMs whose RAM
lives outside the QEMU process.

The public API, re-exported here (and listed in ``__all__``)::

    import vmfork
    with vmfork.open() as host:                  # vmfork.open_async(): same, awaitable
        vm = host.run("web", image="demo", memory="512M")
        print(vm.exec("uname -r").stdout)
        report = vm.fork(count=2)                # web-1, web-2 branch off; web runs on
        tpl = vm.make_template("base")           # the VM ends
        with tpl.clone() as c:                   # stopped when the block ends
            c.exec("hostname")
    with vmfork.Client(socket_path) as host:     # the same, through vmforkd
        ...

Names are imported on first use, so ``import vmfork`` (and the CLI) stays
cheap. Layers, top down: ``cli``, ``service`` (vmforkd) and ``client`` (its
REST client, which talks to it over HTTP only) → ``api`` → the operations
(``vm``, ``templates``, ``update``, ``snapshots``) → ``guest``, ``qemu``,
``images`` → ``store``, ``records``, ``spec``, ``results``, ``errors``,
``timeouts``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: Public name -> the module that defines it.
_EXPORTS = {
    # entry points and handles
    "open": "vmfork.api.sync", "Host": "vmfork.api.sync", "VM": "vmfork.api.sync",
    "Clone": "vmfork.api.sync", "Template": "vmfork.api.sync",
    "open_async": "vmfork.api.aio", "AsyncHost": "vmfork.api.aio",
    "AsyncVM": "vmfork.api.aio", "AsyncClone": "vmfork.api.aio",
    "AsyncTemplate": "vmfork.api.aio",
    # the REST client of vmforkd (same names and results)
    "Client": "vmfork.client.sync", "AsyncClient": "vmfork.client.aio",
    # results
    "Result": "vmfork.results", "ExecResult": "vmfork.results",
    "VMStatus": "vmfork.results", "CloneResult": "vmfork.results",
    "UpdateReport": "vmfork.results", "SaveResult": "vmfork.results",
    "RestoreResult": "vmfork.results", "ExportResult": "vmfork.results",
    "ImportResult": "vmfork.results", "PoolStatus": "vmfork.results",
    "PoolMemberStatus": "vmfork.results", "TemplateStatus": "vmfork.results",
    "MigrationStats": "vmfork.results", "ForkReport": "vmfork.results",
    "ForkChild": "vmfork.results", "PullResult": "vmfork.results",
    "GuestImage": "vmfork.images.demo",
    # configuration
    "Timeouts": "vmfork.timeouts",
    # errors
    "VmforkError": "vmfork.errors", "InvalidInput": "vmfork.errors",
    "NotFound": "vmfork.errors", "AlreadyExists": "vmfork.errors",
    "SetupError": "vmfork.errors", "DaemonUnreachable": "vmfork.errors",
    "ResourceError": "vmfork.errors",
    "LaunchError": "vmfork.errors",
    "StateError": "vmfork.errors", "GuestError": "vmfork.errors",
    "MigrationError": "vmfork.errors", "TemplateError": "vmfork.errors",
    "SourceError": "vmfork.errors", "PartialClone": "vmfork.errors",
    "VmforkTimeout": "vmfork.errors", "UnsafePath": "vmfork.errors",
}

__all__ = [
    "VM",
    "AlreadyExists",
    "AsyncClient",
    "AsyncClone",
    "AsyncHost",
    "AsyncTemplate",
    "AsyncVM",
    "Client",
    "Clone",
    "CloneResult",
    "DaemonUnreachable",
    "ExecResult",
    "ExportResult",
    "ForkChild",
    "ForkReport",
    "GuestError",
    "GuestImage",
    "Host",
    "ImportResult",
    "InvalidInput",
    "LaunchError",
    "MigrationError",
    "MigrationStats",
    "NotFound",
    "PartialClone",
    "PoolMemberStatus",
    "PoolStatus",
    "PullResult",
    "ResourceError",
    "RestoreResult",
    "Result",
    "SaveResult",
    "SetupError",
    "SourceError",
    "StateError",
    "Template",
    "TemplateError",
    "TemplateStatus",
    "Timeouts",
    "UnsafePath",
    "UpdateReport",
    "VMStatus",
    "VmforkError",
    "VmforkTimeout",
    "__version__",
    "open",
    "open_async",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'vmfork' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:
    from vmfork.api.aio import AsyncClone, AsyncHost, AsyncTemplate, AsyncVM, open_async
    from vmfork.api.sync import VM, Clone, Host, Template, open
    from vmfork.client.aio import AsyncClient
    from vmfork.client.sync import Client
    from vmfork.errors import (
        AlreadyExists,
        DaemonUnreachable,
        GuestError,
        InvalidInput,
        LaunchError,
        MigrationError,
        NotFound,
        PartialClone,
        ResourceError,
        SetupError,
        SourceError,
        StateError,
        TemplateError,
        UnsafePath,
        VmforkError,
        VmforkTimeout,
    )
    from vmfork.images.demo import GuestImage
    from vmfork.results import (
        CloneResult,
        ExecResult,
        ExportResult,
        ForkChild,
        ForkReport,
        ImportResult,
        MigrationStats,
        PoolMemberStatus,
        PoolStatus,
        PullResult,
        RestoreResult,
        Result,
        SaveResult,
        TemplateStatus,
        UpdateReport,
        VMStatus,
    )
    from vmfork.timeouts import Timeouts
