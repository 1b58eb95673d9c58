"""The memory a copy reads: mapped cache segments, their readiness bytes, and the page size
that decides how the engine reads them (pin in place or stage through a pinned ring)."""

from __future__ import annotations

import mmap
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from sllmfs.engine.errors import BadPieces, ShortSegment

MiB = 1 << 20
MODES = ("auto", "register", "stage", "hybrid")


def address_of(buffer: Any) -> int:
    """Address of a buffer's first byte (read-only buffers such as PROT_READ mmaps too)."""
    return int(np.frombuffer(buffer, dtype=np.uint8).ctypes.data)


@dataclass(frozen=True)
class Segment:
    """One mapped cache segment and, if it is still being filled, its readiness bytes.

    ``ready`` is the address of one byte per ``chunk_size`` bytes of the
    segment (protocol.messages.Readiness); 0 means every chunk is ready.
    ``owners`` keeps the mappings alive while the segment is in use.
    ``page_size`` is the backing page size when the caller knows it (the cache
    says whether a segment is hugetlb); 0 asks the kernel (/proc/self/smaps,
    ~10 ms in a process with many large mappings).
    """

    base: int
    length: int
    ready: int = 0
    chunk_size: int = 0
    owners: tuple[Any, ...] = ()
    page_size: int = 0

    @classmethod
    def from_buffer(cls, data: Any, ready: Any = None, chunk_size: int = 0) -> Segment:
        length = memoryview(data).nbytes
        ready_addr = 0
        if ready is not None:
            need = -(-length // chunk_size) if chunk_size else 0
            if chunk_size <= 0 or memoryview(ready).nbytes < need:
                raise BadPieces(f"readiness needs chunk_size > 0 and {need} bytes for a {length}-byte segment")
            ready_addr = address_of(ready)
        return cls(address_of(data) if length else 0, length, ready_addr, chunk_size, (data, ready))

    def as_tuple(self) -> tuple[int, int, int, int]:
        return (self.base, self.length, self.ready, self.chunk_size)


@dataclass(frozen=True)
class FileSegment:
    """A stored partition file read by the copy itself instead of a mapping (stage mode only): the
    stagers read it through the page cache into their pinned ring, each ``window`` bytes checked against
    ``digests`` (the manifest's xxh3_64 per window, uint64) before they move on (csrc/plan.h).
    ``fd`` stays open, and ``digests`` alive, until the copy returns. ``name``: what its errors call it
    (the file's name; "" = "segment <index>"). ``tee``: ``length`` writable bytes that get a
    copy of every byte read (the memory tier's segment for this file: one disk read fills both); ``teed``
    then says, per window, which were copied there whole and matched their digest (1) once the copy returns."""

    fd: int
    length: int
    digests: np.ndarray
    window: int
    name: str = ""
    tee: np.ndarray | None = None  # uint8, ``length`` bytes: held here, so its mapping cannot close meanwhile
    teed: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.tee is None:
            return
        windows = -(-self.length // self.window) if self.window > 0 else 0
        for what, arr, size in (("tee", self.tee, self.length), ("teed", self.teed, windows)):
            if arr is None or arr.dtype != np.uint8 or not arr.flags.c_contiguous or not arr.flags.writeable \
                    or arr.size < size:
                raise BadPieces(f"a file segment's {what} must be {size} writable contiguous bytes")

    @classmethod
    def of(cls, fd: int, length: int, hex_digests: Sequence[str], window: int, name: str = "",
           tee: np.ndarray | None = None) -> FileSegment:
        need = -(-length // window) if window > 0 else -1
        if need != len(hex_digests):
            raise BadPieces(f"a {length}-byte file in {window}-byte windows needs {need} digests, "
                            f"got {len(hex_digests)}")
        teed = np.zeros(max(need, 1), dtype=np.uint8) if tee is not None else None
        return cls(fd, length, np.array([int(h, 16) for h in hex_digests], dtype=np.uint64), window, name, tee, teed)

    def as_tuple(self) -> tuple[int | str, ...]:
        row: tuple[int | str, ...] = (0, self.length, 0, 0, self.fd, int(self.digests.ctypes.data), self.window,
                                      self.name)
        if self.tee is None or self.teed is None:
            return row
        return (*row, int(self.tee.ctypes.data), int(self.teed.ctypes.data))


MappedSegment = Segment | tuple[int, int, int, int]  # (base, length, ready, chunk_size), as the native side takes
SegmentLike = MappedSegment | FileSegment


def segment_tuples(segments: Sequence[SegmentLike]) -> list[tuple[int | str, ...]]:
    out: list[tuple[int | str, ...]] = []
    for s in segments:
        if isinstance(s, FileSegment):
            out.append(s.as_tuple())
            continue
        base, length, ready, chunk = s.as_tuple() if isinstance(s, Segment) else s
        out.append((int(base), int(length), int(ready), int(chunk)))
    return out


def map_segment(fd: int, length: int) -> mmap.mmap:
    """Map a segment fd read-only, refusing one shorter than expected (touching past its end would SIGBUS)."""
    size = os.fstat(fd).st_size
    if size < length:
        raise ShortSegment(f"segment fd {fd} holds {size} bytes but {length} are expected")
    return mmap.mmap(fd, length, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)


def kernel_page_sizes(addrs: Sequence[int]) -> list[int]:
    """Page size backing each address's mapping (4096 unless hugetlb), from one pass over /proc/self/smaps."""
    found: dict[int, int] = {}
    want = sorted(set(addrs))
    try:
        with open("/proc/self/smaps") as f:
            inside: list[int] = []
            for line in f:
                if not inside:
                    head = line.split(" ", 1)[0]
                    if "-" in head and ":" not in head:
                        lo, _, hi = head.partition("-")
                        a, b = int(lo, 16), int(hi, 16)
                        inside = [x for x in want if a <= x < b]
                elif line.startswith("KernelPageSize:"):
                    for x in inside:
                        found[x] = int(line.split()[1]) * 1024
                    inside = []
                    if len(found) == len(want):
                        break
    except (OSError, ValueError):
        pass
    return [found.get(a, 4096) for a in addrs]


def choose_mode(segments: Sequence[SegmentLike]) -> str:
    """auto: pin huge-page segments in place (cheap, then copies run at link speed),
    stage 4 KiB-page ones (pinning them costs more than the copy; measured in bench/NOTES-copy-engine.md)."""
    if any(isinstance(s, FileSegment) for s in segments):
        return "stage"  # only the stagers read files
    live = [s if isinstance(s, Segment) else Segment(*s) for s in segments if not isinstance(s, FileSegment)]
    live = [s for s in live if s.length > 0]
    if not live:
        return "stage"
    unknown = [s.base for s in live if not s.page_size]
    sizes = iter(kernel_page_sizes(unknown) if unknown else [])
    if all((s.page_size or next(sizes)) >= 2 * MiB for s in live):
        return "register"
    return "stage"
