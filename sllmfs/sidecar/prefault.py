"""Blank segments: hugetlb memfds faulted in at start, which the memory tier builds segments from.

In a VM the first fault on a guest page also makes the host back it: on the H200 machine a fresh
hugetlb page faulted in at 9.2 GB/s (16 threads) the first time and at 30.6-32.4 GB/s every time
after; and every fault of a fresh hugetlb page zeroes 2 MiB, so a fill from the page cache into
fresh memory ran at 18.2 GB/s where a copy into memory already faulted in runs at 45
(bench/NOTES-cold.md). So at start the sidecar faults in memfds of one partition's size (blanks) up to
its memory budget, and the memory tier makes segments out of them: a fill then only copies. A blank is
resized to its partition (a smaller one gives the rest of its pages back to the pool, once its pins
there are gone: memtier.Segment; a larger one faults in only the difference). Blanks count against
--mem-pool-size and are the first memory the tier gives back when it needs room. On bare metal the
pass costs only the zeroing, off the load path.
"""

from __future__ import annotations

import logging
import mmap
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from sllmfs.engine.segments import address_of
from sllmfs.store.format import HUGE_PAGE, PARTITION_TARGET

log = logging.getLogger("sllmfs.sidecar")

PIECE = 256 << 20  # per worker at a time
# a blank is pinned for GPU copies in pieces this size, so a segment shrinking its blank to a partition
# keeps the pieces that start below its end and unpins those past it (after the load: memtier.Segment);
# a multiple of the copy engine's 64 MiB blocks, so a block never spans two pins
PIN_PIECE = 256 << 20
BLANK = PARTITION_TARGET  # a blank fits one partition of the store (a multiple of HUGE_PAGE)
MIN_BLANK = 64 << 20


def hugepages_free(meminfo: Path = Path("/proc/meminfo")) -> tuple[int, int]:
    """(free hugetlb pages, page size in bytes) of the default pool; (0, 0) when there is none."""
    free = size = 0
    try:
        for line in meminfo.read_text().splitlines():
            key, _, rest = line.partition(":")
            if key == "HugePages_Free":
                free = int(rest.split()[0])
            elif key == "Hugepagesize":
                size = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        return 0, 0
    return free, size


Unpin = Callable[[int, int], None]  # unpin the pin pieces starting in [address, address + length)


class Blank:
    """A hugetlb memfd faulted in, with the map it was faulted in through: kept, because a pin
    (cudaHostRegister) belongs to a map, so a segment made of a pinned blank keeps its pins (a
    tier-empty load then pins nothing on its path: bench/NOTES-cold.md, run 9)."""

    def __init__(self, fd: int, length: int, mm: mmap.mmap):
        self.fd, self.length, self.mm = fd, length, mm
        self.unpin: Unpin | None = None  # set once pinned for GPU copies (in PIN_PIECE pieces)

    @property
    def address(self) -> int:
        return address_of(self.mm)

    def unpin_from(self, offset: int) -> None:
        """Unpin every piece at or past ``offset`` (a multiple of PIN_PIECE); 0: all, before the map goes."""
        if self.unpin is not None and offset < self.length:
            self.unpin(self.address + offset, self.length - offset)
        if offset == 0:
            self.unpin = None

    def close(self) -> None:
        """Unpinned, unmapped, closed: its pages go back to the pool."""
        self.unpin_from(0)
        self.mm.close()
        os.close(self.fd)


