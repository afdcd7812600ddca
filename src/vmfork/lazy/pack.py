"""The compressed memory of a published template: ``memory.zst``.

Owns the pack's format, :func:`build` (hash and compress a memory file in
one pass) and :func:`fetch_run` (a run of chunks from a source, through the
pack when the manifest has one, else from the raw ``memory``).

A pack holds one zstd frame per non-zero chunk, in chunk order, each with
its content size in its header; ``packed[i]`` of the manifest is the length
of chunk *i*'s frame (0 for a zero chunk), so chunk *i* starts at the sum of
the lengths before it and a run of consecutive chunks is one byte range, as
in the raw memory file. Guest memory compresses about 3x where a clone first
reads it (kernel text and data, page tables, the page cache of its
programs) and little where it holds random data: a fetch of the working set
sends a third of the bytes. zstd at level 1 packs 512 MiB in a fraction of a
second on one core, and unpacks a chunk in well under a millisecond.

A frame from a source is untrusted: its declared size must be the chunk's,
and what it unpacks to is checked against the chunk's sha256 by the caller,
as a raw chunk is (a frame that does not unpack is a chunk that does not
match).
"""

from __future__ import annotations

import hashlib
import itertools
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import zstandard

from vmfork.lazy.published import MEMORY, MEMORY_PACK, PublishedMemory, data_chunks

#: zstd level of a pack (1: the fastest; 3 packs a working set 5% smaller at
#: half the speed).
LEVEL = 1


class RangeSource(Protocol):
    """What :func:`fetch_run` reads from (:class:`vmfork.lazy.source.Source`)."""

    def get_range(self, file: str, start: int, length: int, deadline: float) -> bytes: ...


def build(memory: Path, chunk_size: int, pack: Path) -> tuple[tuple[str | None, ...],
                                                                  tuple[int, ...]]:
    """Hash and compress memory file *memory* into the new file *pack*
    (0600): return the sha256 of each chunk (None: all zeros, holes skipped
    without reading) and the length of each chunk's frame (0: zero chunk)."""
    size = memory.stat().st_size
    n = -(-size // chunk_size)
    sums: list[str | None] = [None] * n
    lengths = [0] * n
    zero = bytes(chunk_size)
    cctx = zstandard.ZstdCompressor(level=LEVEL, write_content_size=True)
    fd = os.open(memory, os.O_RDONLY | os.O_CLOEXEC)
    try:
        with open(pack, "xb", opener=_private) as out:
            for i in data_chunks(fd, size, chunk_size):
                data = os.pread(fd, chunk_size, i * chunk_size)
                if data == zero[:len(data)]:
                    continue
                sums[i] = hashlib.sha256(data).hexdigest()
                frame = cctx.compress(data)
                out.write(frame)
                lengths[i] = len(frame)
    finally:
        os.close(fd)
    return tuple(sums), tuple(lengths)


def _private(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)


def offsets(packed: Sequence[int]) -> tuple[int, ...]:
    """Where each chunk's frame starts in the pack (one more: its size)."""
    return (0, *itertools.accumulate(packed))


def source(mem: PublishedMemory) -> tuple[str, tuple[int, ...]]:
    """The file of the layout *mem*'s chunks are fetched from (the pack if
    the manifest has one, else the raw memory) and, for the pack, where each
    chunk's frame starts (:func:`offsets`)."""
    if mem.packed:
        return MEMORY_PACK, offsets(mem.packed)
    return MEMORY, ()


def unpack(frame: bytes, length: int) -> bytes:
    """The chunk of *length* bytes in *frame*; b"" if the frame is not
    exactly one frame declaring that size (the caller's sha256 check then
    fails, as for a corrupted raw chunk)."""
    try:
        if zstandard.frame_content_size(frame) != length:
            return b""
        data = zstandard.ZstdDecompressor().decompress(frame, max_output_size=length,
                                                        allow_extra_data=False)
    except zstandard.ZstdError:
        return b""
    return data if len(data) == length else b""


def fetch_run(src: RangeSource, mem: PublishedMemory, first: int, count: int,
              deadline: float, starts: Sequence[int] = ()) -> tuple[list[bytes], int]:
    """Chunks *first* .. *first* + *count* - 1 of *mem* from *src*, in one
    range request: through the pack if *mem* has one (*starts*: its
    :func:`offsets`, as :func:`source` gives them; computed here if not
    given), else from the raw memory.
    Returns each chunk's bytes, not yet checked against its sha256 (zero
    chunks in the run are zeros), and the bytes received. SourceError as
    :meth:`Source.get_range`."""
    cs, size = mem.chunk_size, mem.memory_size
    lengths = [min(cs, size - i * cs) for i in range(first, first + count)]
    if not mem.packed:
        start = first * cs
        data = src.get_range(MEMORY, start, sum(lengths), deadline)
        return [data[k * cs:k * cs + n] for k, n in enumerate(lengths)], len(data)
    at = starts or offsets(mem.packed)
    start, end = at[first], at[first + count]
    if end == start:
        return [bytes(n) for n in lengths], 0
    data = src.get_range(MEMORY_PACK, start, end - start, deadline)
    out = []
    for k, n in enumerate(lengths):
        i = first + k
        if mem.packed[i] == 0:
            out.append(bytes(n))
        else:
            out.append(unpack(data[at[i] - start:at[i + 1] - start], n))
    return out, len(data)


__all__ = ["LEVEL", "RangeSource", "build", "fetch_run", "offsets", "source", "unpack"]
