"""Reading the store for the FUSE view: partitions checked and not cached twice; metadata files checked.

A metadata file (config.json, tokenizer.json, an adapter's own files) is read whole when opened and
checked against the size and xxh3_64 recorded when it was saved (``read_meta``); the open handle
serves those very bytes, so nothing changed on disk afterwards reaches a reader. A file that fails
fails its open with EIO; every other file of the mount is served as before.

Bytes read through the mount land in the kernel's page cache for the FUSE
file (that is what makes re-reads fast). Reading the store file through the
page cache as well would hold every byte twice and, on a cold read, allocate
twice the memory. So a range already cached is taken from the page cache, and
the rest is read with ``O_DIRECT``. Whether it is cached is asked with
``cachestat`` (Linux 6.5+): probing with an ``RWF_NOWAIT`` read would start
read-ahead into the store file's page cache, the double caching we avoid
(older kernels still probe that way).

Every byte served has passed its window's checksum (the manifest's xxh3_64 of
each 4 MiB window of a partition, as the sidecar's fill checks it). The first
read that touches a window reads and hashes the whole window, once: the verdict
is kept per committed version (``Checked``), and the last few verified windows
stay in memory while the version is open, so the other requests of a
sequential read in that window cost no second disk read. The kernel asks for
1 MiB at a time, 16 MiB ahead: a handful of 4 MiB window reads in flight keeps a
disk well under its speed, so read-ahead threads read and check the next
``AHEAD`` windows of the partition a reader is in, and the reader finds them kept.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from sllmfs.store.format import CHUNK_SIZE, Partition
from sllmfs.store.metafiles import meta_file_place, read_meta_files, warn_unverified
from sllmfs.store.reader import Identity, Partitions, pinned_variant, read_full, window_ok
from sllmfs.store.store import Store

DIRECT_ALIGN = 4096
BOUNCE = (1 << 20) + 2 * DIRECT_ALIGN  # one kernel request, plus alignment on both ends
KEPT_WINDOWS = 8  # per open version: a 16 MiB read-ahead spans 5 windows, plus slack for a second reader
AHEAD = 16  # windows read (and checked) ahead of a reader: 64 MiB in flight, what a disk needs to stream
AHEAD_THREADS = 16
SPARE_WINDOWS = 2  # evicted window buffers kept for reuse: no fresh pages to fault in per window
UNCHECKED, GOOD, BAD = 0, 1, 2
PAGE = mmap.PAGESIZE
CACHESTAT = 451  # one number on every architecture (Linux >= 6.5)

_local = threading.local()
_ahead_pool: list[ThreadPoolExecutor] = []  # made on first use, shared by every open version
_ahead_lock = threading.Lock()
_libc = ctypes.CDLL(None, use_errno=True)
_cachestat = [True]  # False once the kernel says it has no cachestat


class _Range(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _CacheStat(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint64) for n in ("cache", "dirty", "writeback", "evicted", "recently_evicted")]


def _bounce() -> mmap.mmap:
    buf = getattr(_local, "buf", None)
    if buf is None:
        buf = _local.buf = mmap.mmap(-1, BOUNCE)  # page-aligned, reused: no fresh pages per read
    return buf


def read_meta(store: Store, path: Path) -> bytes:
    """The bytes of the metadata file at ``path`` (under the store's models/), whole and checked
    (metafiles.read_meta_files: Corrupt when they differ from what was saved). A model saved before
    sllmfs recorded digests is served unchecked, and logged once as such with the fix."""
    model_dir, variant, rel = meta_file_place(store.models_dir, path)
    meta = read_meta_files(model_dir, below=store.models_dir, variant=variant, only=rel)
    warn_unverified(meta, store.root)
    return meta.data[rel]


class BadWindow(OSError):
    """A window that fails its checksum or is short: every read of it fails with EIO."""

    def __init__(self, part: int, window: int, why: str, *, first: bool):
        super().__init__(errno.EIO, why)
        self.part, self.window = part, window
        self.first = first  # the read that found it (the one that logs it)


class Checked:
    """What is known of one committed version's windows, and the bytes of the last few verified.

    The verdicts (one byte per 4 MiB window) live as long as the mount: a version's bytes never
    change. The window buffers live only while a handle has the version open (``opens``).
    """

    def __init__(self, partitions: Sequence[Partition]):
        self.partitions = list(partitions)
        self.state = [bytearray(-(-p.size // CHUNK_SIZE)) for p in self.partitions]
        self.opens = 0  # changed on the trio thread only
        self._mutex = threading.Lock()  # guards the kept windows and spares
        self._locks: dict[tuple[int, int], threading.Lock] = {}  # one per window: no reader waits on another's
        self._kept: OrderedDict[tuple[int, int], mmap.mmap] = OrderedDict()
        self._spares: list[mmap.mmap] = []
        self._ahead: set[tuple[int, int]] = set()  # windows being read ahead
        self._ahead_bad: set[tuple[int, int]] = set()  # the read-ahead found them bad: left to their reader
        self._passed: set[tuple[int, int]] = set()  # kept windows a reader has read to their end

    def claim_ahead(self, part: int, window: int) -> bool:
        """Whether to read ``window`` ahead: not kept, not known bad, not already being read ahead."""
        key = (part, window)
        with self._mutex:
            if self.opens <= 0 or key in self._kept or key in self._ahead or key in self._ahead_bad or \
                    self.state[part][window] == BAD:
                return False
            self._ahead.add(key)
            return True

    def done_ahead(self, part: int, window: int, *, bad: bool = False) -> None:
        with self._mutex:
            self._ahead.discard((part, window))
            if bad:
                self._ahead_bad.add((part, window))

    def is_kept(self, part: int, window: int) -> bool:
        with self._mutex:
            return (part, window) in self._kept

    def lock(self, part: int, window: int) -> threading.Lock:
        with self._mutex:
            return self._locks.setdefault((part, window), threading.Lock())

    def copy_kept(self, part: int, window: int, dst: memoryview, at: int) -> bool:
        """Copy ``dst`` from a kept window buffer (``at``: offset in the window), if it is kept."""
        with self._mutex:  # copy under the lock: an evicted buffer is reused at once
            key = (part, window)
            buf = self._kept.get(key)
            if buf is None:
                return False
            dst[:] = memoryview(buf)[at:at + len(dst)]
            self._kept.move_to_end(key, last=key not in self._passed)
            return True

    def passed(self, part: int, window: int) -> None:
        """A reader read ``window`` to its end: it goes first when room is needed (it stays so, though
        requests in flight finish it out of order), so the windows read ahead outlive it."""
        key = (part, window)
        with self._mutex:
            if key in self._kept:
                self._passed.add(key)
                self._kept.move_to_end(key, last=False)

    def buffer(self) -> mmap.mmap:
        with self._mutex:
            if self._spares:
                return self._spares.pop()
        return mmap.mmap(-1, CHUNK_SIZE)  # page-aligned, for O_DIRECT

    def keep(self, part: int, window: int, buf: mmap.mmap) -> None:
        """Keep a verified window's bytes for the next requests in it; the oldest goes."""
        with self._mutex:
            if self.opens <= 0:
                return  # closed meanwhile: nothing to keep it for
            self._kept[(part, window)] = buf
            # room for what every open handle reads ahead: readers of several files of one version at once
            while len(self._kept) > KEPT_WINDOWS + AHEAD * min(self.opens, 4):
                gone, old = self._kept.popitem(last=False)
                self._passed.discard(gone)
                self._spare(old)

    def give_back(self, buf: mmap.mmap) -> None:
        with self._mutex:
            self._spare(buf)

    def _spare(self, buf: mmap.mmap) -> None:
        if self.opens > 0 and len(self._spares) < SPARE_WINDOWS:
            self._spares.append(buf)  # else unmapped once unreferenced

    def drop_buffers(self) -> None:
        """The last handle on this version closed: free its window memory (the verdicts stay)."""
        with self._mutex:
            self._kept.clear()
            self._passed.clear()
            self._spares.clear()


class PartitionFiles:
    """One open handle's descriptors on the data files of exactly one committed version."""

    def __init__(self, variant_dir: Path, identity: Identity, checked: Checked, *, below: Path | None = None):
        self.checked = checked
        self._last: dict[int, int] = {}  # partition -> the window this handle read last
        # open through the directory, after checking it still holds this version: a replace puts
        # a new directory in place, so files opened by path could belong to the next version.
        # No symlink is followed under ``below`` (the store's models/), nor to a data file.
        # A missing file is -1 (served from memory, or EIO on read); so is O_DIRECT where the
        # filesystem has none (read through the page cache).
        with pinned_variant(variant_dir, below=below, identity=identity) as dfd:
            self._cached = Partitions(variant_dir, checked.partitions, dir_fd=dfd, missing_ok=True)
            self._direct = Partitions(variant_dir, checked.partitions, dir_fd=dfd, missing_ok=True, direct=True)
            try:
                self.cached = [self._cached.fd(i) for i in range(len(checked.partitions))]
                self.direct = [self._direct.fd(i) if fd >= 0 else -1 for i, fd in enumerate(self.cached)]
            except BaseException:
                self.close()
                raise

    def close(self) -> None:
        self._cached.close()
        self._direct.close()
        self.cached, self.direct = [], []

    def read_into(self, part: int, dst: memoryview, offset: int) -> None:
        """Fill ``dst`` from partition ``part`` at ``offset`` with verified bytes, window by window."""
        if self.cached[part] < 0:
            raise OSError(errno.EIO, "partition file is missing")
        c = self.checked
        pos, end = offset, offset + len(dst)
        while pos < end:
            window = pos // CHUNK_SIZE
            start = window * CHUNK_SIZE
            stop = min(end, start + CHUNK_SIZE)
            piece = dst[pos - offset:stop - offset]
            if not c.copy_kept(part, window, piece, pos - start):
                if c.state[part][window] == GOOD:
                    self._read(part, piece, pos)  # verified before, no longer kept: read it again
                else:
                    self._check(part, window, piece, pos - start)
            if stop == min(start + CHUNK_SIZE, c.partitions[part].size):
                c.passed(part, window)
            last = self._last.get(part)
            if last is None or window > last or window < last - 1:  # requests in flight arrive out of order
                self._last[part] = window
            if last is not None and last - 1 <= window <= last + 1:  # reading on (a header scan or a jump: no)
                self._read_ahead(part, window)
            pos = stop

    def _read_ahead(self, part: int, window: int) -> None:
        """Have the next ``AHEAD`` windows of the partition read and checked by the read-ahead threads:
        the kernel asks for 1 MiB at a time, 16 MiB ahead, and one 4 MiB window at a time keeps a disk
        far from its speed (NOTES-mount.md). Each job reads through its own duplicates of the fds, so
        closing this handle never waits for it, nor lets a reused fd number feed it another file."""
        c = self.checked
        for w in range(window + 1, min(window + 1 + AHEAD, len(c.state[part]))):
            if not c.claim_ahead(part, w):
                continue
            fds = [-1, -1]
            try:
                fds[0] = os.dup(self.cached[part])
                if self.direct[part] >= 0:
                    fds[1] = os.dup(self.direct[part])
                _pool().submit(_fetch_ahead, c, part, w, (fds[0], fds[1]), self._last)
            except (OSError, RuntimeError):  # no fd left, or the pool is shut down (exiting): no read-ahead
                for fd in fds:
                    if fd >= 0:
                        os.close(fd)
                c.done_ahead(part, w)
                return

    def _check(self, part: int, window: int, piece: memoryview, at: int) -> None:
        """Read and hash the whole window once; concurrent readers of it wait, then copy."""
        c = self.checked
        with c.lock(part, window):
            if c.copy_kept(part, window, piece, at):
                return
            state = c.state[part][window]
            if state == GOOD:  # verified meanwhile, and already evicted again
                self._read(part, piece, window * CHUNK_SIZE + at)
                return
            p = c.partitions[part]
            if state == BAD:
                raise BadWindow(part, window, f"{p.file} window {window} failed its checksum", first=False)
            buf = c.buffer()
            try:
                n = min(CHUNK_SIZE, p.size - window * CHUNK_SIZE)
                got = self._read_window(part, buf, window * CHUNK_SIZE, n)
                view = memoryview(buf)[:n]
                if got < n or not window_ok(p, window, view):
                    c.state[part][window] = BAD
                    why = "is shorter than its manifest says" if got < n else "fails its xxh3_64 checksum"
                    raise BadWindow(part, window, f"{p.file} window {window} {why}", first=True)
                piece[:] = view[at:at + len(piece)]
                c.state[part][window] = GOOD
            except BaseException:
                c.give_back(buf)
                raise
            c.keep(part, window, buf)

    def _read_window(self, part: int, buf: mmap.mmap, offset: int, n: int) -> int:
        return _read_window(self.cached[part], self.direct[part], buf, offset, n)

    def _read(self, part: int, dst: memoryview, offset: int) -> None:
        """Read already verified bytes: page cache if there, else O_DIRECT through a bounce buffer."""
        fd = self.cached[part]
        done = _from_cache(fd, dst, offset)
        if done < len(dst):
            if self.direct[part] >= 0:
                self._read_direct(self.direct[part], dst[done:], offset + done)
            elif read_full(fd, dst[done:], offset + done) < len(dst) - done:
                raise OSError(errno.EIO, "partition file is shorter than its manifest says")

    def _read_direct(self, fd: int, dst: memoryview, offset: int) -> None:
        buf = _bounce()
        while len(dst):
            start = offset - offset % DIRECT_ALIGN
            skip = offset - start
            want = min(len(dst), BOUNCE - skip)
            span = -(-(skip + want) // DIRECT_ALIGN) * DIRECT_ALIGN
            n = os.preadv(fd, [memoryview(buf)[:span]], start)
            got = min(n - skip, want)  # the file's last block may be short
            if got <= 0:
                raise OSError(errno.EIO, "partition file is shorter than its manifest says")
            dst[:got] = buf[skip:skip + got]
            dst = dst[got:]
            offset += got


def _pool() -> ThreadPoolExecutor:
    with _ahead_lock:
        if not _ahead_pool:
            _ahead_pool.append(ThreadPoolExecutor(AHEAD_THREADS, thread_name_prefix="sllmfs-readahead"))
        return _ahead_pool[0]


def _fetch_ahead(c: Checked, part: int, window: int, fds: tuple[int, int], reader_at: dict[int, int]) -> None:
    """Read and check one window ahead of its reader and keep it. Anything wrong (a short file, a bad
    checksum, an I/O error) is left for the reader itself to meet and report, once; the read-ahead does
    not try that window again. ``reader_at``: where the handle that asked reads now (a job its reader
    overtook has nothing left to do)."""
    lock = c.lock(part, window)
    bad = False
    try:
        if c.opens <= 0 or window <= reader_at.get(part, -1) or not lock.acquire(blocking=False):
            return  # every handle closed, the reader is past it or at it: never make a reader wait
        try:
            if c.is_kept(part, window) or c.state[part][window] == BAD:
                return
            p = c.partitions[part]
            n = min(CHUNK_SIZE, p.size - window * CHUNK_SIZE)
            buf = c.buffer()
            try:
                got = _read_window(fds[0], fds[1], buf, window * CHUNK_SIZE, n)
            except OSError:
                c.give_back(buf)
                bad = True
                return
            if got < n or (c.state[part][window] != GOOD and not window_ok(p, window, memoryview(buf)[:n])):
                c.give_back(buf)
                bad = True
                return
            c.keep(part, window, buf)  # kept first: a reader that sees GOOD finds the bytes, never rereads them
            c.state[part][window] = GOOD
        finally:
            lock.release()
    finally:
        for fd in fds:
            if fd >= 0:
                os.close(fd)
        c.done_ahead(part, window, bad=bad)


def _read_window(cached: int, direct: int, buf: mmap.mmap, offset: int, n: int) -> int:
    """Read ``n`` bytes at ``offset`` into the page-aligned ``buf``; returns how many the file had."""
    whole = memoryview(buf)
    done = _from_cache(cached, whole[:n], offset)
    if done < n and direct >= 0:
        done -= done % DIRECT_ALIGN  # O_DIRECT wants file offset and memory aligned
        span = -(-n // DIRECT_ALIGN) * DIRECT_ALIGN  # within buf: windows are whole pages
        while done < n:
            got = os.preadv(direct, [whole[done:span]], offset + done)
            if got <= 0:
                break
            done += got
            if got % DIRECT_ALIGN:
                break  # the end of the file
        done = min(done, n)
    if done < n:  # no O_DIRECT here, or a short read: finish through the page cache
        done += read_full(cached, whole[done:n], offset + done)
    return done


def _all_cached(fd: int, offset: int, n: int) -> bool | None:
    """Whether the page cache holds every page of [offset, offset+n), asked without reading
    anything; None where the kernel cannot say (before 6.5)."""
    if not _cachestat[0]:
        return None
    st = _CacheStat()
    if _libc.syscall(CACHESTAT, fd, ctypes.byref(_Range(offset, n)), ctypes.byref(st), 0) != 0:
        if ctypes.get_errno() in (errno.ENOSYS, errno.EPERM):  # an old kernel, or a seccomp filter
            _cachestat[0] = False
        return None
    return st.cache >= (offset + n - 1) // PAGE - offset // PAGE + 1


def _from_cache(fd: int, dst: memoryview, offset: int) -> int:
    """As much of ``dst`` as the page cache holds, never waiting for the disk: all or nothing
    where cachestat answers, else what an RWF_NOWAIT read gets."""
    cached = _all_cached(fd, offset, len(dst)) if len(dst) else True
    if cached is not None:
        return read_full(fd, dst, offset) if cached else 0
    done = 0
    try:
        while done < len(dst):
            n = os.preadv(fd, [dst[done:]], offset + done, os.RWF_NOWAIT)
            if n <= 0:
                break
            done += n
    except BlockingIOError:
        pass  # not (all) in the page cache
    return done
