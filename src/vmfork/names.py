"""Names of VMs and templates: what is allowed (they become file names,
socket paths and parts of QEMU options), and the two namespaces.

* **Users' names** start with a letter or digit: ``web1``, ``base``.
* **vmfork's own names** start with ``_`` (:data:`INTERNAL_PREFIX`): pool
  members (``_pool.<template>.<6 hex>``), the VM a template is built from
  (``_build.<template>``), the temporary VM of an import
  (``_import.<8 hex>``) and benchmark VMs and templates (``_bench.*``).
  They are made by :func:`internal` and marked as :class:`InternalName`.

:func:`check_name` accepts any name vmfork may have stored (either
namespace): it guards lookups and paths. :func:`check_new_name` is the check
for the name of a *new* VM or template: it refuses names in vmfork's
namespace unless vmfork made them, and template names too long for the
names derived from them (:data:`MAX_TEMPLATE_NAME`). Socket paths, which
depend on ``$VMFORK_HOME``, are checked by
:meth:`vmfork.store.Store.check_new_name`.
"""

from __future__ import annotations

import re

from vmfork.errors import InvalidInput

#: Longest VM name (and of every name vmfork derives).
MAX_NAME = 63
#: vmfork's own names start with this; users' names may not.
INTERNAL_PREFIX = "_"
#: Hex digits of a pool member's id (``_pool.<template>.<hex>``).
POOL_ID_HEX = 6
#: Longest template name: its pool members' ids,
#: ``_pool.<template>.<6 hex>``, must still be valid names (13 characters
#: more), and so must ``_build.<template>`` and its clones ``<template>-<k>``.
MAX_TEMPLATE_NAME = MAX_NAME - len(f"{INTERNAL_PREFIX}pool..") - POOL_ID_HEX

NAME_RE = re.compile(rf"^[A-Za-z0-9_][A-Za-z0-9_.-]{{0,{MAX_NAME - 1}}}$")


class InternalName(str):
    """A name vmfork made for a VM or template of its own (:func:`internal`);
    :func:`check_new_name` lets it through."""

    __slots__ = ()


def check_name(name: str, what: str = "VM") -> str:
    """Return *name* if it is a valid VM or template name of either namespace
    (one vmfork may have stored), else raise InvalidInput."""
    if not NAME_RE.fullmatch(name or ""):
        raise InvalidInput(
            f"invalid {what} name {name!r}: use 1-{MAX_NAME} letters, digits, '.', '_' or '-', "
            "starting with a letter or digit")
    return name


def is_internal(name: str) -> bool:
    """Whether *name* is in vmfork's own namespace."""
    return name.startswith(INTERNAL_PREFIX)


def check_new_name(name: str, what: str = "VM") -> str:
    """Return *name* if a new VM (or template, *what* ``"template"``) may
    take it: a valid name in the users' namespace (or an
    :class:`InternalName`), a template's no longer than
    :data:`MAX_TEMPLATE_NAME`; else raise InvalidInput saying why."""
    check_name(name, what)
    if is_internal(name) and not isinstance(name, InternalName):
        raise InvalidInput(
            f"invalid {what} name {name!r}: names starting with {INTERNAL_PREFIX!r} are "
            "vmfork's own (pool members, template builds, imports, benchmarks); start it "
            "with a letter or digit")
    if what == "template" and len(name) > MAX_TEMPLATE_NAME:
        raise InvalidInput(
            f"invalid template name {name!r} ({len(name)} characters): at most "
            f"{MAX_TEMPLATE_NAME}, so that the names vmfork derives from it (its pool "
            f"members' '{INTERNAL_PREFIX}pool.<template>.<{POOL_ID_HEX} hex>') fit in {MAX_NAME}")
    return name


def internal(kind: str, *parts: str) -> InternalName:
    """vmfork's own name ``_<kind>.<part>.<part>...`` (InvalidInput if the
    result is not a valid name)."""
    return InternalName(check_name(".".join((f"{INTERNAL_PREFIX}{kind}", *parts))))


def pool_member_name(template: str, token: str) -> InternalName:
    """The id of a pool member of *template*: ``_pool.<template>.<token>``."""
    return internal("pool", template, token)


def build_name(template: str) -> InternalName:
    """The VM that ``template create --demo`` boots and freezes into *template*."""
    return internal("build", template)


def pool_lock(template: str) -> str:
    """The lock under which the pool of *template* changes (no VM can be
    named like it: it is in vmfork's namespace)."""
    return f"{INTERNAL_PREFIX}pool.{template}"


def template_lock(template: str) -> str:
    """The lock held by whoever makes, removes or recovers *template*
    (:mod:`vmfork.templates.recovery`); in vmfork's namespace."""
    return f"{INTERNAL_PREFIX}template.{template}"


def derived(base: str, suffix: str) -> str:
    """``base + suffix`` (a clone's name from its template's): in vmfork's
    namespace if *base* is."""
    name = base + suffix
    return InternalName(name) if is_internal(base) else name
