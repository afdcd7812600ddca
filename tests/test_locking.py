"""Locks with deadlines, and the catalog's schema upgrade (no QEMU)."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

import pytest

from vmfork import locking
from vmfork.errors import StateError
from vmfork.store import Store


def test_a_held_lock_times_out_with_the_given_message(tmp_path: Path) -> None:
    path = tmp_path / "x.lock"
    with locking.held(path, 0, "busy"):
        t0 = time.monotonic()
        with pytest.raises(StateError, match=r"^x is busy$"):
            locking.acquire(path, 0.2, "x is busy")
        assert 0.15 < time.monotonic() - t0 < 2
        with pytest.raises(StateError):
            asyncio.run(locking.acquire_async(path, 0.05, "x is busy"))
    # released: taken at once
    locking.acquire(path, 0, "busy").close()


def test_a_lock_released_while_waiting_is_taken(tmp_path: Path) -> None:
    path = tmp_path / "y.lock"
    first = locking.acquire(path, 0, "busy")

    async def main() -> float:
        asyncio.get_running_loop().call_later(0.1, first.close)
        t0 = time.monotonic()
        f = await locking.acquire_async(path, 5, "busy")
        f.close()
        return time.monotonic() - t0
    assert 0.05 < asyncio.run(main()) < 2


def test_store_lock_without_wait_refuses_at_once(tmp_path: Path) -> None:
    s1, s2 = Store(tmp_path / "h", tmp_path / "m"), Store(tmp_path / "h", tmp_path / "m")
    with s1.lock("vm1"):
        with pytest.raises(StateError, match="vm1 is busy"), s2.lock("vm1", wait=False):
            pass
        with pytest.raises(StateError, match=r"waited 0.1 s"), s2.lock("vm1", wait=0.1):
            pass
    with s2.lock("vm1", wait=False):
        pass


def test_catalog_of_an_older_vmfork_gains_the_new_columns(tmp_path: Path) -> None:
    home = tmp_path / "h"
    home.mkdir()
    db = sqlite3.connect(home / "vmfork.db")
    db.executescript("""
        CREATE TABLE pool_members (id TEXT PRIMARY KEY, template TEXT NOT NULL,
            spec TEXT NOT NULL, pid INTEGER NOT NULL, pid_start REAL, created REAL NOT NULL);
        CREATE TABLE pool_targets (template TEXT PRIMARY KEY, size INTEGER NOT NULL);
        INSERT INTO pool_targets VALUES ('t', 2);""")
    db.commit()
    db.close()
    s = Store(home, tmp_path / "m")
    assert s.pool_target("t") == 2 and s.pool_warm("t") is False
    s.set_pool_target("t", 3, warm=True)
    assert (s.pool_target("t"), s.pool_warm("t")) == (3, True)
    s.set_pool_target("t", 1)  # keeps the kind
    assert (s.pool_target("t"), s.pool_warm("t")) == (1, True)
