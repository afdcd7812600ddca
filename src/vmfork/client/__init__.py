"""vmfork's REST client: the public API's names and results, over vmforkd.

Two flavours, like :mod:`vmfork.api`: synchronous (:mod:`.sync`:
:class:`Client` → :class:`RemoteVM`, :class:`RemoteTemplate`) and asyncio
(:mod:`.aio`: :class:`AsyncClient` → :class:`AsyncRemoteVM`, ...), on httpx,
to a UNIX socket or an ``http(s)://`` URL. A layer beside the CLI: it talks
to the daemon (:mod:`vmfork.service`) only through HTTP and imports neither
it nor the operations: below it are only the value modules (``results``,
``records``, ``errors``), ``loopthread``, and ``store`` for the default
socket's path.

``Client`` and ``AsyncClient`` are re-exported from :mod:`vmfork`; the handle
classes are in the two modules."""
