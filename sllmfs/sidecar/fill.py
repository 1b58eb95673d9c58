"""Filling a resident variant from the store: parallel reads straight into the segments.

``num_thread`` workers take ``chunk_size`` pieces in file order (so the first
tensors are ready first), read them with ``preadv`` into the segment map, verify
each 4 MiB window against the manifest's checksums and publish its readiness byte.
A short file or a checksum mismatch marks the window failed and fails the fill.

What the page cache holds is copied in ``CACHED_READ`` reads that do not wait for the
disk (RWF_NOWAIT), each checksummed right after it lands, while it is still in the
CPU's caches: a piece copied whole and then checksummed is read back from memory,
a third pass over the bytes (~0.7 of the copy's rate on the CPU VM, NOTES-cold run 7).
A window's reads and hashes are one native call where it binds (store/hashed_read.py:
no trip through the GIL per read, which bounded 16 threads, NOTES-cold run 11).
From the first byte the page cache lacks, the rest of the piece is read the disk's
way: ``direct`` reads past the page cache (O_DIRECT: aligned, the file's unaligned
tail buffered; a filesystem without it reads buffered) and ``read_size`` splits it
into reads of that size (0: one); its windows are checksummed after the read (the
disk, not the checksum, bounds that path), except O_DIRECT reads of the native size
(``read_size`` 0 or 512 KiB): a window per native call, 512 KiB reads queued, each
hashed as it lands and the window published at once. With ``direct`` the page-cache path
is left out (the point of O_DIRECT is not to touch it) except on a filesystem without O_DIRECT.

An error reading fails the window holding the byte it hit (a window already READY was
verified and stays so) and the fill as a whole, with one line.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from pathlib import Path

import numpy as np

from sllmfs.core.errors import Corrupt
from sllmfs.protocol.messages import FailCause, Readiness
from sllmfs.sidecar.memtier import Resident
from sllmfs.store import hashed_read
from sllmfs.store.format import CHUNK_SIZE
from sllmfs.store.reader import Partitions, ReadFailed, WindowCheck, read_full, window_matches, window_ok

CACHED_READ = 1 << 20  # a read from the page cache, in Python: fewer trips through the GIL (NOTES-cold run 11)
# O_DIRECT reads a fill thread keeps in flight where it reads natively (the copy engine's default since runs 26-27)
DIRECT_DEPTH = 4
HASHED_READ = 256 << 10  # the same, in the native call: smaller keeps it in L2 for its hash (run 12)


def round_chunk(chunk_size: int) -> int:
    """Fill pieces are whole checksum windows."""
    return max(1, -(-chunk_size // CHUNK_SIZE)) * CHUNK_SIZE


class Fill:
    # the page-cache path's reads and checksums in one native call per window where it binds; a
    # subclass that puts a failing disk behind ``_preadv`` sets False (the native reads skip it)
    native_reads = True

    def __init__(self, res: Resident, variant_dir: Path, chunk_size: int, *, direct: bool = False,
                 read_size: int = 0):
        self.res = res
        self._read_size = read_size
        self.hashed = hashed_read.read if self.native_reads else None
        # past the page cache, a window per native call: 512 KiB reads queued, hashed as they land (its reads'
        # size is the native one: a --fill-read-size of another size reads the Python way)
        self.hashed_direct = hashed_read.read_direct if self.native_reads and read_size in (
            0, hashed_read.DIRECT_STEP) else None
        self._buffered_only: set[int] = set()  # partitions whose O_DIRECT reads were refused
        self._waiting_only: set[int] = set()  # partitions whose filesystem refuses reads that do not wait
        self.stop = False
        self.error: str | None = None
        self.cached_bytes = 0  # copied from the page cache, checked as they landed
        self.handovers = 0  # pieces whose page cache ran out partway: the rest read waiting, checked after
        self.adopted = 0  # published from a GPU-first copy's tee (adopt), not read by this fill
        self.read_bytes = 0  # what this fill read (the windows nobody published before it got there)
        self._lock = threading.Lock()
        step = round_chunk(chunk_size)
        self._jobs = [(i, off, min(step, p.size - off))
                      for i, p in enumerate(res.manifest.partitions) for off in range(0, p.size, step)]
        self._next = 0
        self._variant_dir = variant_dir  # valid while the caller holds the pinned directory (open_copy_direct)
        self._files = Partitions(variant_dir, res.manifest.partitions)  # through the pinned directory
        # the same files again for O_DIRECT, if asked (fd -1: this filesystem has none, read buffered)
        self._direct = Partitions(variant_dir, res.manifest.partitions, direct=True) if direct else None
        self._copy_direct: Partitions | None = None  # a GPU-first copy's O_DIRECT opens (open_copy_direct)
        try:
            self._files.open_all()  # every file now: one version, whatever is committed meanwhile
            if self._direct is not None:
                self._direct.open_all()
                self._same_files()
        except BaseException as e:
            self.close()  # the opens that succeeded
            if not isinstance(e, OSError):  # a planted link or FIFO is Corrupt already
                raise
            raise Corrupt(f"model {res.model!r} [{res.variant}]: cannot open {Path(str(e.filename)).name} "
                          f"({e.strerror}); run `sllmfs verify --model {res.model}`") from None

    def _same_files(self) -> None:
        """Both opens must be one file each (a directory swapped between them: read buffered only)."""
        assert self._direct is not None
        if not self._same_as_files(self._direct):
            self._direct.close()
            self._direct = None

    def _same_as_files(self, other: Partitions) -> bool:
        for i in range(len(self.res.manifest.partitions)):
            fd = other.fd(i)
            if fd >= 0:
                a, b = os.fstat(self._files.fd(i)), os.fstat(fd)
                if (a.st_dev, a.st_ino) != (b.st_dev, b.st_ino):
                    return False
        return True

    def open_copy_direct(self) -> None:
        """With --copy-direct, a GPU-first copy of files the page cache lacks reads them O_DIRECT in 512 KiB
        reads straight into its pinned ring (fastsafetensors' shape; ours not yet measured on the GPU
        machine: NOTES-cold run 22). Call while the pinned directory is open; a filesystem without O_DIRECT
        (or a file swapped between the opens) leaves the copy on the buffered files. The fill reads buffered."""
        direct: Partitions | None = Partitions(self._variant_dir, self.res.manifest.partitions, direct=True)
        assert direct is not None
        try:
            direct.open_all()
            if self._same_as_files(direct):
                self._copy_direct, direct = direct, None
        except OSError:
            pass  # the copy reads the buffered opens
        finally:
            if direct is not None:
                direct.close()

    @property
    def total(self) -> int:
        return self.res.manifest.total_bytes

    def _take(self) -> tuple[int, int, int] | None:
        with self._lock:
            if self.stop or self.error or self._next >= len(self._jobs):
                return None
            job = self._jobs[self._next]
            self._next += 1
            return job

    def worker(self) -> None:
        """Run in a thread until no pieces are left (or the fill stops/fails)."""
        while (job := self._take()) is not None:
            part, off, n = job
            view = memoryview(self.res.segments[part].mm)
            try:
                for lo, hi in self._unready(part, off, off + n):  # a GPU-first copy may have filled some
                    with self._lock:
                        self.read_bytes += hi - lo
                    self._piece(part, view, lo, hi)
            except ReadFailed as e:  # EIO from a failing disk: this fill fails, the daemon goes on
                self._fail(part, e.at, f"{self.res.manifest.partitions[part].file}: {e.error.strerror or e.error}",
                           FailCause.READ)
            except OSError as e:  # any other failure of the piece: where is not known, the fill fails all the same
                self._fail(part, off, f"{self.res.manifest.partitions[part].file}: {e.strerror or e}", FailCause.READ)
            finally:
                view.release()

    def _unready(self, part: int, off: int, end: int) -> list[tuple[int, int]]:
        """The runs of [off, end) (window-aligned) whose windows are not READY yet."""
        ready, base = self.res.ready.mm, self.res.chunk_base[part]
        runs: list[tuple[int, int]] = []
        for w in range(off, end, CHUNK_SIZE):
            if ready[base + w // CHUNK_SIZE] == Readiness.READY:
                continue
            hi = min(w + CHUNK_SIZE, end)
            if runs and runs[-1][1] == w:
                runs[-1] = (runs[-1][0], hi)
            else:
                runs.append((w, hi))
        return runs

    def adopt(self, teed: list[np.ndarray]) -> int:
        """Publish the windows a GPU-first copy wrote into the segments and verified on its way (its tee:
        ``teed[part][k]`` is 1), so this fill reads only the rest. Bytes published."""
        ready = self.res.ready.mm
        before = self.res.filled
        for part, flags in enumerate(teed):
            if flags is None:
                continue
            base = self.res.chunk_base[part]
            for k in np.flatnonzero(flags).tolist():
                if ready[base + k] == Readiness.PENDING:  # never published twice (nor a FAILED one)
                    self._settle(part, k, True)
        self.adopted += self.res.filled - before
        return self.res.filled - before

    def _piece(self, part: int, view: memoryview, off: int, end: int) -> None:
        if self.hashed_direct is not None and self._reads_direct(part):
            off = self._direct_windows(part, view, off, end)
            if off == end:
                return  # else this file refused O_DIRECT reads: the rest the buffered way
        at, check = self._from_cache(part, view, off, end)
        if at == end:
            return
        if at > off:
            with self._lock:
                self.handovers += 1
        self._read(part, view[at:end], at)  # the page cache ran out: the rest from the disk, checked after
        if check is not None:  # the window it ran out in: what it had is hashed already
            wend = min((check.index + 1) * CHUNK_SIZE, end)
            check.update(view[at:wend])
            self._settle(part, check.index, check.ok())
            at = wend
        else:  # the native reads ran out inside a window (no check fed): hash that window whole
            at -= at % CHUNK_SIZE
        self._verify(part, view, at, end - at)

    def _direct_windows(self, part: int, view: memoryview, off: int, end: int) -> int:
        """Read, check and publish the windows of [off, end) past the page cache, each as it lands. Where
        this stopped: ``end``, or where the file refused O_DIRECT reads (the caller reads the rest buffered)."""
        assert self.hashed_direct is not None and self._direct is not None
        p = self.res.manifest.partitions[part]
        for w in range(off, end, CHUNK_SIZE):
            wend = min(w + CHUNK_SIZE, end)
            got = self.hashed_direct(self._direct.fd(part), self._files.fd(part), view[w:wend], w, DIRECT_DEPTH)
            if got.errno == errno.EINVAL:  # opened O_DIRECT but refuses such reads: this window on, buffered
                self._buffered_only.add(part)
                return w
            if got.errno:
                raise ReadFailed(w + got.done, OSError(got.errno, os.strerror(got.errno)))
            if got.done < wend - w:
                self._fail(part, w + got.done, f"{p.file} is shorter than its manifest", FailCause.DAMAGED)
                return end
            self._settle(part, w // CHUNK_SIZE, window_matches(p, w // CHUNK_SIZE, got.digest))
        return end

    def _reads_direct(self, part: int) -> bool:
        """O_DIRECT was asked for and this partition's filesystem does it."""
        return self._direct is not None and self._direct.fd(part) >= 0 and part not in self._buffered_only

    def _from_cache(self, part: int, view: memoryview, off: int, end: int) -> tuple[int, WindowCheck | None]:
        """Copy and check windows of [off, end) while the page cache has their bytes. Returns where
        it ran out (``end``: all done) and the check of the window it ran out in, fed up to there."""
        if self._reads_direct(part) or part in self._waiting_only:
            return off, None  # O_DIRECT was asked for (and works here), or this filesystem has no RWF_NOWAIT
        p = self.res.manifest.partitions[part]
        fd = self._files.fd(part)
        at = off
        try:
            if self.hashed is not None:
                try:
                    at = self._hashed_from_cache(part, fd, view, off, end)
                except ReadFailed as e:
                    at = e.at  # what landed before it counts as copied from the cache
                    raise
                return at, None
            while at < end:
                check = WindowCheck(p, at // CHUNK_SIZE)
                wend = min(at + CHUNK_SIZE, end)
                while at < wend:
                    want = min(CACHED_READ, wend - at)
                    got = self._read_cached(part, fd, view[at:at + want], at)
                    check.update(view[at:at + got])
                    at += got
                    if got < want:  # not (all) cached, or the file ends: the caller reads on, waiting
                        return at, check
                self._settle(part, check.index, check.ok())
            return at, None
        finally:
            with self._lock:
                self.cached_bytes += at - off

    def _hashed_from_cache(self, part: int, fd: int, view: memoryview, off: int, end: int) -> int:
        """``_from_cache`` a window per native call; where the cache ran out (its window is hashed
        again whole after the waiting read)."""
        assert self.hashed is not None
        p = self.res.manifest.partitions[part]
        at = off
        while at < end:
            wend = min(at + CHUNK_SIZE, end)
            got = self.hashed(fd, view[at:wend], at, HASHED_READ, os.RWF_NOWAIT)
            if got.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                self._waiting_only.add(part)  # this filesystem has no such reads: every read waits
            elif got.errno not in (0, errno.EAGAIN):  # EAGAIN: the page cache lacks the next page
                raise ReadFailed(at + got.done, OSError(got.errno, os.strerror(got.errno)))
            if got.done < wend - at:
                return at + got.done
            self._settle(part, at // CHUNK_SIZE, window_matches(p, at // CHUNK_SIZE, got.digest))
            at = wend
        return at

    def _read_cached(self, part: int, fd: int, dest: memoryview, off: int) -> int:
        """Bytes read without waiting for the disk: short (or 0) where the page cache lacks them."""
        try:
            return self._preadv(fd, dest, off, os.RWF_NOWAIT)
        except BlockingIOError:  # EAGAIN: the first page is not cached
            return 0
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise ReadFailed(off, e) from e
            self._waiting_only.add(part)  # this filesystem has no such reads: every read waits
            return 0

    def _read(self, part: int, dest: memoryview, off: int) -> None:
        # preadv into the map: threads fault pages in parallel. (sendfile into the memfd was
        # faster for one thread but serializes all writers on the inode lock; hugetlb takes no write.)
        step = self._read_size or len(dest)
        done = 0
        while done < len(dest):
            n = min(step, len(dest) - done)
            got = self._read_piece(part, dest[done:done + n], off + done)
            done += got
            if got < n:
                break
        if done < len(dest):
            self._fail(part, off + done, f"{self.res.manifest.partitions[part].file} is shorter than its manifest",
                       FailCause.DAMAGED)

    def _read_piece(self, part: int, dest: memoryview, off: int) -> int:
        aligned = len(dest) // 4096 * 4096  # O_DIRECT reads whole blocks; the file's tail goes buffered
        if aligned == 0 or not self._reads_direct(part):
            return self._read_full(self._files.fd(part), dest, off)
        assert self._direct is not None
        try:
            done = self._read_full(self._direct.fd(part), dest[:aligned], off)
        except ReadFailed as e:
            if e.error.errno != errno.EINVAL:
                raise
            self._buffered_only.add(part)  # opened O_DIRECT but refuses such reads: buffered from here on
            return self._read_full(self._files.fd(part), dest, off)
        if done == aligned and aligned < len(dest):
            done += self._read_full(self._files.fd(part), dest[aligned:], off + aligned)
        return done

    def _read_full(self, fd: int, dest: memoryview, off: int) -> int:
        return read_full(fd, dest, off, lambda fd_, bufs, at: self._preadv(fd_, bufs[0], at))

    def _preadv(self, fd: int, dest: memoryview, off: int, flags: int = 0) -> int:
        """Every read of the fill: one ``preadv`` (the one place a test puts a failing disk)."""
        return os.preadv(fd, [dest], off, flags)

    def _verify(self, part: int, view: memoryview, off: int, n: int) -> None:
        p = self.res.manifest.partitions[part]
        base = self.res.chunk_base[part]
        ready = self.res.ready.mm
        for w in range(off, off + n, CHUNK_SIZE):
            k = w // CHUNK_SIZE
            if ready[base + k] != Readiness.FAILED:  # a short read failed it already: nothing to hash
                self._settle(part, k, window_ok(p, k, view[w:min(w + CHUNK_SIZE, p.size)]))

    def _settle(self, part: int, k: int, ok: bool) -> None:
        """Publish window ``k``: READY once its checksum matched, else FAILED (and the fill fails)."""
        p = self.res.manifest.partitions[part]
        base = self.res.chunk_base[part]
        ready = self.res.ready.mm
        if ready[base + k] in (Readiness.FAILED, Readiness.READY):  # failed (a short read): stays failed;
            return  # READY (published from a GPU copy's tee): counted once, and its bytes are never rewritten
        if not ok:
            self._fail(part, k * CHUNK_SIZE, f"{p.file} window {k} fails its {self.res.manifest.checksum} checksum",
                       FailCause.DAMAGED)
            return
        with self._lock:  # count before publishing: whoever sees the byte sees the count
            self.res.filled += min(CHUNK_SIZE, p.size - k * CHUNK_SIZE)
            self.res.timeline.ready(time.monotonic())
        ready[base + k] = Readiness.READY

    def _fail(self, part: int, off: int, why: str, cause: FailCause) -> None:
        """Fail the fill, and the window holding byte ``off`` unless it is READY (its bytes were
        verified: a client may be copying them already)."""
        with self._lock:  # the reason first: a client that sees the FAILED byte asks for it at once
            self.error = self.error or why
            self.res.error = self.error
            self.res.fail(cause, refusal(self.res.model, self.res.variant, why))
        k = self.res.chunk_base[part] + off // CHUNK_SIZE
        if self.res.ready.mm[k] != Readiness.READY:
            self.res.ready.mm[k] = Readiness.FAILED

    def cached_share(self, samples: int = 64) -> float:
        """About how much of the variant the page cache holds: ``samples`` one-page reads that do not
        wait, spread evenly over its bytes (0.0 where the filesystem has no such reads). ~0.1 ms."""
        sizes = [p.size for p in self.res.manifest.partitions]
        total = sum(sizes)
        if not total:
            return 1.0
        hit, page = 0, bytearray(4096)
        for k in range(samples):
            at = total * k // samples
            part = 0
            while at >= sizes[part]:
                at -= sizes[part]
                part += 1
            try:
                hit += os.preadv(self._files.fd(part), [page], at, os.RWF_NOWAIT) > 0
            except OSError:  # EAGAIN: not cached; EOPNOTSUPP: no such reads here (treated as not cached)
                pass
        return hit / samples

    def fds(self) -> list[int]:
        """The open partition files, in order (a GPU-first copy reads them: sidecar/gpufirst.py): the
        O_DIRECT opens where open_copy_direct made them, else the buffered ones."""
        direct = self._copy_direct
        out = []
        for i in range(len(self.res.manifest.partitions)):
            fd = direct.fd(i) if direct is not None else -1
            out.append(fd if fd >= 0 else self._files.fd(i))
        return out

    @property
    def copy_direct(self) -> bool:
        return self._copy_direct is not None

    def close(self) -> None:
        self._files.close()
        if self._copy_direct is not None:
            self._copy_direct.close()
        if self._direct is not None:
            self._direct.close()



def refusal(model: str, variant: str, why: str) -> str:
    """The one line a failed fill leaves: clients are refused with it until the store changes."""
    return (f"model {model!r} [{variant}] failed verification: {why}; "
            f"run `sllmfs verify --model {model}` and save it again")
