"""Benchmark plumbing shared by ``vmfork bench``: timing, guest data, tables.

Each feature's measurements live in its own ``bench_*.py``; this module owns
what they share: filling guest RAM with incompressible data quickly, PSS of
processes, and printing results as a table with ratios to a baseline.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence
from typing import Any

import psutil
from rich.console import Console
from rich.table import Table

from vmfork import vm
from vmfork.errors import GuestError
from vmfork.store import Store
from vmfork.timeouts import DEFAULT

#: Shell snippet that writes MB megabytes of non-zero, non-repeating-page data
#: to FILE in the guest fast under TCG (urandom is slow there): a 1 MiB random
#: block is written repeatedly, each copy prefixed by its index so pages differ.
FILL_CMD = ("head -c 1048576 /dev/urandom > /run/blk && i=0 && "
            "while [ $i -lt {mb} ]; do echo $i; cat /run/blk; i=$((i+1)); done > {file} && "
            "rm /run/blk && md5sum {file} | cut -d' ' -f1")


async def fill_guest(store: Store, name: str, mb: int, file: str = "/root/data") -> str:
    """Write *mb* MiB of data to *file* in the guest; return its md5."""
    r = await vm.exec_(store, name, FILL_CMD.format(mb=mb, file=file),
                       timeout=DEFAULT.exec + mb)
    if r.exit_code != 0:
        raise GuestError(f"{name}: filling guest memory failed: "
                         f"{(r.stderr or r.stdout).strip()[-200:]}")
    return r.stdout.strip()


def pss_bytes(pids: Iterable[int]) -> int:
    """Sum of proportional set sizes (shared pages split between sharers)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            total += psutil.Process(pid).memory_full_info().pss
    return total


def rss_bytes(pids: Iterable[int]) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            total += psutil.Process(pid).memory_info().rss
    return total


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]],
                console: Console | None = None) -> None:
    table = Table(*columns, title=title)
    for row in rows:
        table.add_row(*(fmt(v) for v in row))
    (console or Console()).print(table)


def fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3f}" if v < 10 else f"{v:.1f}"
    return str(v)


def ratio(baseline: float, value: float) -> float:
    """How many times *value* is smaller (faster, lighter) than *baseline*."""
    return baseline / value if value else float("inf")
