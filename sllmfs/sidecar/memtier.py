"""The memory tier: memfd segments that clients map, under a byte budget with LRU eviction.

One segment per stored partition, with the partition file's exact byte layout, so
a manifest entry's (partition, offset, nbytes) is directly (segment, offset, nbytes).
Each resident variant also has a small readiness segment: one byte per 4 MiB
window of each partition (protocol.messages.Readiness).

Only the trio thread mutates this state; fill threads write bytes into the maps, and the after-fill pin
(a worker thread) gives back the pins a segment holds past its end (Segment.drop_past_end, under its lock).
"""

from __future__ import annotations

import fcntl
import logging
import mmap
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from sllmfs.core.errors import BadInput
from sllmfs.core.pages import shmem_thp
from sllmfs.engine.segments import address_of
from sllmfs.fuse.tierfile import TierFile
from sllmfs.protocol.messages import FailCause, Failure, Readiness, TensorRef
from sllmfs.sidecar.prefault import PIN_PIECE, Blank, Blanks, Unpin
from sllmfs.store.format import CHUNK_SIZE, HUGE_PAGE, Manifest
from sllmfs.store.store import Identity

log = logging.getLogger("sllmfs.sidecar")

PAGE = mmap.PAGESIZE
HUGE_MIN = 64 << 20
# fill.py's names for the states it writes (the states themselves: protocol.messages.Readiness)

_SIZE_SEALS = getattr(fcntl, "F_SEAL_SHRINK", 0x0002) | getattr(fcntl, "F_SEAL_GROW", 0x0004)
# Linux >= 5.1: no write(), no new writable shared map and (>= 6.7) no mprotect to writable, for any
# process and any open of the memfd, root's included; the daemon's own map, made before, stays writable
F_SEAL_FUTURE_WRITE = getattr(fcntl, "F_SEAL_FUTURE_WRITE", 0x0010)
F_SEAL_SEAL = getattr(fcntl, "F_SEAL_SEAL", 0x0001)


