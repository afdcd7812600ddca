"""The REST API's OpenAPI document and its committed copy.

Owns :func:`document` (what ``GET /openapi.json`` serves, built from an
application on a throwaway home) and :func:`render` (its text, as committed
in ``docs/openapi.json``). The copy is the contract clients are written
against; a test fails when the served document drifts from it. Regenerate
it with ``make openapi`` (``vmfork serve --print-openapi >
docs/openapi.json``) after changing a route.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
from typing import Any

from vmfork.api.aio import AsyncHost
from vmfork.service.app import create_app
from vmfork.service.state import ServiceState

#: Where the committed copy lives, relative to the repository.
COPY = "docs/openapi.json"


def document() -> dict[str, Any]:
    """The OpenAPI document the daemon serves."""
    with tempfile.TemporaryDirectory(prefix="vmfork-openapi") as home:
        host = AsyncHost(home)
        try:
            doc: dict[str, Any] = create_app(ServiceState(host=host)).openapi()
        finally:
            asyncio.run(host.close())
    return doc


def render(doc: dict[str, Any] | None = None) -> str:
    """The text of ``docs/openapi.json``."""
    return json.dumps(document() if doc is None else doc, indent=2, sort_keys=True) + "\n"


__all__ = ["COPY", "document", "render"]
