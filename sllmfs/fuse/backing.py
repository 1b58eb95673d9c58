"""Passthrough backing files: a sealed memfd holding one safetensors file byte for byte.

FUSE passthrough needs a kernel file that *is* the file. A variant stored as its safetensors files
has one in the memory tier where shmem gives 2 MiB pages (a ResidentFile's answer: adopted, no copy;
an evicted variant's pages stay while its backing does). Otherwise (an aligned variant, whose 4 KiB-
aligned partitions are not the file; a tier on hugetlb, which the kernel refuses as a backing) the
first open of a resident variant's file copies its bytes, from the segments the sidecar verified as it
filled them, into a memfd (header + tensors back to back), seals it, and lets the kernel serve every
read and mmap of it from there. The copy costs memory: one more copy of that file while it is open
and for ``LINGER`` seconds after (loaders open a file several times); an unopened one goes at the
first expiry pass after its variant leaves the tier (every few seconds: until then an open may still
be served from it, the same verified bytes of the same version, and its bytes still count against
the memory budget). Only verified bytes of one committed version go in, and a replaced model gets
new inodes (tree.py), so a backing never shows stale bytes.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import mmap
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import trio

from sllmfs.core import cgroup
from sllmfs.core.config import usable_cpus
from sllmfs.core.pages import shmem_thp, thp_file_counts
from sllmfs.fuse import kernel
from sllmfs.fuse.synth import SynthFile
from sllmfs.fuse.tierfile import TierFile
from sllmfs.store.store import Identity

log = logging.getLogger(__name__)

# (model, variant, identity, file name) -> the memory tier's own sealed memfd holding exactly that
# synthesized file, verified, lent to us (tierfile.py), or None. For a memory tier that lays a variant out
# as its safetensors files: then the backing is the tier's own memory (no copy, no second copy held).
ResidentFile = Callable[[str, str, Identity, str], "TierFile | None"]

class CopyBudget(Protocol):
    """Whose memory budget a backing copy counts against (the sidecar's memory tier: --mem-pool-size)."""

    def hold_copy(self, nbytes: int, source: tuple[str, str]) -> bool:
        """Count ``nbytes`` more, making room if it can (never by evicting ``source``, the (model,
        variant) the copy is made from); False: no room, the file is read through the daemon."""
        ...

    def free_copy(self, nbytes: int) -> None:
        """A copy's bytes are given back."""
        ...


RESERVE = 0.10  # of the memory the host (or our cgroup) has: a backing never eats into it
LINGER = 60.0  # seconds an unopened backing stays (a loader's next open of the file is free)
COPY_PIECE = 64 << 20  # one copy job: large enough to stream, small enough to spread over threads
COPY_THREADS = min(8, usable_cpus())
MAPPED_COPY_THREADS = min(16, usable_cpus())  # faults of huge pages scale with threads (NOTES-mount.md)
SEALS = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE
F_SEAL_FUTURE_WRITE = getattr(fcntl, "F_SEAL_FUTURE_WRITE", 0x0010)


@dataclass
class Backing:
    fd: int
    backing_id: int
    size: int  # bytes of a copy (counted in the budget); 0: the tier's own file
    opens: int = 0
    lent: TierFile | None = None  # the tier's own file it is (its fd is lent.fd), given back when it goes
    idle_since: float = field(default_factory=time.monotonic)


def build(synth: SynthFile, views: list[memoryview], *, mapped: bool | None = None) -> int:
    """A sealed memfd with ``synth``'s bytes: its header, then each extent from its segment.

    ``mapped`` (default: where shmem gives 2 MiB pages to mappings that ask): copy through a mapping
    of the memfd, threads faulting its pages in parallel, instead of ``pwrite``, which shmem serializes
    on the file's lock (one writer at a time: 3.1 GB/s on the H200 whatever the threads). With 4 KiB
    pages the faults cost as much as that lock, so the mapping only pays with huge pages."""
    fd = os.memfd_create(f"sllmfs:{synth.name}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, synth.size)
        jobs: list[tuple[int, memoryview]] = []
        for e in synth.extents:
            src = (memoryview(synth.header) if e.partition < 0 else views[e.partition])[
                e.source_offset:e.source_offset + e.length]
            for at in range(0, e.length, COPY_PIECE):
                jobs.append((e.offset + at, src[at:at + COPY_PIECE]))
        if synth.size and (shmem_thp() if mapped is None else mapped):
            _copy_mapped(fd, synth.size, jobs)
        else:
            with ThreadPoolExecutor(COPY_THREADS, thread_name_prefix="sllmfs-backing") as pool:
                for _ in pool.map(lambda job: _pwrite_all(fd, job[1], job[0]), jobs):
                    pass
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)  # nothing changes these bytes from here on
        return fd
    except BaseException:
        os.close(fd)
        raise


def _copy_mapped(fd: int, size: int, jobs: list[tuple[int, memoryview]]) -> None:
    mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    try:
        with contextlib.suppress(OSError, AttributeError):
            mm.madvise(mmap.MADV_HUGEPAGE)  # 2 MiB pages: 512x fewer faults, each zeroed in the kernel
        _copy_into(np.frombuffer(mm, dtype=np.uint8), jobs)  # no view of the map outlives the call
    except BaseException:
        with contextlib.suppress(BufferError):  # a view still held by the failure: it goes with the fd
            mm.close()
        raise
    mm.close()  # before sealing: F_SEAL_WRITE refuses a file with a writable shared mapping


def _copy_into(dst: np.ndarray | None, jobs: list[tuple[int, memoryview]]) -> None:
    def copy(job: tuple[int, memoryview]) -> None:  # numpy copies without the GIL
        assert dst is not None
        np.copyto(dst[job[0]:job[0] + job[1].nbytes], np.frombuffer(job[1], dtype=np.uint8))

    try:
        with ThreadPoolExecutor(MAPPED_COPY_THREADS, thread_name_prefix="sllmfs-backing") as pool:
            for _ in pool.map(copy, jobs):
                pass
    finally:
        dst = None  # the closure's cell too: a traceback holding these frames holds no view of the map


def room() -> int:
    """Bytes a backing may take now: what the host has available, or our cgroup (a pod's limit:
    memfd pages are charged to it) has left, less a reserve; a copy past it would meet the OOM killer."""
    info = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, _, value = line.partition(":")
            info[key] = int(value.split()[0]) * 1024
    free = info.get("MemAvailable", 0) - int(info.get("MemTotal", 0) * RESERVE)
    for limit, used in cgroup.memory_limits():  # memfd pages are charged to each level: the tightest binds
        free = min(free, int(limit * (1 - RESERVE)) - used)
    return free


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while len(data):
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n


class Backings:
    """The backing file of each passthrough inode, shared by its opens (the kernel insists on one)."""

    def __init__(self, dev: int, budget: CopyBudget | None = None):
        self.dev = dev
        self.budget = budget  # None: copies count against nothing but the host's free memory
        self._by_inode: dict[int, Backing] = {}
        self._building: dict[int, trio.Event] = {}

    @property
    def bytes_held(self) -> int:
        return sum(b.size for b in self._by_inode.values())

    def get(self, inode: int) -> Backing | None:
        return self._by_inode.get(inode)

    def inodes(self) -> list[int]:
        return list(self._by_inode)

    def share(self, inode: int) -> None:
        """One more open of an inode whose backing exists."""
        self._by_inode[inode].opens += 1

    async def acquire(self, inode: int, synth: SynthFile, views: list[memoryview] | None, label: str,
                      lent: TierFile | None = None, source: tuple[str, str] = ("", "")) -> Backing:
        """The inode's backing, built on first use (concurrent first opens wait for one build);
        ``views``: the resident segments to build it from (None: only an existing one will do);
        ``label``: what the log line calls the file; ``lent``: the memory tier's own copy of the
        file (a ResidentFile's answer, adopted instead of building one; given back here unless adopted);
        ``source``: the (model, variant) the views are of (the budget never evicts it for the copy)."""
        try:
            while inode in self._building:
                await self._building[inode].wait()
        except BaseException:  # cancelled: the tier's file goes back, or its resident would stay forever
            if lent is not None:
                lent.close()
            raise
        # an evicted copy still open is shared (the kernel takes one backing per inode); it goes at its last close
        b = self._by_inode.get(inode)
        if b is not None and lent is not None:
            lent.close()
        elif b is None and lent is not None:
            b = self._adopt(inode, lent, synth)
        if b is None:
            if views is None:
                raise OSError(errno.ENODATA, "the variant left the memory tier")
            free = room()
            if synth.size > free:
                raise OSError(errno.ENOMEM, f"{synth.size / 1e9:.2f} GB would not fit in the {max(free, 0) / 1e9:.2f} "
                                            "GB of memory left")
            if self.budget is not None and not self.budget.hold_copy(synth.size, source):
                raise OSError(errno.ENOMEM, f"a {synth.size / 1e9:.2f} GB copy does not fit in the memory pool "
                                            "(--mem-pool-size) beside what is leased, pinned or filling")
            done = self._building[inode] = trio.Event()
            try:
                t0, pages0 = time.perf_counter(), thp_file_counts()
                try:
                    fd = await trio.to_thread.run_sync(build, synth, views)
                    try:
                        backing_id = kernel.backing_open(self.dev, fd)
                    except OSError:
                        os.close(fd)
                        raise
                except BaseException:
                    if self.budget is not None:
                        self.budget.free_copy(synth.size)
                    raise
                b = self._by_inode[inode] = Backing(fd, backing_id, synth.size)
                pages1 = thp_file_counts()  # host-wide: what else got huge pages meanwhile counts too
                log.info("passthrough: %s (%.2f GB) copied from the memory tier into a backing file in %.2f s "
                         "(2 MiB pages %d, fell back %d); the kernel serves its reads", label, synth.size / 1e9,
                         time.perf_counter() - t0, pages1[0] - pages0[0], pages1[1] - pages0[1])
            finally:
                del self._building[inode]
                done.set()
        b.opens += 1
        return b

    def _adopt(self, inode: int, lent: TierFile, synth: SynthFile) -> Backing:
        fd = lent.fd
        try:
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
            fixed = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
            # no writer but the tier's own map, made before the seal (FUTURE_WRITE), or none at all (WRITE)
            unwritten = seals & (fcntl.F_SEAL_WRITE | F_SEAL_FUTURE_WRITE)
            if os.fstat(fd).st_size != synth.size or seals & fixed != fixed or not unwritten:  # its bytes could change
                raise OSError(errno.EINVAL, f"the memory tier's {synth.name} is not a sealed file of its size")
            backing_id = kernel.backing_open(self.dev, fd)
        except OSError:
            lent.close()
            raise
        b = self._by_inode[inode] = Backing(fd, backing_id, 0, lent=lent)  # the tier's memory
        lent.opened = lambda: b.opens > 0
        lent.let_go = lambda: self._let_go(inode, b)
        log.info("passthrough: %s (%.2f GB) is the memory tier's own file, no copy; the kernel serves its reads",
                 synth.name, synth.size / 1e9)
        return b

    def _let_go(self, inode: int, b: Backing) -> None:
        """The tier wants its file back (its variant is being evicted): drop the backing unless it is open."""
        if self._by_inode.get(inode) is b and b.opens == 0:
            self._drop(inode)

    def release(self, inode: int) -> None:
        b = self._by_inode.get(inode)
        if b is not None:
            b.opens -= 1
            if b.opens == 0:
                b.idle_since = time.monotonic()
                if b.lent is not None and b.lent.evicted:  # the tier's evicted copy: its pages go now
                    self._drop(inode)

    def expire(self, still_resident: dict[int, bool], now: float | None = None) -> None:
        """Drop unopened backings idle past LINGER, or whose variant left the memory tier."""
        now = time.monotonic() if now is None else now
        for inode, b in list(self._by_inode.items()):
            if b.opens == 0 and (now - b.idle_since > LINGER or not still_resident.get(inode, False)):
                self._drop(inode)

    def close_all(self) -> None:
        for inode in list(self._by_inode):
            self._drop(inode)

    def _drop(self, inode: int) -> None:
        b = self._by_inode.pop(inode)
        try:  # the kernel keeps its own reference while a file (or mapping) still uses it
            kernel.backing_close(self.dev, b.backing_id)
        except OSError as e:
            log.debug("closing backing %d: %s", b.backing_id, e)
        if b.lent is not None:
            b.lent.close()  # the tier's pages may go now
        else:
            os.close(b.fd)
        if self.budget is not None and b.size:
            self.budget.free_copy(b.size)
