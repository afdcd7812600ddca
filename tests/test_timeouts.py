"""Deadlines (vmfork.timeouts): VMFORK_TIMEOUT_SCALE and the checks on Timeouts."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest

from vmfork import timeouts
from vmfork.errors import InvalidInput
from vmfork.timeouts import SCALE_ENV, Timeouts


@pytest.mark.parametrize("raw, expected", [(None, 1.0), ("", 1.0), ("2.5", 2.5),
                                           (" 3 ", 3.0), ("0.05", 0.05), ("1e1", 10.0)])
def test_scale_reads_the_environment(monkeypatch: pytest.MonkeyPatch, raw: str | None,
                                     expected: float) -> None:
    if raw is None:
        monkeypatch.delenv(SCALE_ENV, raising=False)
    else:
        monkeypatch.setenv(SCALE_ENV, raw)
    assert timeouts.scale() == expected


@pytest.mark.parametrize("raw", ["0", "-1", "nan", "inf", "-inf", "abc", "2s", "1,5"])
def test_a_bad_scale_is_refused(monkeypatch: pytest.MonkeyPatch, raw: str) -> None:
    monkeypatch.setenv(SCALE_ENV, raw)
    with pytest.raises(InvalidInput, match=rf"VMFORK_TIMEOUT_SCALE='{raw}': expected a "
                                           "number above 0"):
        timeouts.scale()
    with pytest.raises(InvalidInput):
        Timeouts().scaled()


def test_scaled_stretches_every_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    base = Timeouts(exec=20)
    monkeypatch.setenv(SCALE_ENV, "4")
    got = base.scaled()
    for f in dataclasses.fields(Timeouts):
        assert getattr(got, f.name) == 4 * getattr(base, f.name), f.name
    monkeypatch.setenv(SCALE_ENV, "1")
    assert base.scaled() is base


@pytest.mark.parametrize("value", [0, -1.0, float("nan"), float("inf"), "10", True, None])
def test_timeouts_refuse_what_is_not_a_deadline(value: object) -> None:
    with pytest.raises(InvalidInput, match=r"timeout clock_exec=.*finite number of seconds"):
        Timeouts(clock_exec=value)  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match=r"timeout migrate="):
        dataclasses.replace(Timeouts(), migrate=value)


def test_a_bad_scale_stops_vmfork_at_import() -> None:
    """DEFAULT is scaled at import: a bad value fails there, with the message,
    instead of running every command with some other deadlines."""
    code = "import vmfork.timeouts"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, SCALE_ENV: "-2"}, timeout=60)
    assert p.returncode != 0
    assert "InvalidInput: VMFORK_TIMEOUT_SCALE='-2': expected a number above 0" in p.stderr
