"""``vmfork bench density`` on a small ramp: the figures of each step are
there and consistent, the plot is drawn, the targets are the issue's, and
every clone and the template it made are gone afterwards (the ``env``
fixture fails on a QEMU, socket or memory file left). Speed is the bench's
business: no timing is judged."""

from __future__ import annotations

import json
import os

import pytest

from vmfork.bench.density import DensityBench, memory_per_clone, percentile, targets
from vmfork.errors import InvalidInput

from .conftest import Env


def test_percentile_is_the_nearest_rank() -> None:
    xs = [float(i) for i in range(1, 21)]
    assert percentile(xs, 50) == 10.0 and percentile(xs, 99) == 20.0
    assert percentile([3.0], 99) == 3.0
    assert percentile([], 50) != percentile([], 50)  # NaN


@pytest.mark.parametrize("params, message", [
    ({"max_clones": 0}, "--max"),
    ({"step": 0}, "--step"),
    ({"step": 65}, "--step"),
    ({"exec_samples": 0}, "--exec-samples"),
    ({"settle_s": float("nan")}, "--settle"),
    ({"cpu_window_s": -1.0}, "--cpu-window"),
    ({"idle_pause_s": 0.2}, "idle pause"),
])
def test_bench_density_refuses_bad_parameters(params: dict[str, float], message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        DensityBench(**params).check()  # type: ignore[arg-type]


def test_targets_count_the_steps_within_a_second() -> None:
    def step(n: int, p99: float, private: float = 30.0) -> dict[str, float]:
        return {"clones": n, "exec_p99_ms": p99, "private_mb": private}
    ok = targets({"steps": [step(100, 300), step(200, 900), step(225, 1500)]})
    assert ok[0]["ok"] and ok[0]["measured"] == "200 clones" and ok[1]["ok"]
    # A slow step in the middle ends what is held, whatever comes after.
    bad = targets({"steps": [step(100, 300), step(200, 1100), step(225, 900, 45.0)]})
    assert not bad[0]["ok"] and bad[0]["measured"] == "100 clones" and not bad[1]["ok"]
    assert not targets({"steps": []})[0]["ok"]
    # With idle pause: twice the clones, within 0.3 s including the resume.
    idle = targets({"idle_pause_s": 10, "steps": [step(200, 250), step(400, 290),
                                                  step(425, 310)]})
    assert idle[0]["target"] == (">= 400 clones with exec p99 <= 0.3 s and no failed clone "
                                 "(idle pause 10 s)")
    assert idle[0]["ok"] and idle[0]["measured"] == "400 clones"


def test_memory_of_processes_gone_is_zero() -> None:
    assert memory_per_clone([]) == {"pss_mb": 0.0, "private_mb": 0.0, "shared_mb": 0.0}
    me = memory_per_clone([os.getpid()])
    assert me["pss_mb"] > 0 and me["private_mb"] > 0


@pytest.mark.qemu
def test_bench_density_small_ramp(env: Env) -> None:
    plot = env.home / "density.png"
    p = env.cli("bench", "density", "--max", "4", "--step", "2", "--data", "8",
                "--settle", "1", "--cpu-window", "2", "--exec-samples", "3",
                "--accel", "tcg", "--plot", str(plot), "--json", check=True, timeout=900)
    r = json.loads(p.stdout)
    assert (r["max_clones"], r["step"], r["memory_mib"], r["data_mb"]) == (4, 2, 256, 8)
    assert [s["clones"] for s in r["steps"]] == [2, 4]
    assert r["held"] == 4 and r["failure"] is None and "--max 4" in r["stopped"]
    for s in r["steps"]:
        assert s["exec_samples"] == min(3, s["clones"])
        assert 0 < s["exec_p50_ms"] <= s["exec_p99_ms"], s
        assert 0 < s["running_ms"] <= s["responsive_ms"], s
        # Each clone maps the template's memory: its PSS counts its share of
        # that, its private memory is its own (QEMU, TCG, pages it wrote).
        assert 0 < s["private_mb"] < s["pss_mb"] < 256, s
        assert s["shared_mb"] > 0 and s["idle_cpu_cores"] >= 0, s
    first = r["steps"][0]
    assert first["exec_p99_over_first"] == 1.0
    # (The host's used memory is reported, not judged: with two small clones
    # other processes move it more than they do.)
    assert isinstance(first["host_used_mb"], float)
    assert [t["target"] for t in r["targets"]] == [
        ">= 200 clones with exec p99 <= 1 s and no failed clone",
        "<= 40 MB private memory per idle clone"]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(env.cli("ls", "--json", check=True).stdout) == []
    assert json.loads(env.cli("template", "ls", "--json", check=True).stdout) == []


@pytest.mark.qemu
def test_bench_density_with_idle_pause(env: Env) -> None:
    """Each step waits until its clones are paused for idling; the exec
    samples wake them (and the clones end up awake or paused, both fine)."""
    p = env.cli("bench", "density", "--max", "2", "--step", "2", "--data", "0",
                "--settle", "1", "--cpu-window", "2", "--exec-samples", "2",
                "--idle-pause", "1", "--accel", "tcg", "--json", check=True, timeout=900)
    r = json.loads(p.stdout)
    assert r["idle_pause_s"] == 1.0 and r["held"] == 2 and r["failure"] is None
    (s,) = r["steps"]
    assert s["exec_samples"] == 2 and 0 < s["exec_p50_ms"] <= s["exec_p99_ms"], s
    assert 0 < s["exec_awake_p50_ms"] <= s["exec_awake_p99_ms"], s
    assert r["targets"][0]["target"].endswith("(idle pause 1 s)")
    assert json.loads(env.cli("ls", "--json", check=True).stdout) == []


def test_bench_density_bad_input_is_one_line(env: Env) -> None:
    for args, what in ((["--step", "0"], "--step"), (["--template", "../x"], "template"),
                       (["--template", "nope"], "nope")):
        p = env.cli("bench", "density", *args)
        assert p.returncode in (1, 2) and what in p.stderr, p.stderr
        assert len(p.stderr.strip().splitlines()) == 1, p.stderr
