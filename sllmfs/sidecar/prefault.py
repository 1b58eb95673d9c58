"""Blank segments: hugetlb memfds faulted in at start, which the memory tier builds segments from.

In a VM the first fault on a guest page also makes the host back it: on the H200 machine a fresh
hugetlb page faulted in at 9.2 GB/s (16 threads) the first time and at 30.6-32.4 GB/s every time
after; and every fault of a fresh hugetlb page zeroes 2 MiB, so a fill from the page cache into
fresh memory ran at 18.2 GB/s where a copy into memory already faulted in runs at 45
(bench/NOTES-cold.md). So at start the sidecar faults in memfds of one partition's size (blanks) up to
its memory budget, and the memory tier makes segments out of them: a fill then only copies. A blank is
resized to its partition (a smaller one gives the rest of its pages back to the pool, a larger one
faults in only the difference). Blanks count against --mem-pool-size and are the first memory the
tier gives back when it needs room. On bare metal the pass costs only the zeroing, off the load path.
"""

from __future__ import annotations

import logging
import mmap
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from sllmfs.store.format import HUGE_PAGE, PARTITION_TARGET

log = logging.getLogger("sllmfs.sidecar")

PIECE = 256 << 20  # per worker at a time
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


class Blanks:
    """Unused blanks (fd, length): made by the start-time thread, taken and dropped by the memory tier."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._free: list[tuple[int, int]] = []
        self.closed = False

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(n for _, n in self._free)

    def put(self, fd: int, length: int) -> None:
        with self._lock:
            if not self.closed:
                self._free.append((fd, length))
                return
        os.close(fd)  # the tier closed meanwhile

    def take(self) -> tuple[int, int] | None:
        with self._lock:
            return self._free.pop() if self._free else None

    def drop_one(self) -> bool:
        """Give one blank's pages back to the pool; False when there is none."""
        got = self.take()
        if got is not None:
            os.close(got[0])
        return got is not None

    def close_all(self) -> None:
        with self._lock:
            self.closed = True
            free, self._free = self._free, []
        for fd, _ in free:
            os.close(fd)


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
            fd = _faulted(zero, size, threads)
            if fd is None:
                break
            blanks.put(fd, size)
            made += size
    finally:
        os.close(zero)
    return made, time.perf_counter() - t0


def _faulted(zero: int, size: int, threads: int, piece: int = PIECE) -> int | None:
    """A hugetlb memfd of ``size`` with every page faulted in, or None (no pool, or it ran dry)."""
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
        mm.close()  # the pages stay in the memfd
    if failed[0]:
        os.close(fd)
        return None
    return fd


def run(blanks: Blanks, budget: int, threads: int, room: Callable[[], int] | None = None) -> None:
    """Worker thread at start: make the blanks and log one line."""
    made, seconds = make_blanks(blanks, budget, threads, room=room)
    if made:
        log.info("faulted in %d bytes of hugetlb pages as blank segments in %.2f s (%.1f GB/s): fills write "
                 "into memory already faulted in", made, seconds, made / max(seconds, 1e-9) / 1e9)
