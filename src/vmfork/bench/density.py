"""``vmfork bench density``: how many clones of one template a host holds.

Owns the measurements of the density issue. Clones of one template (given,
or a demo guest of ``memory_mib`` holding ``data_mb`` MB of data made for
the run) are started in steps of ``step`` (one :func:`vmfork.templates.clone.clone`
call each, no pool). After each step, once the clones have settled (at
least ``settle_s``, then until their CPU stops falling: :func:`settle`), it
measures:

* **memory**: the host's used memory (``MemTotal - MemAvailable``) above what
  it was before the run, and each clone QEMU's PSS (the template's pages it
  maps are split between the clones), private and shared memory
  (``/proc/PID/smaps_rollup``), averaged per clone;
* **idle CPU**: the CPU time all clone QEMUs used over ``cpu_window_s`` while
  nothing was asked of them, in cores and per clone, and the host's busy
  cores over the same window;
* **start**: the step's call and its clones' median time to running and to
  answering (identity applied);
* **exec latency**: ``true`` through the guest agent in ``exec_samples``
  clones drawn at random, one after the other: p50, p99 (the nearest rank),
  and their ratio to the first step's (the baseline of the run).

With ``idle_pause_s`` each clone gets that idle policy (:mod:`vmfork.idle`),
the run keeps a watcher going, and each step first waits until its clones
are paused: the exec latency then includes the wake-up, and the same clones
are asked again once awake (``exec_awake_*``), the baseline of that cost.

It stops at the first failure (a clone that does not start, an exec that
fails), once the exec p99 passes ``exec_limit_s``, or at ``max_clones``;
the result names the highest count that held (no failure, p99 within the
limit) and the targets. Every VM and template it made is removed at the end,
also when it fails or is cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import secrets
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from vmfork import idle, idle_ports, vm
from vmfork.bench import fill_guest
from vmfork.errors import InvalidInput, PartialClone, VmforkError
from vmfork.names import derived, internal
from vmfork.store import Store
from vmfork.tasks import run_to_end
from vmfork.templates import catalog, clone, create
from vmfork.timeouts import DEFAULT, Timeouts

MIB = 1 << 20
#: The issue's targets: clones held with exec p99 within a second, and
#: private memory per idle clone.
CLONES_TARGET = 200
EXEC_TARGET_S = 1.0
#: The same with idle pause: clones held, and exec p99 including the resume.
IDLE_CLONES_TARGET = 400
IDLE_EXEC_TARGET_S = 0.3
PRIVATE_TARGET_MB = 40.0
#: Clones stopped at once when the run ends.
STOP_AT_ONCE = 8
#: Seconds of each CPU sample while a step settles, and the most it waits.
SETTLE_WINDOW = 5.0
SETTLE_MOST = 120.0


@dataclass
class DensityBench:
    """Parameters of one run."""

    template: str | None = None
    memory_mib: int = 256
    data_mb: int = 64
    max_clones: int = 400
    step: int = 25
    exec_samples: int = 20
    exec_limit_s: float = 2.0
    settle_s: float = 5.0
    cpu_window_s: float = 10.0
    accel: str = "auto"
    #: Each clone pauses after this many seconds without use (None: never);
    #: the run then keeps the watcher going and waits, at each step, until
    #: the clones are paused before it measures.
    idle_pause_s: float | None = None
    seed: int = 17
    progress: Callable[[str], None] = field(default=lambda _msg: None)

    def check(self) -> None:
        """InvalidInput, one line, for parameters that cannot run."""
        if self.max_clones < 1:
            raise InvalidInput(f"invalid --max {self.max_clones}: at least 1")
        if not 1 <= self.step <= clone.MAX_CLONES:
            raise InvalidInput(f"invalid --step {self.step}: 1-{clone.MAX_CLONES} "
                               "(clones one call starts)")
        if self.exec_samples < 1:
            raise InvalidInput(f"invalid --exec-samples {self.exec_samples}: at least 1")
        for what, v in (("--exec-limit", self.exec_limit_s), ("--settle", self.settle_s),
                        ("--cpu-window", self.cpu_window_s)):
            if not (math.isfinite(v) and v > 0):
                raise InvalidInput(f"invalid {what} {v!r}: a number of seconds above 0")
        vm.check_idle_pause(self.idle_pause_s)
        if self.template is None and self.data_mb < 0:
            raise InvalidInput(f"invalid --data {self.data_mb}: at least 0")


# -- measurements ----------------------------------------------------------------------
def _used_bytes() -> int:
    m = psutil.virtual_memory()
    return int(m.total - m.available)


def _rollup(pid: int) -> dict[str, int]:
    """``/proc/PID/smaps_rollup`` in bytes ({} if the process is gone)."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                parts = line.split()
                if len(parts) == 3 and parts[2] == "kB":
                    out[parts[0].rstrip(":")] = int(parts[1]) * 1024
    except OSError:
        return {}
    return out


