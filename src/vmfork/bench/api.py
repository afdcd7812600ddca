"""``vmfork bench api``: the REST API (vmforkd and its client) against the
in-process library, in one run.

Measures, on one vmfork home that a daemon serves: a clone of a template
(wall time of ``clone()``, a fresh QEMU each, no pool) through
:class:`vmfork.AsyncClient` against :class:`vmfork.AsyncTemplate`; and the
round trip of a trivial guest command (``exec("true")``) both ways. The
samples alternate between the two paths, so that both see the same host
load. Target: a clone through the API within 1.2x + 10 ms of the library.

The part ``concurrent`` fires N clone requests at once (``POST
/v1/templates/T/clones {"count": 1}``, each on its own connection) and
reports the latency of those answered 201 (p50, p99) and the answers by
status. Targets: every request is answered 201, or refused with 429 or 503
and ``Retry-After``; and nothing is lost or leaked: every 201 clone is in
the catalog, running, and answers a command, no other clone of the template
exists (a refused request left nothing), and the home's QEMU processes are
exactly those of its VMs and pool members. The part stops its clones and
checks that the home's QEMU processes are those it had before.

The daemon is the caller's (``vmfork bench api`` starts one unless given
an address); both paths work on the VM and template this run makes, named
in vmfork's own namespace, and removed at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import secrets
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

from vmfork import vm
from vmfork.api.aio import AsyncHost
from vmfork.client.aio import AsyncClient
from vmfork.errors import GuestError, InvalidInput, NotFound, VmforkError
from vmfork.listing import observed_state
from vmfork.names import internal
from vmfork.store import Store
from vmfork.templates import catalog, create

#: The parts of the bench (``--parts``).
PARTS = ("exec", "clone", "concurrent")
#: Clone requests fired at once by the part ``concurrent``.
CONCURRENT = 50
#: Seconds one of those requests may wait for its answer (a queued request
#: waits for a start slot, up to the daemon's --start-wait, then clones).
CONCURRENT_ANSWER_SECONDS = 900.0
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
    concurrent: int = CONCURRENT
    progress: Callable[[str], None] = field(default=lambda _msg: None)

    def check(self) -> None:
        unknown = [p for p in self.parts if p not in PARTS]
        if unknown or not self.parts:
            raise InvalidInput(f"unknown bench parts {unknown or '(none)'}: use some of "
                               f"{', '.join(PARTS)}")
        if self.samples < 1 or self.exec_samples < 1 or self.concurrent < 1:
            raise InvalidInput("the sample counts must be at least 1")


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


async def _timed(aw: Awaitable[Any]) -> tuple[float, Any]:
    t0 = time.monotonic()
    result = await aw
    return time.monotonic() - t0, result


def _percentile(xs: list[float], q: float) -> float:
    """The nearest-rank *q* quantile of *xs* (NaN if empty)."""
    if not xs:
        return float("nan")
    ordered = sorted(xs)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


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


def home_qemus(store: Store) -> set[int]:
    """The live QEMU processes of *store*'s home (their argv names its
    sockets), whether the catalog knows them or not."""
    marker = f"{store.home}{os.sep}"
    found = set()
    for proc in psutil.process_iter(["cmdline", "status"]):
        with contextlib.suppress(psutil.Error):
            argv = proc.info["cmdline"] or []
            if (argv and Path(argv[0]).name.startswith("qemu-system")
                    and proc.info["status"] != psutil.STATUS_ZOMBIE
                    and any(marker in a for a in argv)):
                found.add(proc.pid)
    return found


def catalog_qemus(store: Store) -> set[int]:
    """The QEMU processes the catalog records: its VMs' and pool members'."""
    pids = {r.pid for r in store.list_vms() if r.pid is not None}
    for t in store.template_names():
        pids.update(m.pid for m in store.pool_members(t) if m.pid is not None)
    return pids


@dataclass
class Answer:
    """One of the concurrent clone requests: its status (0: no answer),
    seconds, the clone it made, and whether a refusal had Retry-After."""

    status: int
    seconds: float
    clone: str | None = None
    retry_after: bool = False
    error: str = ""


async def _one_clone_request(client: AsyncClient, tname: str) -> Answer:
    async with client.connection(CONCURRENT_ANSWER_SECONDS) as http:
        t0 = time.monotonic()
        try:
            r = await http.post(f"/v1/templates/{tname}/clones", json={"count": 1})
        except httpx.HTTPError as exc:
            return Answer(0, time.monotonic() - t0, error=f"{type(exc).__name__}: {exc}")
        seconds = time.monotonic() - t0
    if r.status_code == 201:
        return Answer(201, seconds, clone=r.json()["clones"][0]["name"])
    return Answer(r.status_code, seconds, retry_after="retry-after" in r.headers,
                  error=" ".join(r.text.split())[:200])


async def _concurrent_part(host: AsyncHost, client: AsyncClient, tname: str,
                           p: ApiBench) -> dict[str, Any]:
    store = host.store
    before = home_qemus(store)
    p.progress(f"{p.concurrent} clone requests at once")
    answers = await asyncio.gather(*(_one_clone_request(client, tname)
                                     for _ in range(p.concurrent)))
    made = [a.clone for a in answers if a.clone is not None]
    refused = [a for a in answers if a.status in (429, 503)]
    other = [a for a in answers if a.status not in (201, 429, 503)]
    out: dict[str, Any] = {
        "requests": p.concurrent,
        "p50_s": _percentile([a.seconds for a in answers if a.clone], 0.5),
        "p99_s": _percentile([a.seconds for a in answers if a.clone], 0.99),
        "refused_p50_s": _percentile([a.seconds for a in refused], 0.5),
        "answers": {"201": len(made), "429": sum(a.status == 429 for a in refused),
                    "503": sum(a.status == 503 for a in refused), "other": len(other)},
        "retry_after_on_every_refusal": all(a.retry_after for a in refused),
        "other_errors": sorted({f"{a.status}: {a.error}" for a in other})[:5],
    }
    problems: list[str] = []
    try:
        p.progress(f"check {len(made)} clones: in the catalog, running, answering")
        if len(set(made)) != len(made):
            problems.append("two requests answered with one clone")
        users = set(catalog.users(store, tname))
        problems += [f"{n}: answered 201 but not in the catalog" for n in set(made) - users]
        problems += [f"{n}: a clone no request was answered with" for n in users - set(made)]
        for name in sorted(set(made) & users):
            state = observed_state(store.get_vm(name))
            if state != "running":
                problems.append(f"{name}: {state}")
                continue
            try:
                r = await (await client.vm(name)).exec("true")
                if r.exit_code != 0:
                    problems.append(f"{name}: 'true' exited {r.exit_code}")
            except VmforkError as exc:
                problems.append(f"{name}: exec failed: {exc}")
        running, recorded = home_qemus(store), catalog_qemus(store)
        problems += [f"QEMU {pid} of the home is no VM's or pool member's"
                     for pid in sorted(running - recorded)]
        out["qemu_processes"] = len(running)
        out["vms_and_pool_members"] = len(recorded)
    finally:
        p.progress(f"stop {len(made)} clones")
        for name in made:
            with contextlib.suppress(NotFound):
                await (await client.vm(name)).stop(force=True)
    left = home_qemus(store) - before
    problems += [f"QEMU {pid} left after the clones were stopped" for pid in sorted(left)]
    problems += [f"{n}: left after it was stopped" for n in catalog.users(store, tname)]
    out["problems"] = problems[:20]
    out["nothing_lost_or_leaked"] = not problems
    out["every_request_answered"] = not other and out["retry_after_on_every_refusal"]
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
        if "clone" in p.parts or "concurrent" in p.parts:
            p.progress(f"template {tname}")
            await create.create_from_vm(store, tname, source, host.timeouts)
        if "clone" in p.parts:
            out["clone"] = await _clone_part(host, client, tname, p)
        if "concurrent" in p.parts:
            out["concurrent"] = await _concurrent_part(host, client, tname, p)
    finally:
        clones = catalog.users(store, tname) if store.has_template(tname) else []
        for name in [*clones, source]:
            if store.has_vm(name):
                with contextlib.suppress(Exception):
                    await vm.stop(store, name, force=True, timeouts=host.timeouts)
        if store.has_template(tname):
            with contextlib.suppress(Exception):
                await catalog.remove(store, tname, force=True, timeouts=host.timeouts)
    targets: dict[str, bool] = {}
    if "clone" in out:
        c = out["clone"]
        targets[f"clone_api<={CLONE_TARGET_RATIO}x+{CLONE_TARGET_SLACK * 1000:.0f}ms"] = (
            c["api_s"] <= CLONE_TARGET_RATIO * c["library_s"] + CLONE_TARGET_SLACK)
    if "concurrent" in out:
        c = out["concurrent"]
        targets[f"{c['requests']}_concurrent_clones: each 201, or 429/503 with Retry-After"
                ] = c["every_request_answered"]
        targets[f"{c['requests']}_concurrent_clones: nothing lost, nothing leaked"] = (
            c["nothing_lost_or_leaked"])
    out["targets"] = targets
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
    if "concurrent" in result:
        c = result["concurrent"]
        a = c["answers"]
        r.append((f"{c['requests']} concurrent clone requests, 201s: p50 / p99",
                  f"{c['p50_s'] * 1000:.0f} ms / {c['p99_s'] * 1000:.0f} ms", "-",
                  f"refusals answered in {c['refused_p50_s'] * 1000:.0f} ms (p50)"
                  if a["429"] + a["503"] else "-"))
        r.append(("  answers 201 / 429 / 503 / other",
                  f"{a['201']} / {a['429']} / {a['503']} / {a['other']}", "-",
                  "-" if not a["429"] + a["503"]
                  else "Retry-After on every refusal" if c["retry_after_on_every_refusal"]
                  else "a refusal WITHOUT Retry-After"))
        r.append(("  nothing lost, nothing leaked",
                  "yes" if c["nothing_lost_or_leaked"] else "; ".join(c["problems"][:3]),
                  "-", f"{c.get('qemu_processes', '?')} QEMU processes, "
                       f"{c.get('vms_and_pool_members', '?')} VMs and pool members"))
    return r


def title(result: dict[str, Any]) -> str:
    counts = [f"{result['samples']} clones"] if "clone" in result else []
    counts += [f"{result['exec_samples']} commands"] if "exec" in result else []
    parts = [f"{' and '.join(counts)} per path"] if counts else []
    if "concurrent" in result:
        parts.append(f"{result['concurrent']['requests']} concurrent clone requests")
    return (f"vmfork bench api (demo guest, {result['memory_mib']} MiB, "
            f"{', '.join(parts)}; daemon at {result['address']})")


__all__ = ["CONCURRENT", "PARTS", "Answer", "ApiBench", "catalog_qemus", "home_qemus", "rows",
           "run", "title"]
