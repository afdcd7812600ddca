"""The compressed memory of a published layout (vmfork.lazy.pack): built
from a sparse memory file, read back through a range source, and frames
from elsewhere treated as untrusted."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import zstandard

from vmfork.lazy import pack
from vmfork.lazy.published import MEMORY, MEMORY_PACK, PublishedMemory

from .chunk_sums import chunk_sha256s

CS = 64 << 10


class Files:
    """A range source over files of a directory, counting what it sends."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.asked: list[tuple[str, int, int]] = []

    def get_range(self, file: str, start: int, length: int, deadline: float) -> bytes:
        self.asked.append((file, start, length))
        with open(self.dir / file, "rb") as f:
            f.seek(start)
            return f.read(length)


@pytest.fixture
def memory(tmp_path: Path) -> Path:
    """A sparse memory of 10 chunks and a half: text (compresses), random
    bytes (does not), a hole, a written chunk of zeros, a short last chunk."""
    path = tmp_path / MEMORY
    with open(path, "wb") as f:
        f.truncate(10 * CS + CS // 2)
        f.seek(0)
        f.write(b"kernel text " * (2 * CS // 12))
        f.seek(3 * CS)
        f.write(os.urandom(CS))
        f.seek(5 * CS)
        f.write(bytes(CS))
        f.seek(10 * CS)
        f.write(b"tail" * (CS // 8))
    return path


def built(memory: Path) -> PublishedMemory:
    chunks, packed = pack.build(memory, CS, memory.parent / MEMORY_PACK)
    return PublishedMemory.from_dict({"memory_size": memory.stat().st_size, "chunk_size": CS,
                                      "chunks": list(chunks), "packed": list(packed)})


def test_build_hashes_and_packs_each_data_chunk(memory: Path) -> None:
    mem = built(memory)
    assert mem.chunks == chunk_sha256s(memory, CS)
    assert [i for i, c in enumerate(mem.chunks) if c is not None] == [0, 1, 3, 10]
    assert [i for i, n in enumerate(mem.packed) if n] == [0, 1, 3, 10]
    p = memory.parent / MEMORY_PACK
    assert os.stat(p).st_mode & 0o777 == 0o600
    assert p.stat().st_size == pack.offsets(mem.packed)[-1]
    # Text packs to little; random bytes barely grow.
    assert mem.packed[0] < CS // 20 and CS < mem.packed[3] < CS + 1024


def test_fetch_run_through_the_pack_and_raw(memory: Path) -> None:
    mem = built(memory)
    raw = memory.read_bytes()
    src = Files(memory.parent)
    for m, file in ((mem, MEMORY_PACK), (PublishedMemory(mem.memory_size, CS, mem.chunks), MEMORY)):
        src.asked.clear()
        parts, received = pack.fetch_run(src, m, 0, 4, 0.0)
        assert parts == [raw[i * CS:(i + 1) * CS] for i in range(4)]
        assert len(src.asked) == 1 and src.asked[0][0] == file and received == src.asked[0][2]
        (last,), _ = pack.fetch_run(src, m, 10, 1, 0.0)
        assert last == raw[10 * CS:] and len(last) == CS // 2
        for i, part in enumerate(parts):
            assert (mem.chunks[i] is None
                    or hashlib.sha256(part).hexdigest() == mem.chunks[i]), i
    # Through the pack, a run of zero chunks asks for nothing.
    src.asked.clear()
    parts, received = pack.fetch_run(src, mem, 5, 3, 0.0)
    assert parts == [bytes(CS)] * 3 and received == 0 and not src.asked


def test_a_bad_frame_unpacks_to_nothing(memory: Path) -> None:
    mem = built(memory)
    at = pack.offsets(mem.packed)
    blob = (memory.parent / MEMORY_PACK).read_bytes()
    frame = blob[at[0]:at[1]]
    assert pack.unpack(frame, CS) == memory.read_bytes()[:CS]
    # Another declared size (a frame that would unpack to gigabytes is
    # refused before anything is allocated), extra bytes, garbage.
    huge = zstandard.ZstdCompressor(level=1).compress(bytes(8 << 20))
    for bad in (huge, frame + b"x", b"\x00" * 64, frame[:len(frame) // 2], b""):
        assert pack.unpack(bad, CS) == b""
    # A flipped byte unpacks (no checksum in the frame) but not to the
    # chunk: its sha256 check fails, as for a raw chunk.
    flipped = bytearray(frame)
    flipped[len(flipped) // 2] ^= 0xFF
    got = pack.unpack(bytes(flipped), CS)
    assert hashlib.sha256(got).hexdigest() != mem.chunks[0]


@pytest.mark.parametrize("packed, why", [
    ([1] * 11, "does not fit"),           # a length for a zero chunk
    ([5, 5, 0, 5, 0, 0, 0, 0, 0, 0], "count"),
    ([5, 5, 0, CS * 2, 0, 0, 0, 0, 0, 0, 5], "does not fit"),
])
def test_manifest_packed_lengths_are_checked(memory: Path, packed: list[int], why: str) -> None:
    mem = built(memory)
    d = {"memory_size": mem.memory_size, "chunk_size": CS, "chunks": list(mem.chunks),
         "packed": packed}
    with pytest.raises(ValueError, match=why):
        PublishedMemory.from_dict(d)