def _round_up(n: int, unit: int) -> int:
    return -(-n // unit) * unit


class Segment:
    """A memfd that only the daemon's own mapping can write: sealed against writes before any
    client sees it (clients share the bytes; one must never change what the others read)."""

    def __init__(self, name: str, size: int, *, huge: bool = True, blank: Blank | None = None, exact: bool = False):
        """``blank``: a hugetlb memfd already faulted in (prefault.Blanks) to make it from; ours to close.
        ``exact``: a shmem memfd of exactly ``size`` bytes (2 MiB pages where shmem gives them): a stored
        file's twin, which the mount may hand the kernel as the file's passthrough backing (never hugetlb:
        the kernel refuses it, ELOOP)."""
        self.size = size
        self.huge = False
        self.pinned = False  # its blank's pins for GPU copies cover it all (the resident must unpin them)
        self._unpin: Unpin | None = None
        self.cut_s = 0.0  # seconds cutting its blank to size (NOTES-cold run 12: the reserve's share)
        # hugetlb pages past the end that the shrink took out of the file but pins still hold (so still
        # allocated): the piece crossing the end for the segment's life, the pieces past it until
        # drop_past_end (after the load: an unpin costs the driver ~3.4 ms per 256 MiB on the H200)
        self.past_end = 0
        self._span = 0  # bytes its map covers (a blank's whole length): close unpins every piece in it
        self._dead: tuple[int, int] | None = None  # (offset, length) of the pin pieces wholly past the end
        self._pins_lock = threading.Lock()  # drop_past_end (a worker thread) against close (the trio thread)
        if blank is not None:
            self._from_blank(_round_up(size, HUGE_PAGE), blank)
        elif self.wants_huge(size, huge and not exact):
            self._open(name, _round_up(size, HUGE_PAGE), os.MFD_HUGETLB)
        if not self.huge:
            self._open(name, size if exact and size else _round_up(max(size, 1), PAGE), 0)
            try:  # transparent huge pages where shmem allows them: fewer pages to register
                self.mm.madvise(mmap.MADV_HUGEPAGE)
            except (OSError, AttributeError):
                pass

    @staticmethod
    def wants_huge(size: int, huge: bool = True) -> bool:
        # hugetlb halves GPU registration cost; big segments round up (<2 MiB waste), small ones must fit
        return huge and size >= HUGE_PAGE and (size % HUGE_PAGE == 0 or size >= HUGE_MIN)

    def _from_blank(self, length: int, blank: Blank) -> None:
        """Keep the blank's map and all its pins; the memfd shrinks to the partition's end and is sealed
        at that size here, before any client sees it. The pages past the end leave the file; the pinned
        ones stay allocated until unpinned (the kernel frees a pinned page at its unpin; checked against
        the driver by bench/truncate_pinned.py), which is not on the load's path: the piece crossing the
        end stays pinned whole (the copy reads the segment's last bytes through it), the pieces past it
        go in drop_past_end. The map reaches past the end of the memfd: nothing touches a segment past
        its size. A blank too small grows through a new map of the whole (only the rest faults; unpinned)."""
        if length > blank.length:
            blank.unpin_from(0)
            blank.mm.close()
            self._open("", length, os.MFD_HUGETLB, blank.fd)
            return
        if length < blank.length:
            t0 = time.monotonic()
            try:
                os.ftruncate(blank.fd, length)
            except OSError:
                blank.close()
                raise
            if blank.unpin is not None:
                self.past_end = blank.length - length
                keep = _round_up(length, PIN_PIECE)  # the pieces that start below the end
                if keep < blank.length:
                    self._dead = (keep, blank.length - keep)
            self.cut_s = time.monotonic() - t0
        try:
            self._seal(blank.fd)
        except OSError:
            self.past_end, self._dead = 0, None
            blank.close()  # unpinned before its map goes
            raise
        self.pinned = blank.unpin is not None
        self._unpin = blank.unpin  # what close() unpins with, if nothing did before
        self._span = blank.length
        self.fd, self.mm, self.length, self.huge = blank.fd, blank.mm, length, True

    @property
    def held(self) -> int:
        """Bytes of memory it holds: its pages and the pinned ones past its end."""
        return self.length + self.past_end

    def drop_past_end(self) -> int:
        """Unpin the pin pieces wholly past the end (worker thread; no copy reads there, so no bus lock);
        their pages go back to the pool. Returns the bytes given back."""
        with self._pins_lock:
            dead, self._dead = self._dead, None
            if dead is None or self._unpin is None:
                return 0
            self._unpin(address_of(self.mm) + dead[0], dead[1])
            self.past_end -= dead[1]
            return dead[1]

    def _open(self, name: str, length: int, flag: int, fd: int | None = None) -> None:
        if fd is None:
            fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING | flag)
        try:  # a blank shrinks (the rest of its pages go back to the pool) or grows (only the rest faults)
            os.ftruncate(fd, length)
            mm = mmap.mmap(fd, length, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError:
            os.close(fd)
            if flag:  # no huge pages reserved: caller falls back to normal pages
                return
            raise
        try:
            self._seal(fd)
        except OSError:
            mm.close()
            os.close(fd)
            raise
        self.fd, self.mm, self.length, self.huge = fd, mm, length, bool(flag)

    @staticmethod
    def _seal(fd: int) -> None:
        """Sealed before any client sees it; the daemon's map, made before, stays the one writable map."""
        os.fchmod(fd, 0o400)  # no other uid may reopen it (/proc/<pid>/fd) at all
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SIZE_SEALS)  # never shrunk under a reader (SIGBUS)
        try:
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, F_SEAL_FUTURE_WRITE | F_SEAL_SEAL)
        except OSError as e:  # a kernel before 5.1: other uids are still kept out by the mode
            log.warning("cannot seal memory segments against writes (%s); Linux >= 5.1 can", e.strerror)

    @property
    def exact(self) -> bool:
        """Its memfd is exactly the stored file (a passthrough backing may be made of it)."""
        return not self.huge and self.length == self.size

    def readonly_fd(self) -> int:
        """A fresh read-only open of the same memfd: what a client gets (it cannot write)."""
        return os.open(f"/proc/self/fd/{self.fd}", os.O_RDONLY | os.O_CLOEXEC)

    def close(self) -> None:
        with self._pins_lock:
            if self._unpin is not None:  # never unmapped pinned (below the end: a no-op once the resident's unpin ran)
                self._unpin(address_of(self.mm), max(self.length, self._span))
                self._unpin = None
            self._dead, self.past_end = None, 0
        try:
            self.mm.close()
        except BufferError:
            pass  # a FUSE read still holds a view; the map goes when that view does
        os.close(self.fd)


