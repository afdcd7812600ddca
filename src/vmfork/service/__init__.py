"""vmforkd: vmfork's REST API v1 over HTTP, on a UNIX socket or TCP.

A layer beside the CLI, on top of the public async API (:mod:`vmfork.api`):
the daemon holds one :class:`~vmfork.api.aio.AsyncHost` and answers JSON
requests with the same result types (their ``to_dict()``). VMs do not belong
to the daemon process: they live in ``$VMFORK_HOME`` like those the CLI
starts, and outlive it.

Modules: :mod:`~vmfork.service.app` (the FastAPI application, error answers,
authentication), :mod:`~vmfork.service.state` (what the routes share),
:mod:`~vmfork.service.vms` (``/v1/vms``), :mod:`~vmfork.service.forks`
(``/v1/vms/{name}/fork``), :mod:`~vmfork.service.templates`
(``/v1/templates``: templates, clones, pools), :mod:`~vmfork.service.pools`
(pools kept by the daemon), :mod:`~vmfork.service.reconcile` (the background
loop: dead VMs, abandoned launches, keepers), :mod:`~vmfork.service.events`
(``/v1/events``), :mod:`~vmfork.service.operations` (202 and
``/v1/operations``: export, import, image builds),
:mod:`~vmfork.service.metrics` (``/metrics``), :mod:`~vmfork.service.gate`
(the bounded start queue), :mod:`~vmfork.service.openapi` (the committed
API description), :mod:`~vmfork.service.server` (uvicorn on a socket, TLS,
signals).
"""
