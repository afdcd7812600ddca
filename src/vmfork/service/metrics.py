"""``GET /metrics``: the daemon's Prometheus metrics.

Owns :class:`Metrics`, on a registry of its own (not prometheus-client's
global one). Recorded as things happen:

* ``vmfork_clone_duration_seconds{template,source}`` (histogram): seconds
  from a clone's start to its guest answering with its own identity
  (:attr:`~vmfork.results.CloneResult.responsive`); *source* is ``fresh``
  (a new QEMU), ``pool`` (a cold pool member) or ``warm`` (a warm one);
* ``vmfork_operation_duration_seconds{op}`` (histogram) and
  ``vmfork_operations_total{op,result}`` (counter, *result* ``done`` or
  ``failed``): the daemon's operations (``export``, ``import``, ``image``)
  and its clone, fork and template-create requests (``clone``, ``fork``,
  ``template_create``);
* ``vmfork_fork_parent_pause_seconds`` (histogram): how long a forked VM
  was paused (:attr:`~vmfork.results.ForkReport.parent_pause_ms`), and
  ``vmfork_fork_children_total`` (counter): the children forks started.

Read from the catalog and ``/proc`` at each scrape:

* ``vmfork_vms{state}``: VMs by observed state (``dead`` for a QEMU gone);
* ``vmfork_qemu_processes``: live QEMU processes of VMs and pool members;
* ``vmfork_pool_ready{template,kind}`` (*kind* ``warm``/``cold``) and
  ``vmfork_pool_target{template}``;
* ``vmfork_template_memory_bytes{template}``: each ready template's memory;
* ``vmfork_clone_memory_bytes{kind}``: host memory of the clones' QEMU
  processes (``/proc/PID/smaps_rollup``), summed: ``private`` is their
  anonymous memory (pages a clone wrote: copies of the template's, and
  QEMU's own heap), ``shared`` the rest of their resident memory — file
  pages, the template's memory file above all, that the clones map without
  copying (each clone counts those it maps, so the sum counts a page once
  per clone that maps it).

Labels are bounded: templates come from the catalog (a removed template's
series are dropped, :meth:`Metrics.forget_template`), states, sources, kinds
and operation names are fixed sets; no VM names.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from vmfork.errors import NotFound
from vmfork.listing import LIVE_STATES, observed_state
from vmfork.proc import process_alive
from vmfork.results import CloneResult, ForkReport
from vmfork.service import operations
from vmfork.service.state import ServiceState, state_of

router = APIRouter(tags=["metrics"])

#: Clone sources (the ``source`` label).
SOURCES = ("fresh", "pool", "warm")
#: VM states always reported (0 when none); others appear when seen.
STATES = ("starting", "running", "paused", "updating", "saved", "dead", "abandoned")
#: Buckets of the clone histogram, in seconds.
CLONE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
#: Buckets of the fork pause histogram, in seconds.
FORK_PAUSE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
#: Buckets of the operation histogram, in seconds.
OPERATION_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0)


def clone_source(result: CloneResult, warm_pool: bool) -> str:
    """Where a clone's QEMU came from; *warm_pool*: the pool kept warm members."""
    if not result.pooled:
        return "fresh"
    return "warm" if warm_pool else "pool"


def smaps_rollup(pid: int) -> dict[str, int]:
    """The fields of ``/proc/PID/smaps_rollup`` in bytes."""
    fields: dict[str, int] = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            key, _, rest = line.partition(":")
            parts = rest.split()
            if len(parts) == 2 and parts[1] == "kB" and parts[0].isdigit():
                fields[key] = int(parts[0]) * 1024
    return fields