FillState = Literal["filling", "ready", "failed"]  # a resident copy: bytes arriving, all checked, refused


@dataclass
class Timeline:
    """When a resident copy's memory and bytes arrived, in ``time.monotonic()`` seconds: one clock for
    every process on the node, so a bench lines these up with its own (the tier-empty load, issue 18).
    0.0: not (yet) happened."""
    reserved: float = 0.0  # reserve() began: the acquire that missed
    alloc_s: float = 0.0  # reserve's own seconds (blanks taken, segments made, room made)
    cut_s: float = 0.0  # of those, cutting blanks to size (the shrink; the unpins past the end come after the load)
    from_blanks: int = 0  # partitions made from start-time blanks (the rest: fresh memory)
    pinned_blanks: int = 0  # of those, pinned for GPU copies already (their pins came along)
    partitions: int = 0
    fill_start: float = 0.0  # the fill's threads were started
    first_ready: float = 0.0  # its first window verified and published READY
    last_ready: float = 0.0  # its last window published READY
    fill_end: float = 0.0  # its threads all ended
    pin_s: float = 0.0  # the after-fill pin for GPU copies (gpucopy.pin), when it ran

    def ready(self, now: float) -> None:
        """A window was published READY at ``now`` (fill threads: float stores are atomic under the GIL)."""
        if not self.first_ready:
            self.first_ready = now
        if now > self.last_ready:
            self.last_ready = now

    def as_dict(self) -> dict[str, float]:
        return {k: round(v, 6) if isinstance(v, float) else v for k, v in vars(self).items()}


@dataclass(eq=False)
class Resident:
    model: str
    variant: str
    manifest: Manifest
    # of the committed variant it was filled from (store.variant_identity); None while a pull from the
    # origin streams it in (nothing is committed yet: the FUSE view, which asks by identity, waits)
    identity: Identity | None
    segments: list[Segment]
    ready: Segment
    chunk_base: list[int]  # index of each partition's first readiness byte
    state: FillState = "filling"
    leases: int = 0
    pinned: bool = False
    retired: bool = False  # replaced or evicted while leased: freed when its leases end
    last_used: float = field(default_factory=time.monotonic)
    filled: int = 0  # bytes verified so far
    error: str | None = None  # set by a fill thread on the first bad window; the fill then winds down
    # why it failed, set before any readiness byte says FAILED: a lease's `failure` reply (first one wins)
    failure: Failure | None = None
    wire_tensors: list[list[Any]] = field(default_factory=list)
    unpin: Callable[[], None] | None = None  # set when any of its segments holds pins (a copy's, its blanks')
    gpu_pinned: bool = False  # the copier pinned its segments whole after the fill (blanks' pins are not that)
    closed: bool = False  # segments unmapped: nothing may touch them
    source: str = "store"  # where its bytes come from: "store" (a fill) or "origin" (a pull streaming in)
    timeline: Timeline = field(default_factory=Timeline)
    lent: list[TierFile] = field(default_factory=list)  # its files the mount backs files with (no copy)

    @property
    def nbytes(self) -> int:
        return sum(s.held for s in self.segments) + self.ready.length

    @property
    def data_bytes(self) -> int:
        return self.manifest.total_bytes

    @property
    def busy(self) -> bool:
        return self.leases > 0 or self.pinned or self.state == "filling" or any(f.opened() for f in self.lent)

    def fail(self, cause: FailCause, line: str) -> None:
        """Record why this copy failed (before marking any window FAILED); the first reason stands."""
        if self.failure is None:
            self.failure = Failure(cause, line)

    def close(self) -> None:
        self.closed = True
        if self.unpin is not None:  # a pinned mapping must be unregistered before it is unmapped
            self.unpin()
            self.unpin = None
        for s in self.segments:
            s.close()
        self.ready.close()