class Blanks:
    """Unused blanks: made by the start-time thread, taken and dropped by the memory tier; pinned for
    GPU copies by ``pin`` (the GPU copier's, once its engines exist) before they are offered."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._free: list[Blank] = []
        self.closed = False
        self.pin: Callable[[Blank], None] | None = None

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(b.length for b in self._free)

    @property
    def pinned_bytes(self) -> int:
        """Of ``nbytes``, what is pinned for GPU copies."""
        with self._lock:
            return sum(b.length for b in self._free if b.unpin is not None)

    def put(self, blank: Blank) -> None:
        with self._lock:  # pin_all sets pin under this lock: a blank is either listed before it or pinned here
            pin = None if blank.unpin is not None else self.pin
            if pin is None and not self.closed:
                self._free.append(blank)
                return
        if pin is not None:
            try:
                pin(blank)  # before it is offered: a blank is never taken half pinned (a failed pin leaves it unpinned)
            except BaseException:
                blank.close()  # not listed, so not left mapped with nobody to close it
                raise
            with self._lock:
                if not self.closed:
                    self._free.append(blank)
                    return
        blank.close()  # the tier closed meanwhile

    def take(self, *, pinned: bool = True) -> Blank | None:
        """A blank for a segment, a pinned one first (``pinned=False``: an unpinned one first)."""
        with self._lock:
            at = next((i for i in range(len(self._free) - 1, -1, -1)
                       if (self._free[i].unpin is not None) == pinned), -1)
            return self._free.pop(at) if self._free else None

    def pin_all(self, pin: Callable[[Blank], None]) -> int:
        """From now on every blank is pinned by ``pin`` before it is offered; those offered already are
        taken out one at a time, pinned and offered again (a worker thread: a pin takes a while, and a
        fill meanwhile finds the others). Returns how many were pinned."""
        with self._lock:
            self.pin = pin
        tried: set[int] = set()
        while True:
            with self._lock:
                if self.closed:  # stopping: the rest stay unpinned (close_all closes them)
                    return sum(1 for b in self._free if id(b) in tried and b.unpin is not None)
                b = next((b for b in self._free if b.unpin is None and id(b) not in tried), None)
                if b is None:
                    return sum(1 for b in self._free if id(b) in tried and b.unpin is not None)
                self._free.remove(b)
            tried.add(id(b))
            self.put(b)  # pinned there (a refused pin offers it unpinned)

    def drop_one(self) -> bool:
        """Give one blank's pages back to the pool, an unpinned one first (the pinned are worth more, and
        an unpin costs); False when there is none."""
        got = self.take(pinned=False)
        if got is not None:
            got.close()
        return got is not None

    def close_all(self) -> None:
        with self._lock:
            self.closed = True
            free, self._free = self._free, []
        for b in free:
            b.close()


def make_blanks(blanks: Blanks, budget: int, threads: int, size: int = BLANK,
                room: Callable[[], int] | None = None) -> tuple[int, float]:
    """Fault in blanks of ``size`` while the hugetlb pool has one more free and ``budget`` room for it,
    ``threads`` pieces at a time. ``room``: asked before each blank, the bytes the memory tier still
    lets blanks take (none once a fill has started: it wants the pool). Returns (bytes made, seconds);
    the first failure ends the pass quietly."""
    # a quarter of the budget at most: a small tier still gets several (and a partition its own)
    size = min(size, max(MIN_BLANK, budget // 4 // HUGE_PAGE * HUGE_PAGE))
    made = 0
    t0 = time.perf_counter()
    zero = os.open("/dev/zero", os.O_RDONLY | os.O_CLOEXEC)
    try:
        while not blanks.closed and made + size <= budget and (room is None or room() >= size):
            free, page = hugepages_free()
            if page != HUGE_PAGE or free * page < size:
                break
            blank = _faulted(zero, size, threads)
            if blank is None:
                break
            if room is not None and room() < size:  # a reserve took the room while it faulted in: give it back
                blank.close()
                break
            blanks.put(blank)
            made += size
    finally:
        os.close(zero)
    return made, time.perf_counter() - t0


def _faulted(zero: int, size: int, threads: int, piece: int = PIECE) -> Blank | None:
    """A hugetlb memfd of ``size`` with every page faulted in through the map it keeps, or None (no
    pool, or it ran dry)."""
    try:
        fd = os.memfd_create("sllmfs:blank", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING | os.MFD_HUGETLB)
    except OSError:
        return None
    try:
        os.ftruncate(fd, size)
        mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    except OSError:  # the pool ran dry (a fill took it)
        os.close(fd)
        return None
    view = memoryview(mm)
    left = list(range(0, size, piece))
    lock = threading.Lock()
    failed = [False]

    def worker() -> None:
        while True:
            with lock:
                if not left or failed[0]:
                    return
                off = left.pop()
            try:  # preadv drops the GIL: the kernel faults each page in as it copies zeroes into it
                os.preadv(zero, [view[off:min(off + piece, size)]], 0)
            except OSError:  # a hugetlb fault the pool could not serve reads as EFAULT, never SIGBUS
                failed[0] = True

    try:
        ts = [threading.Thread(target=worker, name=f"prefault-{i}", daemon=True) for i in range(max(1, threads))]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
    finally:
        view.release()
    if failed[0]:
        mm.close()
        os.close(fd)
        return None
    return Blank(fd, size, mm)


def run(blanks: Blanks, budget: int, threads: int, room: Callable[[], int] | None = None) -> None:
    """Worker thread at start: make the blanks and log one line."""
    made, seconds = make_blanks(blanks, budget, threads, room=room)
    if made:
        log.info("faulted in %d bytes of hugetlb pages as blank segments in %.2f s (%.1f GB/s): fills write "
                 "into memory already faulted in (blanks now %d bytes, %d pinned for GPU copies)", made, seconds,
                 made / max(seconds, 1e-9) / 1e9, blanks.nbytes, blanks.pinned_bytes)
