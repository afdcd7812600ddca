"""The ``vmfork`` command: a thin layer of click commands over the public API
(:mod:`vmfork.api`).

Owns argument parsing and output: one line of text per result, or with
``--json`` the result's ``to_dict()``; errors as one line on stderr with an
exit status from one table (:mod:`.app`). Commands are loaded when used, so
that ``vmfork ls`` starts in a few tens of milliseconds."""
