"""``vmfork bench fork`` at tiny parameters: the figures it reports are there
and consistent with each other, its targets are the issue's, and it leaves
nothing behind (the ``env`` fixture fails on a QEMU, socket or memory file
left). Speed is the bench's business, not the suite's: no timing is judged."""

from __future__ import annotations

import json

import pytest

from vmfork.bench.fork import ForkBench
from vmfork.errors import InvalidInput

from .conftest import Env

MIB = 1024 * 1024


@pytest.mark.parametrize("params, message", [
    ({"sizes_mib": (512, 256)}, "ascending"),
    ({"sizes_mib": (256,), "repeat_mib": 512}, "not one of the sizes"),
    ({"sizes_mib": (256,), "repeat_mib": 256, "dirty_mb": (0, 200)}, "does not fit"),
    ({"children": 0}, "children"),
])
def test_bench_fork_refuses_bad_parameters(params: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        ForkBench(**params).check()  # type: ignore[arg-type]


@pytest.mark.qemu
def test_bench_fork(env: Env) -> None:
    p = env.cli("bench", "fork", "--sizes", "256M", "--repeat-size", "256M", "--dirty", "8",
                "--memory", "256M", "--children", "2", "--data", "32", "--accel", "tcg",
                "--json", check=True, timeout=600)
    result = json.loads(p.stdout)
    (size,) = result["sizes"]
    assert size["memory_mib"] == 256 and size["data_mb"] == 32, size
    base, first = size["baseline"], size["first_fork"]
    # The full copy copied at least the guest's data, holes skipped.
    assert 32 * MIB <= base["copied_bytes"] < 256 * MIB, base
    assert base["pause_ms"] > 0 and base["pause_call_ms"] > 0, base
    assert first["parent_pause_ms"] > 0 and first["children"] == 1, first
    assert first["child_responsive_ms"] >= first["child_running_ms"] > 0, first
    assert size["pause_vs_baseline"] == pytest.approx(
        base["pause_ms"] / first["parent_pause_ms"], rel=1e-6)

    (again,) = result["repeated"]
    assert again["memory_mib"] == 256 and again["dirty_mb"] == 8, again
    # The 8 MB the guest wrote since the first fork were captured.
    assert again["captured_bytes"] >= 8 * MIB, again
    assert again["ram_bytes_written"] == again["captured_bytes"] + again["base_copy_bytes"]

    m = result["memory"]
    assert m["children"] == 2 and m["fork"]["children"] == 2, m
    assert m["family"]["processes"] == 3 and m["independent"]["processes"] == 3, m
    # Three VMs share one copy of the data: less than three copies of it.
    assert 0 < m["family"]["bytes"] < m["independent"]["bytes"], m
    assert m["ratio"] == pytest.approx(m["family"]["bytes"] / m["independent"]["bytes"])

    assert [t["target"] for t in result["targets"]] == [
        "first fork: child running <= 1 s at 256 MiB",
        "repeated fork: pause <= 50 ms at 256 MiB, 8 MB dirtied",
        "memory: parent + 2 children <= 0.35x 3 independent VMs"]
    assert all(isinstance(t["ok"], bool) and t["measured"] for t in result["targets"])

    s = env.store()
    assert s.list_vms() == [] and s.template_names() == []
    s.close()


def test_bench_fork_cli_refuses_bad_dirty(env: Env) -> None:
    p = env.cli("bench", "fork", "--dirty", "8,lots")
    assert p.returncode == 2 and "--dirty" in p.stderr, p.stderr
