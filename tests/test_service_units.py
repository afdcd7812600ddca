"""The daemon's pure parts, without QEMU: the start gate, the text of
streamed output, guest paths."""

from __future__ import annotations

import asyncio

import pytest

from vmfork.errors import Busy, InvalidInput
from vmfork.guest_files import check_guest_path
from vmfork.service.gate import StartGate
from vmfork.service.vms import _Text, output_fields


def test_start_gate_queues_then_refuses() -> None:
    async def main() -> list[str]:
        gate = StartGate(limit=2, queue=1, wait=30)
        release = asyncio.Event()
        order: list[str] = []

        async def start(name: str) -> None:
            async with gate.slot(name):
                order.append(name)
                await release.wait()
        tasks = [asyncio.create_task(start(n)) for n in ("a", "b", "c")]
        while gate.waiting < 1:  # a and b hold the slots, c waits
            await asyncio.sleep(0)
        assert (gate.running, gate.waiting) == (2, 1)
        with pytest.raises(Busy, match="retry later"):
            async with gate.slot("d"):
                pass
        release.set()
        await asyncio.gather(*tasks)
        assert (gate.running, gate.waiting) == (0, 0)
        async with gate.slot("e"):
            order.append("e")
        return order
    assert asyncio.run(main()) == ["a", "b", "c", "e"]


def test_start_gate_gives_up_a_wait_with_busy() -> None:
    async def main() -> None:
        gate = StartGate(limit=1, queue=5, wait=0.05)
        async with gate.slot("a"):
            with pytest.raises(Busy):
                async with gate.slot("b"):
                    pass
        assert (gate.running, gate.waiting) == (0, 0)
    asyncio.run(main())
    with pytest.raises(InvalidInput):
        StartGate(limit=0)


def test_streamed_text_keeps_characters_whole_and_bytes_exact() -> None:
    t = _Text("stdout")
    snow = "☃".encode()
    assert t.piece(b"a" + snow[:1]) == {"stdout": "a"}
    assert t.piece(snow[1:] + b"b") == {"stdout": "☃b"}
    assert t.piece(b"\xff\n") == {"stdout": "\ufffd\n", "stdout_base64": "/wo="}
    assert t.piece(b"", final=True) is None
    assert t.piece(snow[:2]) is None
    assert t.piece(b"", final=True) == {"stdout": "\ufffd", "stdout_base64": "4pg="}
    assert output_fields("stderr", b"ok") == {"stderr": "ok"}


@pytest.mark.parametrize("path", ["", "relative", "/dir/", "/a\0b", "/" + "x" * 5000])
def test_guest_paths_refused(path: str) -> None:
    with pytest.raises(InvalidInput):
        check_guest_path(path)


def test_guest_paths_taken() -> None:
    assert check_guest_path("/root/a b'c\n") == "/root/a b'c\n"
