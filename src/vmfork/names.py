"""Names of VMs and templates: what is allowed (they become file names,
socket paths and parts of QEMU options)."""

from __future__ import annotations

import re

from vmfork.errors import InvalidInput

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


def check_name(name: str, what: str = "VM") -> str:
    """Return *name* if it is a valid VM or template name, else raise InvalidInput."""
    if not NAME_RE.fullmatch(name or ""):
        raise InvalidInput(
            f"invalid {what} name {name!r}: use 1-63 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit")
    return name
