"""Live fork: branch a running VM into children that start from its exact
state at one instant, while it keeps running.

Public entry point: :func:`fork` (:mod:`vmfork.fork.run`)."""

from vmfork.fork.run import fork

__all__ = ["fork"]
