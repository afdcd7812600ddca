"""``vmfork bench lazy`` at tiny parameters: the figures it reports are there
and consistent with each other, its targets are the issue's, and it leaves
nothing behind on either side (the ``env`` fixture fails on a QEMU, socket
or memory file left; the serving home and its memory directory must be
gone). Speed is the bench's business, not the suite's: no timing is judged."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vmfork.bench.lazy import LazyBench, parse_rate
from vmfork.errors import InvalidInput

from .conftest import Env


def test_parse_rate() -> None:
    assert parse_rate("125M") == 125_000_000
    assert parse_rate("1G") == 10**9
    assert parse_rate("500k") == 500_000
    assert parse_rate("2Mi") == 2 << 20
    assert parse_rate("10MB/s") == 10**7
    assert parse_rate("4096") == 4096
    for bad in ("", "fast", "0", "-5M"):
        with pytest.raises(InvalidInput):
            parse_rate(bad)


@pytest.mark.parametrize("params, message", [
    ({"memory_mib": 256, "data_mb": 200}, "does not fit"),
    ({"data_mb": 0}, "at least 1"),
])
def test_bench_lazy_refuses_bad_parameters(params: dict[str, int], message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        LazyBench(**params).check()  # type: ignore[arg-type]


def serving_leftovers(env: Env) -> list[Path]:
    return [*env.home.glob(".bench-lazy-serving-*"),
            *env.memory_dir.parent.glob("vmfork-bench-lazy-*")]


@pytest.mark.qemu
def test_bench_lazy(env: Env) -> None:
    before = set(serving_leftovers(env))
    p = env.cli("bench", "lazy", "--memory", "256M", "--data", "16", "--rate-limit", "40M",
                "--accel", "tcg", "--json", check=True, timeout=900)
    r = json.loads(p.stdout)
    assert r["memory_mib"] == 256 and r["data_mb"] == 16 and r["rate_bytes_per_s"] == 40 * 10**6
    ram = r["memory_bytes"]
    assert ram == 256 << 20
    # The guest's data is in the memory: at least that much is not zero.
    assert 16 << 20 <= r["nonzero_memory_bytes"] < ram, r
    assert r["working_set_chunks_before"] == 0, r
    for part in ("lazy", "lazy_working_set", "eager"):
        x = r[part]
        assert 0 < x["pull_s"] < x["first_clone_s"], (part, x)
        assert x["clone"]["responsive_s"] >= x["clone"]["running_s"] > 0, (part, x)
    for part in ("lazy", "lazy_working_set"):
        x = r[part]
        # Memory fetched by the first clone: some, never a zero chunk.
        assert 0 < x["fetched_bytes"] <= r["nonzero_memory_bytes"], (part, x)
        assert x["fetched_share"] == pytest.approx(x["fetched_bytes"] / ram), (part, x)
        # Received for it: compressed (the pack), so less than its size.
        assert 0 < x["received_bytes"] < x["fetched_bytes"], (part, x)
    assert r["lazy"]["second_clone"]["seconds"] > 0
    assert r["lazy"]["clone_once_complete"]["seconds"] > 0 and r["lazy"]["complete_s"] >= 0
    assert r["local_clone"]["second"]["seconds"] > 0
    for part in ("lazy", "lazy_working_set", "eager"):
        assert r["over_local_clone_s"][part] == pytest.approx(
            r[part]["first_clone_s"] - r["local_clone"]["second"]["seconds"])
    # The serving side's first clone recorded a working set.
    assert r["working_set_chunks"] > 0, r
    base = r["baseline"]
    # The copy took every file whole, the memory's holes too.
    assert base["copied_bytes"] > ram + r["files_bytes"], base
    assert base["total_s"] == pytest.approx(base["copy_s"] + base["clone"]["seconds"])
    assert [t["target"] for t in r["targets"]] == [
        "lazy pull + first clone answering <= 1 s",
        "memory fetched when the first clone answers <= 25% of the RAM",
        "with the working set: lazy pull + first clone answering <= 0.7 s",
        "second clone of the pulled template (while it fetches) <= 1.2x a local clone",
        "second clone of the pulled template (once complete) <= 1.2x a local clone"]
    assert all(isinstance(t["ok"], bool) and t["measured"] for t in r["targets"])

    s = env.store()
    assert s.list_vms() == [] and s.template_names() == []
    s.close()
    assert set(serving_leftovers(env)) == before
    assert not list(env.home.glob("_bench.lazy-*"))


def test_bench_lazy_cli_refuses_a_bad_rate(env: Env) -> None:
    p = env.cli("bench", "lazy", "--rate-limit", "fast")
    assert p.returncode == 2 and "rate" in p.stderr, p.stderr