def memory_per_clone(pids: Sequence[int]) -> dict[str, float]:
    """Average PSS, private and shared memory of the processes *pids*, in MB."""
    rolls = [r for r in (_rollup(p) for p in pids) if r]
    if not rolls:
        return {"pss_mb": 0.0, "private_mb": 0.0, "shared_mb": 0.0}

    def avg(*keys: str) -> float:
        return sum(sum(r.get(k, 0) for k in keys) for r in rolls) / len(rolls) / 1e6

    return {"pss_mb": avg("Pss"), "private_mb": avg("Private_Clean", "Private_Dirty"),
            "shared_mb": avg("Shared_Clean", "Shared_Dirty")}


def _cpu_seconds(pids: Sequence[int]) -> dict[int, float]:
    out: dict[int, float] = {}
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            t = psutil.Process(pid).cpu_times()
            out[pid] = t.user + t.system
    return out


async def idle_cpu(pids: Sequence[int], window: float) -> dict[str, float]:
    """Cores the processes *pids* kept busy over *window* seconds, per
    process (percent of a core), and the host's busy cores meanwhile."""
    before, host0, t0 = _cpu_seconds(pids), psutil.cpu_times(), time.monotonic()
    await asyncio.sleep(window)
    after, host1, seconds = _cpu_seconds(pids), psutil.cpu_times(), time.monotonic() - t0
    used = sum(after[p] - before[p] for p in after if p in before)
    idle0, idle1 = host0.idle + host0.iowait, host1.idle + host1.iowait
    host_busy = (sum(host1) - sum(host0) - (idle1 - idle0)) / seconds
    return {"cores": used / seconds, "per_clone_pct": 100 * used / seconds / max(1, len(pids)),
            "host_cores": host_busy}


async def settle(pids: Sequence[int], at_least: float) -> float:
    """Wait *at_least* seconds, then while the CPU the processes *pids* use
    still falls by more than a twentieth from one :data:`SETTLE_WINDOW` to
    the next (a host loaded by starting clones takes a minute or more to
    work off its backlog: every clone then runs late), at most
    :data:`SETTLE_MOST` seconds in all; return the seconds waited."""
    t0 = time.monotonic()
    await asyncio.sleep(at_least)
    before = (await idle_cpu(pids, SETTLE_WINDOW))["cores"]
    while time.monotonic() - t0 < SETTLE_MOST:
        now = (await idle_cpu(pids, SETTLE_WINDOW))["cores"]
        if now >= 0.95 * before:
            break
        before = now
    return time.monotonic() - t0


