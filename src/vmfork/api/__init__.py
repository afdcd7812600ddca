"""vmfork's public API, in two flavours with the same names: synchronous
(:mod:`.sync`: :func:`open` → :class:`Host`, :class:`VM`, :class:`Template`)
and asyncio (:mod:`.aio`: :func:`open_async` → :class:`AsyncHost`, ...).

Everything here is re-exported from :mod:`vmfork`; import it from there."""
