"""``vmfork bench api``: the REST API (vmforkd and its client) against the
in-process library, in one run.

Measures, on one vmfork home that a daemon serves: a clone of a template
(wall time of ``clone()``, a fresh QEMU each, no pool) through
:class:`vmfork.AsyncClient` against :class:`vmfork.AsyncTemplate`; and the
round trip of a trivial guest command (``exec("true")``) both ways. The
samples alternate between the two paths, so that both see the same host
load. Target: a clone through the API within 1.2x + 10 ms of the library.

The daemon is the caller's (``vmfork bench api`` starts one unless given
an address); both paths work on the VM and template this run makes, named
in vmfork's own namespace, and removed at the end.
"""

from __future__ import annotations

import contextlib
import secrets
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from vmfork import vm
from vmfork.api.aio import AsyncHost
from vmfork.client.aio import AsyncClient
from vmfork.errors import GuestError, InvalidInput
from vmfork.names import internal
from vmfork.templates import catalog, create

#: The parts of the bench (``--parts``).
PARTS = ("exec", "clone")
#: The clone target: API time <= RATIO * library time + SLACK seconds.
CLONE_TARGET_RATIO = 1.2
CLONE_TARGET_SLACK = 0.010


@dataclass
class ApiBench:
    """Parameters of one run."""

    samples: int = 5
    exec_samples: int = 30
    memory_mib: int = 256
    accel: str = "auto"
    parts: tuple[str, ...] = PARTS
    progress: Callable[[str], None] = field(default=lambda _msg: None)

    def check(self) -> None:
        unknown = [p for p in self.parts if p not in PARTS]
        if unknown or not self.parts:
            raise InvalidInput(f"unknown bench parts {unknown or '(none)'}: use some of "
                               f"{', '.join(PARTS)}")
        if self.samples < 1 or self.exec_samples < 1:
            raise InvalidInput("the sample counts must be at least 1")


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


async def _timed(aw: Awaitable[Any]) -> tuple[float, Any]:
    t0 = time.monotonic()
    result = await aw
    return time.monotonic() - t0, result


def _pair(lib: list[float], api: list[float]) -> dict[str, float]:
    """Medians of both paths, their ratio and the API's overhead."""
    lib_s, api_s = _median(lib), _median(api)
    return {"library_s": lib_s, "api_s": api_s,
            "ratio": api_s / lib_s if lib_s else float("inf"),
            "overhead_ms": (api_s - lib_s) * 1000}


async def _exec_part(host: AsyncHost, client: AsyncClient, name: str,
                     p: ApiBench) -> dict[str, float]:
    local, remote = await host.vm(name), await client.vm(name)
    for h in (local, remote):  # the first command of each path pays its set-up
        r = await h.exec("true")
        if r.exit_code != 0:
            raise GuestError(f"{name}: 'true' exited {r.exit_code}: {r.stderr.strip()}")
    lib, api = [], []
    for i in range(p.exec_samples):
        if i % 10 == 0:
            p.progress(f"exec round trips {i + 1}-{min(i + 10, p.exec_samples)}"
                       f"/{p.exec_samples}")
        lib.append((await _timed(local.exec("true")))[0])
        api.append((await _timed(remote.exec("true")))[0])
    return _pair(lib, api)


async def _clone_part(host: AsyncHost, client: AsyncClient, tname: str,
                      p: ApiBench) -> dict[str, Any]:
    local, remote = await host.template(tname), await client.template(tname)
    lib: list[float] = []
    api: list[float] = []
    steps: dict[str, list[float]] = {k: [] for k in ("library_running_s", "api_running_s",
                                                     "library_responsive_s",
                                                     "api_responsive_s")}
    for i in range(p.samples):
        p.progress(f"clone {i + 1}/{p.samples}, in-process and through the API")
        # Clones take the template's next free names (a request names only
        # clones in the users' namespace).
        seconds, c = await _timed(local.clone(use_pool=False))
        lib.append(seconds)
        steps["library_running_s"].append(c.result.running)
        steps["library_responsive_s"].append(c.result.responsive)
        await c.stop()
        seconds, rc = await _timed(remote.clone(use_pool=False))
        api.append(seconds)
        steps["api_running_s"].append(rc.result.running)
        steps["api_responsive_s"].append(rc.result.responsive)
        await rc.stop()
    out: dict[str, Any] = _pair(lib, api)
    out.update({k: _median(v) for k, v in steps.items()})
    return out


