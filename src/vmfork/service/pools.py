"""Pools kept by the daemon: one keeper task per template with a pool target.

Owns :class:`PoolKeepers`. A keeper brings its template's pool to its target
(:func:`vmfork.templates.pool.fill_pool`: members whose QEMU died or of the
wrong kind are dropped, missing ones spawned, a warm pool stays warm), then
waits :data:`KEEP_INTERVAL` seconds, or less when a clone took a member
(:meth:`PoolKeepers.wake`), and does it again. Each refill that added
members is an event (``pool_refilled``), each member found dead one too
(``pool_member_died``). A refill that fails is retried with a growing wait
(up to :data:`BACKOFF_MAX` s); a :class:`~vmfork.errors.TemplateError` (the
template no longer matches its files or QEMU) ends the keeper with a
``pool_failed`` event, and it is started again only after
:data:`FAILED_RETRY` seconds or a new ``PUT .../pool``.

This is the loop of :func:`vmfork.templates.pool.keep` (``vmfork pool T
--keep``) with what a daemon adds: events, a wake-up from the clone route,
and keepers started for every template whose pool has a target, whoever set
it (the reconcile loop calls :meth:`PoolKeepers.ensure`). A keeper ends when
the target is 0 or the template is removed. Members outlive the daemon; a
member a killed daemon was spawning is dropped by the next refill. The
pool's lock makes a keeper and any ``vmfork pool`` command take turns.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from vmfork.errors import TemplateError, VmforkError
from vmfork.proc import process_alive
from vmfork.service import events
from vmfork.service.state import ServiceState
from vmfork.tasks import cancel_all
from vmfork.templates import pool

log = logging.getLogger("vmfork.service.pools")

#: Seconds between two refills of a pool when no clone wakes its keeper.
KEEP_INTERVAL = 1.0
#: Longest wait after refills that failed in a row (it doubles each time).
BACKOFF_MAX = 60.0
#: Seconds before a keeper that ended on a TemplateError is started again.
FAILED_RETRY = 60.0


@dataclass
class Keeper:
    template: str
    task: asyncio.Task[None] | None = None
    wake: asyncio.Event = field(default_factory=asyncio.Event)


class PoolKeepers:
    """The keeper tasks of the daemon's pools."""

    def __init__(self, state: ServiceState) -> None:
        self.state = state
        self._keepers: dict[str, Keeper] = {}
        self._failed: dict[str, float] = {}
        self._held: set[str] = set()

    @property
    def templates(self) -> list[str]:
        """The templates whose pool is being kept now."""
        return sorted(n for n, k in self._keepers.items() if k.task and not k.task.done())

    def ensure(self, template: str, *, retry: bool = False) -> None:
        """Start *template*'s keeper unless it runs, is held off
        (:meth:`stopped`), or failed less than :data:`FAILED_RETRY` s ago
        (unless *retry*)."""
        if self.state.stopping.is_set() or template in self._held:
            return
        k = self._keepers.get(template)
        if k is not None and k.task is not None and not k.task.done():
            return
        failed = self._failed.get(template)
        if failed is not None and not retry and time.monotonic() - failed < FAILED_RETRY:
            return
        self._failed.pop(template, None)
        k = self._keepers[template] = Keeper(template)
        k.task = asyncio.create_task(self._keep(k), name=f"pool keeper {template}")

    def wake(self, template: str) -> None:
        """Refill *template*'s pool now (a clone took a member)."""
        k = self._keepers.get(template)
        if k is not None:
            k.wake.set()

    async def stop(self, template: str) -> None:
        """End *template*'s keeper; a member being spawned is killed and removed."""
        k = self._keepers.pop(template, None)
        if k is not None and k.task is not None:
            await cancel_all([k.task])

    @contextlib.asynccontextmanager
    async def stopped(self, template: str) -> AsyncIterator[None]:
        """End *template*'s keeper and start none for it until the block ends
        (its removal)."""
        self._held.add(template)
        try:
            await self.stop(template)
            yield
        finally:
            self._held.discard(template)

    async def stop_all(self) -> None:
        keepers = list(self._keepers.values())
        self._keepers.clear()
        await cancel_all([k.task for k in keepers if k.task is not None])

    async def _keep(self, k: Keeper) -> None:
        store = self.state.host.store
        name = k.template
        failures = 0
        log.info("pool %s: kept by the daemon", name)
        try:
            while not self.state.stopping.is_set() and store.has_template(name):
                target = store.pool_target(name)
                if target == 0:
                    break
                k.wake.clear()
                ready, dead = _look(self.state, name)
                for member_id in dead:
                    events.publish(self.state, "pool_member_died", template=name,
                                   member=member_id)
                try:
                    live = await pool.fill_pool(store, name, self.state.host.timeouts)
                except TemplateError as exc:
                    self._failed[name] = time.monotonic()
                    log.warning("pool %s: not kept any more: %s", name, exc)
                    events.publish(self.state, "pool_failed", template=name,
                                   message=" ".join(str(exc).split())[:500])
                    return
                except VmforkError as exc:
                    failures += 1
                    log.warning("pool %s: refill failed (%s); retrying", name, exc)
                else:
                    failures = 0
                    if live > ready:
                        events.publish(self.state, "pool_refilled", template=name,
                                       added=live - ready, ready=live, target=target,
                                       warm=store.pool_warm(name))
                pause = min(KEEP_INTERVAL * 2 ** failures, BACKOFF_MAX)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(pause):
                        await k.wake.wait()
        finally:
            log.info("pool %s: keeper stopped", name)


def _look(state: ServiceState, template: str) -> tuple[int, list[str]]:
    """The ready members of *template*'s pool whose QEMU runs, and the ids
    of those whose QEMU is gone."""
    ready, dead = 0, []
    for m in state.host.store.pool_members(template):
        if not m.ready:
            continue
        if process_alive(m.pid, m.pid_start):
            ready += 1
        else:
            dead.append(m.id)
    return ready, dead


def keepers_of(state: ServiceState) -> PoolKeepers:
    """The daemon's pool keepers (made on first use)."""
    k = state.parts.get("pools")
    if not isinstance(k, PoolKeepers):
        k = state.parts["pools"] = PoolKeepers(state)
    return k


__all__ = ["BACKOFF_MAX", "FAILED_RETRY", "KEEP_INTERVAL", "PoolKeepers", "keepers_of"]