class CatalogCollector(Collector):
    """The gauges read from the catalog and /proc at each scrape."""

    def __init__(self, state: ServiceState) -> None:
        self.state = state

    def collect(self) -> Iterator[Metric]:
        store = self.state.host.store
        vms = GaugeMetricFamily("vmfork_vms", "VMs by observed state", labels=["state"])
        counts = dict.fromkeys(STATES, 0)
        qemus = 0
        shared = private = 0
        for rec in store.list_vms():
            state = observed_state(rec)
            counts[state] = counts.get(state, 0) + 1
            if state in LIVE_STATES and process_alive(rec.pid, rec.pid_start):
                qemus += 1
                if rec.template and rec.pid is not None:
                    with contextlib.suppress(OSError):
                        m = smaps_rollup(rec.pid)
                        private += m.get("Anonymous", 0)
                        shared += m.get("Rss", 0) - m.get("Anonymous", 0)
        for state, n in sorted(counts.items()):
            vms.add_metric([state], n)
        yield vms
        ready = GaugeMetricFamily("vmfork_pool_ready",
                                  "Pool members ready for a clone, by kind (warm, cold)",
                                  labels=["template", "kind"])
        target = GaugeMetricFamily("vmfork_pool_target", "The size a pool is kept at",
                                   labels=["template"])
        for name in store.template_names():
            kinds = {"warm": 0, "cold": 0}
            for member in store.pool_members(name):
                if member.ready and process_alive(member.pid, member.pid_start):
                    qemus += 1
                    kinds["warm" if member.warm else "cold"] += 1
            for kind, k in kinds.items():
                ready.add_metric([name, kind], k)
            with contextlib.suppress(NotFound):
                target.add_metric([name], store.pool_target(name))
        yield ready
        yield target
        memory = GaugeMetricFamily("vmfork_template_memory_bytes",
                                   "Guest memory of a template", labels=["template"])
        for manifest in store.list_templates():
            memory.add_metric([manifest.name], manifest.memory_size)
        yield memory
        clones = GaugeMetricFamily("vmfork_clone_memory_bytes",
                                   "Host memory of the clones' QEMU processes: private "
                                   "(anonymous) and shared (file pages, the template's "
                                   "memory), summed over clones", labels=["kind"])
        clones.add_metric(["shared"], shared)
        clones.add_metric(["private"], private)
        yield clones
        yield GaugeMetricFamily("vmfork_qemu_processes",
                                "Live QEMU processes of VMs and pool members", value=qemus)


class Metrics:
    """The daemon's registry and the metrics it records as things happen."""

    def __init__(self, state: ServiceState) -> None:
        self.registry = CollectorRegistry()
        self.clone_seconds = Histogram(
            "vmfork_clone_duration_seconds",
            "Seconds from a clone's start to its guest answering with its own identity",
            ["template", "source"], buckets=CLONE_BUCKETS, registry=self.registry)
        self.operation_seconds = Histogram(
            "vmfork_operation_duration_seconds", "Seconds an operation took",
            ["op"], buckets=OPERATION_BUCKETS, registry=self.registry)
        self.operations = Counter("vmfork_operations", "Operations ended, by result",
                                  ["op", "result"], registry=self.registry)
        self.fork_pause_seconds = Histogram(
            "vmfork_fork_parent_pause_seconds",
            "Seconds a forked VM was paused (host clock, guest stopped to running again)",
            buckets=FORK_PAUSE_BUCKETS, registry=self.registry)
        self.fork_children = Counter("vmfork_fork_children", "Children started by forks",
                                     registry=self.registry)
        self.registry.register(CatalogCollector(state))

    def observe_clone(self, template: str, result: CloneResult, warm_pool: bool) -> None:
        self.clone_seconds.labels(template, clone_source(result, warm_pool)).observe(
            result.responsive)

    def observe_fork(self, report: ForkReport) -> None:
        self.fork_pause_seconds.observe(report.parent_pause_ms / 1000)
        self.fork_children.inc(len(report.children))

    def observe_operation(self, op: str, result: str, seconds: float) -> None:
        self.operation_seconds.labels(op).observe(seconds)
        self.operations.labels(op, result).inc()

    def forget_template(self, template: str) -> None:
        """Drop the series of a removed template."""
        for source in SOURCES:
            with contextlib.suppress(KeyError):
                self.clone_seconds.remove(template, source)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def metrics_of(state: ServiceState) -> Metrics:
    """The daemon's metrics (made on first use, and then told of operations)."""
    m = state.parts.get("metrics")
    if not isinstance(m, Metrics):
        m = state.parts["metrics"] = Metrics(state)
        operations.operations_of(state).observers.append(m.observe_operation)
    return m


@router.get("/metrics", response_class=Response,
            responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
async def metrics(request: Request) -> Response:
    """Prometheus metrics (text exposition format)."""
    return Response(metrics_of(state_of(request)).exposition(),
                    media_type=CONTENT_TYPE_LATEST)


__all__ = ["CatalogCollector", "Metrics", "clone_source", "metrics_of", "router",
           "smaps_rollup"]