class MemoryTier:
    def __init__(self, budget: int, *, hint: str = ""):
        self.budget = budget
        self.hint = hint  # flags (e.g. --socket) that make a command we suggest reach this sidecar
        self.entries: dict[tuple[str, str], Resident] = {}
        self.retired: list[Resident] = []
        self.evictions = 0
        self.blanks = Blanks()  # memory faulted in at start, not yet a segment (prefault.py)
        # unpins a resident's segments for GPU copies (gpucopy.GpuCopier.release): set once blanks are
        # pinned, so a resident made of pinned blanks is unpinned before its maps go
        self.release_pins: Callable[[Resident], None] | None = None
        self.mount_copies = 0  # bytes the mount's passthrough backing files hold (fuse/backing.py)
        self.on_freed: Callable[[], None] | None = None  # a resident's memory was just given back (the cache re-blanks)
        self.copying: Callable[[], bool] = lambda: False  # a GPU copy runs now (the cache sets it: GpuCopier.busy)

    def blank_room(self) -> int:
        """Bytes a blank pass may still make blanks of (prefault.py): none while a fill or a streamed pull
        runs (it wants the hugetlb pool and the cores) or a GPU copy does (it wants the pins), else the
        budget less what is used and the blanks made: memory an eviction freed becomes blanks again
        (pinned ones on a GPU node), so the next tier-empty load neither faults nor pins (NOTES-cold run 9)."""
        if any(r.state == "filling" for r in (*self.entries.values(), *self.retired)) or self.copying():
            return 0  # a blank's faults and pins would slow them: the pass waits for the next free moment
        return max(0, self.budget - self.used - self.blanks.nbytes)

    @property
    def mount_files(self) -> int:
        """Bytes of the tier's own files the mount holds as backings (counted in their residents)."""
        return sum(f.nbytes for r in (*self.entries.values(), *self.retired) for f in r.lent)

    @property
    def used(self) -> int:
        return (sum(r.nbytes for r in self.entries.values()) + sum(r.nbytes for r in self.retired)
                + self.mount_copies)

    def hold_copy(self, nbytes: int, source: tuple[str, str]) -> bool:
        """The mount wants ``nbytes`` for a passthrough copy of ``source``'s file: they count in the
        budget like a resident's, evicting idle variants (never ``source``) to fit; False: no room."""
        def idle() -> int:
            return sum(r.nbytes for k, r in self.entries.items() if not r.busy and k != source)

        if self.used - idle() + nbytes > self.budget:  # pages held past segments' ends may make it fit
            self._drop_held(self._all_segments())
        if self.used - idle() + nbytes > self.budget:
            return False  # it would not fit even with every idle variant evicted: evict none
        self._make_room(nbytes, source[0], keep=source)
        self.mount_copies += nbytes
        return True

    def free_copy(self, nbytes: int) -> None:
        self.mount_copies = max(0, self.mount_copies - nbytes)
        if nbytes and self.on_freed is not None:  # blanks dropped for the copy may come back
            self.on_freed()

    def get(self, model: str, variant: str) -> Resident | None:
        res = self.entries.get((model, variant))
        if res is not None:
            res.last_used = time.monotonic()
        return res

    def view(self, model: str, variant: str, identity: Identity) -> list[memoryview] | None:
        """One memoryview per partition when this very version (``identity``) is fully resident and
        verified, else None (FUSE reads: a replaced model's old copy is never served for the new one)."""
        res = self.get(model, variant)
        if res is None or res.state != "ready" or res.identity != identity:
            return None
        return [memoryview(s.mm)[: s.size] for s in res.segments]

    def resident_file(self, model: str, variant: str, identity: Identity, file: str) -> TierFile | None:
        """The memfd that is stored file ``file`` of this very version, fully resident and verified, lent
        to the mount as a passthrough backing (fuse/tierfile.py: the resident stays until it comes back),
        else None."""
        res = self.get(model, variant)
        if res is None or res.state != "ready" or res.identity != identity or not res.manifest.as_files:
            return None
        for p, seg in zip(res.manifest.partitions, res.segments, strict=True):
            if p.file == file and seg.exact:
                return self._lend(res, seg.readonly_fd(), p.size)
        return None

    def _lend(self, res: Resident, fd: int, nbytes: int) -> TierFile:
        def returned() -> None:
            res.lent.remove(lent)
            self.settle(res)  # an evicted resident goes with its last lent file

        lent = TierFile(fd, nbytes, returned)
        res.lent.append(lent)
        return lent

    def reserve(self, model: str, variant: str, manifest: Manifest, identity: Identity | None) -> Resident:
        """Allocate segments for a variant, evicting LRU entries to fit the budget."""
        t0 = time.monotonic()
        need = sum(_round_up(max(p.size, 1), PAGE) for p in manifest.partitions)
        nchunks = [max(1, -(-p.size // CHUNK_SIZE)) for p in manifest.partitions]
        need += _round_up(sum(nchunks), PAGE)
        if need > self.budget:
            raise BadInput(
                f"model {model!r} [{variant}] needs {need} bytes but the memory pool is {self.budget}; "
                "raise --mem-pool-size (or read it through the FUSE view, which streams from the store)"
            )
        # a variant stored as its files gets their exact twins where shmem gives 2 MiB pages (the mount backs
        # its files with them: no copy); else blanks first (their memory is this variant's now), then room
        exact = manifest.as_files and shmem_thp()
        blanks = [self.blanks.take() if not exact and Segment.wants_huge(p.size) else None for p in manifest.partitions]
        try:
            self._make_room(need, model)
        except BaseException:
            for b in blanks:
                if b is not None:
                    self.blanks.put(b)
            raise
        base, acc = [], 0
        for n in nchunks:
            base.append(acc)
            acc += n
        tag = f"sllmfs:{model}:{variant}"[:200]  # memfd names are at most 249 bytes; this is only a label
        made: list[Segment] = []
        try:
            for p, b in zip(manifest.partitions, blanks, strict=True):
                if b is None and not exact and Segment.wants_huge(p.size):  # fresh hugetlb pages: those held
                    self._drop_held([*made, *self._all_segments()])  # past the ends first
                made.append(Segment(f"{tag}:{p.file}", p.size, blank=b, exact=exact))
            ready = Segment(f"{tag}:ready", acc, huge=False)
        except OSError as e:  # ENOMEM, EMFILE: this request fails, nothing leaks
            for seg in made:
                seg.close()
            for b in blanks[len(made) + 1:]:  # the one that failed closed itself; the rest are unused
                if b is not None:
                    self.blanks.put(b)
            raise BadInput(f"cannot allocate memory for model {model!r} [{variant}]: {e.strerror}") from None
        segments = made
        for i, p in enumerate(manifest.partitions):  # empty partitions have nothing to wait for
            if p.size == 0:
                ready.mm[base[i]] = Readiness.READY
        res = Resident(model, variant, manifest, identity, segments, ready, base)
        if any(seg.pinned for seg in segments):  # pins came with its blanks: unpinned before its maps go
            release = self.release_pins
            assert release is not None, "blanks are pinned only once release_pins is set"
            res.unpin = lambda: release(res)
        res.timeline = Timeline(reserved=t0, alloc_s=time.monotonic() - t0, cut_s=sum(seg.cut_s for seg in segments),
                                from_blanks=sum(b is not None for b in blanks), partitions=len(blanks),
                                pinned_blanks=sum(seg.pinned for seg in segments))
        res.wire_tensors = [TensorRef(n, t.dtype, tuple(t.shape), t.partition, t.offset, t.nbytes).encode()
                            for n, t in manifest.tensors.items()]
        self.entries[(model, variant)] = res
        return res

    def _all_segments(self) -> list[Segment]:
        return [s for r in (*self.entries.values(), *self.retired) for s in r.segments]

    @staticmethod
    def _drop_held(segments: list[Segment]) -> int:
        """Give back the pin pieces ``segments`` hold past their ends (after-fill work done early: ~3 ms a
        piece on this thread; no copy reads them). Returns the bytes."""
        return sum(s.drop_past_end() for s in segments)

    def _make_room(self, need: int, model: str, keep: tuple[str, str] | None = None) -> None:
        while self.used + self.blanks.nbytes + need > self.budget:
            if self.blanks.drop_one():  # unused memory goes first
                continue
            if self._drop_held(self._all_segments()):
                continue  # then pages held past segments' ends, before any model goes
            idle = [r for k, r in self.entries.items() if not r.busy and k != keep]
            if not idle:
                copies = (f" (the mount's passthrough copies hold {self.mount_copies}: they go a minute after their "
                          "files close)") if self.mount_copies else ""
                free = max(0, self.budget - self.used)
                files = (f" (readers of the mount have {self.mount_files} of them open)") if self.mount_files else ""
                raise BadInput(
                    f"memory pool full: model {model!r} needs {need} bytes, {free} free{copies} "
                    f"and every resident model is leased, pinned, filling or open through the mount{files}; "
                    "release leases, `sllmfs unpin`, or raise --mem-pool-size"
                )
            self.drop(min(idle, key=lambda r: r.last_used), why="lru")

    def drop(self, res: Resident, *, why: str) -> None:
        """Remove from the tier now, or once its leases, fill and the mount's open files of it end."""
        if res.retired or res.closed:
            return  # dropped already (a caller that awaited since it looked): once only
        if self.entries.get((res.model, res.variant)) is res:
            del self.entries[(res.model, res.variant)]
        self.evictions += 1
        for f in list(res.lent):  # backings no reader has open go now (their pages with them); open ones
            f.evicted = True  # go at their last close, not shared by later opens of a new copy of the same version
            if not f.opened():
                f.let_go()
        log.info("evicted model=%s variant=%s bytes=%d reason=%s%s", res.model, res.variant, res.nbytes, why,
                 " (freed when its leases end)" if res.leases or res.state == "filling"
                 else " (freed when the mount's readers close its files)" if res.lent else "")
        if res.leases or res.state == "filling" or res.lent:
            res.retired = True
            self.retired.append(res)
        else:
            self._free(res)

    def settle(self, res: Resident) -> None:
        """Free a retired entry whose last lease or fill just ended."""
        if res.retired and not res.leases and res.state != "filling" and not res.lent and res in self.retired:
            self.retired.remove(res)
            self._free(res)

    def _free(self, res: Resident) -> None:
        res.close()
        if self.on_freed is not None:
            self.on_freed()

    def evict(self, model: str, variant: str | None = None) -> list[Resident]:
        found = [r for (m, v), r in self.entries.items() if m == model and variant in (None, v)]
        for r in found:
            if r.pinned:
                raise BadInput(f"model {model!r} [{r.variant}] is pinned; run "
                               f"`sllmfs unpin --model {model}{self.hint}` first")
            if r.leases:
                raise BadInput(f"model {model!r} [{r.variant}] is leased by {r.leases} client(s); it stays")
        for r in found:
            self.drop(r, why="asked")
        return found

    def close_all(self) -> None:
        self.blanks.close_all()
        for r in list(self.entries.values()) + self.retired:
            r.close()
        self.entries.clear()
        self.retired.clear()