def percentile(xs: Sequence[float], q: float) -> float:
    """The *q*-th percentile of *xs* by the nearest rank (NaN if empty)."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[max(0, math.ceil(q / 100 * len(s)) - 1)]


async def exec_latency(store: Store, names: Sequence[str], samples: int, rng: random.Random,
                       timeouts: Timeouts, picked: Sequence[str] | None = None) -> list[float]:
    """Seconds of ``true`` through the guest agent in *samples* clones of
    *names* drawn at random (or in those *picked*), one after the other
    (GuestError if one fails)."""
    if picked is None:
        picked = rng.sample(list(names), min(samples, len(names)))
    out = []
    for name in picked:
        t0 = time.monotonic()
        async with idle.in_use(store, name, timeouts):  # a paused clone wakes first
            r = await vm.exec_(store, name, "true", timeouts=timeouts)
        if r.exit_code != 0:
            raise VmforkError(f"{name}: exec of 'true' exited {r.exit_code}")
        out.append(time.monotonic() - t0)
    return out


# -- the run ---------------------------------------------------------------------------
async def _make_template(store: Store, name: str, p: DensityBench, made: list[str],
                         timeouts: Timeouts) -> None:
    build = derived(name, "-build")
    p.progress(f"a {p.memory_mib} MiB demo guest holding {p.data_mb} MB, made a template")
    await vm.run(store, vm.RunOptions(name=build, memory_mib=p.memory_mib, image="demo",
                                      accel=p.accel), timeouts)
    try:
        if p.data_mb:
            await fill_guest(store, build, p.data_mb)
        made.append(name)
        await create.create_from_vm(store, name, build, timeouts)
    except BaseException:
        with contextlib.suppress(VmforkError):
            await vm.stop(store, build, force=True, timeouts=timeouts)
        raise


async def _wait_paused(store: Store, names: Sequence[str], most: float) -> float:
    """Seconds until every clone of *names* is paused for idling (at most
    *most*)."""
    t0 = time.monotonic()
    wanted = set(names)
    while time.monotonic() - t0 < most:
        awake = [r for r in store.list_vms() if r.name in wanted and r.info.idle_since is None]
        if not awake:
            break
        await asyncio.sleep(0.5)
    return time.monotonic() - t0


async def _stop_all(store: Store, names: Sequence[str], timeouts: Timeouts) -> None:
    gate = asyncio.Semaphore(STOP_AT_ONCE)

    async def stop(name: str) -> None:
        async with gate:
            with contextlib.suppress(VmforkError):
                await vm.stop(store, name, force=True, timeouts=timeouts)

    await asyncio.gather(*(stop(n) for n in names))


async def run(store: Store, p: DensityBench, timeouts: Timeouts = DEFAULT) -> dict[str, Any]:
    """Measure everything (see the module); return the figures, the count
    held and the targets."""
    p.check()
    if p.template is not None:
        store.get_template(p.template)  # NotFound before anything starts
    t_run = time.monotonic()
    tag = secrets.token_hex(2)
    made: list[str] = []
    names: list[str] = []
    rng = random.Random(p.seed)
    out: dict[str, Any] = {"max_clones": p.max_clones, "step": p.step,
                           "exec_limit_s": p.exec_limit_s, "idle_pause_s": p.idle_pause_s,
                           "steps": []}
    stop_watcher = asyncio.Event()
    watcher = asyncio.create_task(idle_ports.keep(store, timeouts, stop_watcher))
    try:
        template: str
        if p.template is None:
            template = internal("bench", f"density-{tag}")
            await _make_template(store, template, p, made, timeouts)
            out |= {"memory_mib": p.memory_mib, "data_mb": p.data_mb}
        else:
            template = p.template
            m = store.get_template(template)
            out |= {"memory_mib": m.spec.memory_mib, "data_mb": None}
        out["template"] = template
        used0 = _used_bytes()
        p.progress("the host before any clone")
        out["host_before"] = {"used_mb": used0 / 1e6,
                              **(await idle_cpu([], p.cpu_window_s))}
        stopped = f"reached --max {p.max_clones}"
        failure: str | None = None
        while len(names) < p.max_clones:
            k = min(p.step, p.max_clones - len(names))
            batch = [derived(template, f"-d{len(names) + i + 1}") if p.template is None
                     else internal("bench", f"density-{tag}-{len(names) + i + 1}")
                     for i in range(k)]
            p.progress(f"clones {len(names) + 1}-{len(names) + k}")
            t0 = time.monotonic()
            try:
                results = await clone.clone(store, template, names=batch, use_pool=False,
                                            timeouts=timeouts)
            except VmforkError as exc:
                if isinstance(exc, PartialClone):  # those that run are stopped at the end
                    names.extend(c.name for c in exc.clones)
                failure, stopped = str(exc), f"a clone of step {len(out['steps']) + 1} failed"
                break
            start_s = time.monotonic() - t0
            names.extend(batch)
            running = set(names)
            pids = [r.pid for r in store.list_vms() if r.name in running and r.pid]
            if p.idle_pause_s:
                for name in batch:
                    await idle.set_policy(store, name, p.idle_pause_s)
                await _wait_paused(store, names, p.idle_pause_s + SETTLE_MOST)
            settled = await settle(pids, p.settle_s)
            cpu = await idle_cpu(pids, p.cpu_window_s)
            mem = memory_per_clone(pids)
            picked = rng.sample(list(names), min(p.exec_samples, len(names)))
            try:
                lat = await exec_latency(store, names, p.exec_samples, rng, timeouts, picked)
                # The same clones again, awake now: what the wake-up costs.
                awake = (await exec_latency(store, names, p.exec_samples, rng, timeouts, picked)
                         if p.idle_pause_s else [])
            except VmforkError as exc:
                failure, stopped = str(exc), "an exec failed"
                break
            step = {"clones": len(names), "start_s": start_s, "settled_s": settled,
                    "running_ms": 1000 * statistics.median(r.running for r in results),
                    "responsive_ms": 1000 * statistics.median(r.responsive for r in results),
                    "host_used_mb": (_used_bytes() - used0) / 1e6, **mem,
                    "idle_cpu_cores": cpu["cores"], "idle_cpu_per_clone_pct":
                    cpu["per_clone_pct"], "host_busy_cores": cpu["host_cores"],
                    "exec_p50_ms": 1000 * percentile(lat, 50),
                    "exec_p99_ms": 1000 * percentile(lat, 99), "exec_samples": len(lat)}
            if awake:
                step |= {"exec_awake_p50_ms": 1000 * percentile(awake, 50),
                         "exec_awake_p99_ms": 1000 * percentile(awake, 99)}
            first = out["steps"][0] if out["steps"] else step
            step["exec_p99_over_first"] = step["exec_p99_ms"] / first["exec_p99_ms"]
            out["steps"].append(step)
            p.progress(f"{len(names)} clones: {step['host_used_mb']:.0f} MB used, "
                       f"{step['idle_cpu_cores']:.2f} cores idle, exec p99 "
                       f"{step['exec_p99_ms']:.0f} ms")
            if step["exec_p99_ms"] > 1000 * p.exec_limit_s:
                stopped = f"exec p99 passed {p.exec_limit_s:g} s"
                break
        out["stopped"] = stopped
        out["failure"] = failure
        held = [s for s in out["steps"] if s["exec_p99_ms"] <= 1000 * p.exec_limit_s]
        out["held"] = held[-1]["clones"] if held else 0
    finally:
        stop_watcher.set()
        await run_to_end(watcher)
        if names:
            p.progress(f"stopping {len(names)} clones")
        await run_to_end(_stop_all(store, names, timeouts))
        for t in made:
            with contextlib.suppress(VmforkError):
                await run_to_end(catalog.remove(store, t, force=True, timeouts=timeouts))
    out["targets"] = targets(out)
    out["seconds"] = round(time.monotonic() - t_run, 1)
    return out


def targets(out: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets (with idle pause or without, as the run was),
    decided on the run's figures."""
    steps = out["steps"]
    count, limit = ((IDLE_CLONES_TARGET, IDLE_EXEC_TARGET_S) if out.get("idle_pause_s")
                    else (CLONES_TARGET, EXEC_TARGET_S))
    # Held within the limit: every step up to it (none of them failed: a
    # failure ends the run before its step is measured).
    held = 0
    for s in steps:
        if s["exec_p99_ms"] > 1000 * limit:
            break
        held = s["clones"]
    last = steps[-1] if steps else None
    with_idle = f" (idle pause {out['idle_pause_s']:g} s)" if out.get("idle_pause_s") else ""
    t = [{"target": f">= {count} clones with exec p99 <= {limit:g} s and no failed "
                    f"clone{with_idle}", "measured": f"{held} clones", "ok": held >= count},
         {"target": f"<= {PRIVATE_TARGET_MB:g} MB private memory per idle clone",
          "measured": f"{last['private_mb']:.1f} MB at {last['clones']}" if last else "-",
          "ok": last is not None and last["private_mb"] <= PRIVATE_TARGET_MB}]
    return t


