"""Live fork: branch a running VM into children that start from its exact
state at one instant, while it keeps running.

The package, one job per module (arrows point down)::

    run        fork(): the order of one fork, under the parent's lock
     +-- recovery   settle a fork a killed vmfork left behind
     +-- rebase     the parent's side: freeze, move onto the frozen state, undo
          +-- base      fork bases: the frozen state as an internal template
          +-- stream    device state without RAM, loadable by migrate-incoming
          +-- pages     written pages of a private mapping; sparse file copies

Public entry point: :func:`fork` (loaded on first use, so that importing a
submodule does not load the whole package).
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["fork"]


def __getattr__(name: str) -> Any:
    if name == "fork":
        return importlib.import_module("vmfork.fork.run").fork
    raise AttributeError(name)