async def run(host: AsyncHost, client: AsyncClient, p: ApiBench) -> dict[str, Any]:
    """Run the bench on *host*'s home, which the daemon of *client* serves."""
    p.check()
    await client.health()
    tag = secrets.token_hex(2)
    source = internal("bench", f"api-{tag}")
    tname = internal("bench", f"api-{tag}-t")
    store = host.store
    out: dict[str, Any] = {"memory_mib": p.memory_mib, "samples": p.samples,
                           "exec_samples": p.exec_samples, "address": client.address}
    try:
        p.progress(f"boot {source}")
        await vm.run(store, vm.RunOptions(name=source, memory_mib=p.memory_mib, image="demo",
                                          accel=p.accel), host.timeouts)
        if "exec" in p.parts:
            out["exec"] = await _exec_part(host, client, source, p)
        if "clone" in p.parts:
            p.progress(f"template {tname}")
            await create.create_from_vm(store, tname, source, host.timeouts)
            out["clone"] = await _clone_part(host, client, tname, p)
    finally:
        clones = catalog.users(store, tname) if store.has_template(tname) else []
        for name in [*clones, source]:
            if store.has_vm(name):
                with contextlib.suppress(Exception):
                    await vm.stop(store, name, force=True, timeouts=host.timeouts)
        if store.has_template(tname):
            with contextlib.suppress(Exception):
                await catalog.remove(store, tname, force=True, timeouts=host.timeouts)
    if "clone" in out:
        c = out["clone"]
        out["targets"] = {
            f"clone_api<={CLONE_TARGET_RATIO}x+{CLONE_TARGET_SLACK * 1000:.0f}ms":
                c["api_s"] <= CLONE_TARGET_RATIO * c["library_s"] + CLONE_TARGET_SLACK}
    else:
        out["targets"] = {}
    return out


def rows(result: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """Table rows: metric, through the API, in-process, ratio."""
    r = []
    if "clone" in result:
        c = result["clone"]
        r.append(("clone (fresh QEMU), wall", f"{c['api_s'] * 1000:.1f} ms",
                  f"{c['library_s'] * 1000:.1f} ms",
                  f"{c['ratio']:.2f}x, +{c['overhead_ms']:.1f} ms "
                  f"(target {CLONE_TARGET_RATIO}x + {CLONE_TARGET_SLACK * 1000:.0f} ms)"))
        for step in ("running", "responsive"):
            a, b = c[f"api_{step}_s"], c[f"library_{step}_s"]
            r.append((f"clone to {step} (the clone's own timing)", f"{a * 1000:.1f} ms",
                      f"{b * 1000:.1f} ms", f"{a / b:.2f}x" if b else "-"))
    if "exec" in result:
        e = result["exec"]
        r.append(("exec round trip ('true')", f"{e['api_s'] * 1000:.1f} ms",
                  f"{e['library_s'] * 1000:.1f} ms",
                  f"{e['ratio']:.2f}x, +{e['overhead_ms']:.1f} ms"))
    return r


def title(result: dict[str, Any]) -> str:
    counts = [f"{result['samples']} clones"] if "clone" in result else []
    counts += [f"{result['exec_samples']} commands"] if "exec" in result else []
    return (f"vmfork bench api (demo guest, {result['memory_mib']} MiB, "
            f"{' and '.join(counts)} per path; daemon at {result['address']})")


__all__ = ["PARTS", "ApiBench", "rows", "run", "title"]