# -- output ------------------------------------------------------------------------------
def plot_check() -> None:
    """InvalidInput if matplotlib is missing (before a run, not after it)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise InvalidInput("--plot needs matplotlib: pip install 'vmfork[plot]' "
                           "(make bench installs it)") from None


def plot(result: dict[str, Any], path: Path | str) -> None:
    """Memory, idle CPU and exec latency against the clone count, as a PNG
    (InvalidInput if matplotlib is missing: ``pip install 'vmfork[plot]'``)."""
    plot_check()
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    steps = result["steps"]
    xs = [s["clones"] for s in steps]
    fig, axes = plt.subplots(3, 1, figsize=(7, 9), sharex=True)
    axes[0].plot(xs, [s["host_used_mb"] / 1000 for s in steps], "o-", label="host used")
    axes[0].set_ylabel("host memory used (GB)")
    per = axes[0].twinx()
    per.plot(xs, [s["pss_mb"] for s in steps], "s--", color="tab:orange", label="PSS per clone")
    per.plot(xs, [s["private_mb"] for s in steps], "^:", color="tab:green",
             label="private per clone")
    per.set_ylabel("per clone (MB)")
    per.set_ylim(bottom=0)
    axes[0].legend(loc="upper left")
    per.legend(loc="lower right")
    axes[1].plot(xs, [s["idle_cpu_cores"] for s in steps], "o-", label="clones, idle")
    axes[1].plot(xs, [s["host_busy_cores"] for s in steps], "s--", label="host")
    axes[1].set_ylabel("busy cores")
    axes[1].legend()
    axes[2].plot(xs, [s["exec_p50_ms"] / 1000 for s in steps], "o-", label="p50")
    axes[2].plot(xs, [s["exec_p99_ms"] / 1000 for s in steps], "s-", label="p99")
    axes[2].axhline(result["exec_limit_s"], color="grey", linestyle=":", label="limit")
    axes[2].set_ylabel("exec latency (s)")
    axes[2].set_xlabel("clones running")
    axes[2].legend()
    fig.suptitle(f"vmfork bench density: clones of a {result['memory_mib']} MiB template")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def rows(result: dict[str, Any]) -> list[list[str]]:
    """One table row per step."""
    return [[str(s["clones"]), f"{s['start_s']:.1f}", f"{s['responsive_ms']:.0f}",
             f"{s['host_used_mb']:.0f}", f"{s['pss_mb']:.1f}", f"{s['private_mb']:.1f}",
             f"{s['idle_cpu_cores']:.2f}", f"{s['idle_cpu_per_clone_pct']:.2f}",
             f"{s['exec_p50_ms']:.0f}", f"{s['exec_p99_ms']:.0f}",
             f"{s['exec_p99_over_first']:.1f}x"] for s in result["steps"]]


COLUMNS = ["clones", "step start s", "answer ms", "host used MB", "PSS/clone MB",
           "private/clone MB", "idle cores", "idle %/clone", "exec p50 ms", "exec p99 ms",
           "p99 vs first"]

__all__ = ["COLUMNS", "DensityBench", "exec_latency", "idle_cpu", "memory_per_clone",
           "percentile", "plot", "plot_check", "rows", "run", "settle", "targets"]
