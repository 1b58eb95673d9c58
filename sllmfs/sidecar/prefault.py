"""Touch the hugetlb reservation once at start, so the first fill does not pay the VM's first touch.

In a VM the first fault on a guest page also makes the host back it: on the H200 machine a fresh
hugetlb page faulted in at 9.2 GB/s (16 threads) the first time and at 30.6-32.4 GB/s every time
after (bench/NOTES-cold.md, "first touch"). Pages freed to the hugetlb pool stay backed, so one pass
over the reservation at start moves that cost off the first load. On bare metal the pass is cheap
(zeroing only) and changes nothing else: the pages go back to the pool right away.
"""

from __future__ import annotations

import logging
import mmap
import os
import threading
import time
from pathlib import Path

log = logging.getLogger("sllmfs.sidecar")

PIECE = 256 << 20  # per worker at a time: a fill starting meanwhile finds the pool all but full


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


def touch_hugepages(budget: int, threads: int, piece: int = PIECE) -> tuple[int, float]:
    """Fault in (and give back) up to ``budget`` bytes of free hugetlb pages, ``threads`` pieces at a
    time. Returns (bytes touched, seconds); a piece that cannot be had ends that worker quietly."""
    free, size = hugepages_free()
    total = min(free * size, budget) // piece * piece if size else 0
    if total <= 0:
        return 0, 0.0
    left = [total // piece]
    done = [0]
    lock = threading.Lock()
    zero = os.open("/dev/zero", os.O_RDONLY | os.O_CLOEXEC)

    def worker() -> None:
        while True:
            with lock:
                if left[0] == 0:
                    return
                left[0] -= 1
            if not _touch_piece(zero, piece):
                return
            with lock:
                done[0] += piece

    t0 = time.perf_counter()
    try:
        ts = [threading.Thread(target=worker, name=f"prefault-{i}", daemon=True) for i in range(max(1, threads))]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
    finally:
        os.close(zero)
    return done[0], time.perf_counter() - t0


def _touch_piece(zero: int, piece: int) -> bool:
    try:
        fd = os.memfd_create("sllmfs:prefault", os.MFD_CLOEXEC | os.MFD_HUGETLB)
    except OSError:
        return False
    try:
        os.ftruncate(fd, piece)
        mm = mmap.mmap(fd, piece, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    except OSError:  # the pool ran dry (a fill took it): nothing to do
        os.close(fd)
        return False
    view = memoryview(mm)
    try:  # preadv drops the GIL: the kernel faults each page in as it copies zeroes into it
        for off in range(0, piece, 32 << 20):
            os.preadv(zero, [view[off:min(off + (32 << 20), piece)]], 0)
        return True
    except OSError:  # SIGBUS-free failure of a hugetlb fault (pool raced away) reads as EFAULT
        return False
    finally:
        view.release()
        mm.close()
        os.close(fd)


def run(budget: int, threads: int) -> None:
    """Worker thread at start: touch and log one line."""
    touched, seconds = touch_hugepages(budget, threads)
    if touched:
        log.info("touched %d bytes of hugetlb pages in %.2f s (%.1f GB/s): the first fill skips the first-touch "
                 "cost", touched, seconds, touched / max(seconds, 1e-9) / 1e9)
