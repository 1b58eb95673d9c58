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
each 4 MiB window of a partition, as the sidecar's fill checks it). A read that
touches a window not in memory reads and hashes the whole window: the last few
verified windows stay in memory while the version is open (``Checked``), so the
other requests of a sequential read in that window cost no second disk read, and
a window read again after it left memory is hashed again (a bad verdict is kept:
a window that failed fails at once).
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

from sllmfs.store.format import CHUNK_SIZE, Partition
from sllmfs.store.metafiles import meta_file_place, read_meta_files, warn_unverified
from sllmfs.store.reader import Identity, Partitions, pinned_variant, read_full, window_ok
from sllmfs.store.store import Store

DIRECT_ALIGN = 4096
KEPT_WINDOWS = 8  # per open version: a 16 MiB read-ahead spans 5 windows, plus slack for a second reader
SPARE_WINDOWS = 2  # evicted window buffers kept for reuse: no fresh pages to fault in per window
LOCK_STRIPES = 64  # window locks, shared round-robin: enough that neighbouring windows never wait on each other
UNCHECKED, GOOD, BAD = 0, 1, 2
PAGE = mmap.PAGESIZE
CACHESTAT = 451  # one number on every architecture (Linux >= 6.5)

_libc = ctypes.CDLL(None, use_errno=True)
_cachestat = [True]  # False once the kernel says it has no cachestat


class _Range(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _CacheStat(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint64) for n in ("cache", "dirty", "writeback", "evicted", "recently_evicted")]


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

    The verdicts (one byte per 4 MiB window) live as long as the mount; only BAD is trusted without
    reading (a committed version's files should never change, but a disk can: a window read again is
    hashed again). The window buffers live only while a handle has the version open (``opens``).
    """

    def __init__(self, partitions: Sequence[Partition]):
        self.partitions = list(partitions)
        self.state = [bytearray(-(-p.size // CHUNK_SIZE)) for p in self.partitions]
        self.opens = 0  # changed on the trio thread only
        self._mutex = threading.Lock()  # guards the kept windows and spares
        self._stripes = [threading.Lock() for _ in range(LOCK_STRIPES)]
        self._kept: OrderedDict[tuple[int, int], mmap.mmap] = OrderedDict()
        self._spares: list[mmap.mmap] = []

    def lock(self, part: int, window: int) -> threading.Lock:
        return self._stripes[(part * 7919 + window) % LOCK_STRIPES]

    def copy_kept(self, part: int, window: int, dst: memoryview, at: int) -> bool:
        """Copy ``dst`` from a kept window buffer (``at``: offset in the window), if it is kept."""
        with self._mutex:  # copy under the lock: an evicted buffer is reused at once
            buf = self._kept.get((part, window))
            if buf is None:
                return False
            self._kept.move_to_end((part, window))
            dst[:] = memoryview(buf)[at:at + len(dst)]
            return True

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
            if len(self._kept) > KEPT_WINDOWS:
                self._spare(self._kept.popitem(last=False)[1])

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
            self._spares.clear()


class PartitionFiles:
    """One open handle's descriptors on the data files of exactly one committed version."""

    def __init__(self, variant_dir: Path, identity: Identity, checked: Checked, *, below: Path | None = None):
        self.checked = checked
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
            if not c.copy_kept(part, window, piece, pos - start):  # not in memory: read and hash it (again)
                self._check(part, window, piece, pos - start)
            pos = stop

    def _check(self, part: int, window: int, piece: memoryview, at: int) -> None:
        """Read and hash the whole window; concurrent readers of it wait, then copy from the kept copy.
        A window verified before and no longer kept is hashed again: the disk (or a hand on the store's
        files) may have changed it since, and only the bytes just hashed are served."""
        c = self.checked
        with c.lock(part, window):
            if c.copy_kept(part, window, piece, at):
                return
            state = c.state[part][window]
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
                    if state == GOOD:
                        why += " (it passed when first read: changed since)"
                    raise BadWindow(part, window, f"{p.file} window {window} {why}", first=True)
                piece[:] = view[at:at + len(piece)]
                c.state[part][window] = GOOD
            except BaseException:
                c.give_back(buf)
                raise
            c.keep(part, window, buf)

    def _read_window(self, part: int, buf: mmap.mmap, offset: int, n: int) -> int:
        """Read ``n`` bytes at ``offset`` into the page-aligned ``buf``; returns how many the file had."""
        whole = memoryview(buf)
        done = _from_cache(self.cached[part], whole[:n], offset)
        fd = self.direct[part]
        if done < n and fd >= 0:
            done -= done % DIRECT_ALIGN  # O_DIRECT wants file offset and memory aligned
            span = -(-n // DIRECT_ALIGN) * DIRECT_ALIGN  # within buf: windows are whole pages
            while done < n:
                got = os.preadv(fd, [whole[done:span]], offset + done)
                if got <= 0:
                    break
                done += got
                if got % DIRECT_ALIGN:
                    break  # the end of the file
            done = min(done, n)
        if done < n:  # no O_DIRECT here, or a short read: finish through the page cache
            done += read_full(self.cached[part], whole[done:n], offset + done)
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
