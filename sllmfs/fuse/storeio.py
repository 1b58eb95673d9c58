"""Reading a variant's partitions for the FUSE view, without caching them twice.

Bytes read through the mount land in the kernel's page cache for the FUSE
file (that is what makes re-reads fast). Reading the store file through the
page cache as well would hold every byte twice and, on a cold read, allocate
twice the memory. So a range already cached is taken from the page cache
(``RWF_NOWAIT`` never waits for the disk), and the rest is read with
``O_DIRECT`` through a small aligned buffer per thread.
"""

from __future__ import annotations

import errno
import mmap
import os
import threading
from collections.abc import Sequence
from pathlib import Path

DIRECT_ALIGN = 4096
BOUNCE = (1 << 20) + 2 * DIRECT_ALIGN  # one kernel request, plus alignment on both ends

_local = threading.local()


def _bounce() -> mmap.mmap:
    buf = getattr(_local, "buf", None)
    if buf is None:
        buf = _local.buf = mmap.mmap(-1, BOUNCE)  # page-aligned, reused: no fresh pages per read
    return buf


class PartitionFiles:
    """Open descriptors on one variant's data files (-1 where a file is missing)."""

    def __init__(self, paths: Sequence[Path]):
        self.cached = [_open(p, 0) for p in paths]
        self.direct = [_open(p, os.O_DIRECT) if fd >= 0 else -1 for p, fd in zip(paths, self.cached, strict=True)]

    def close(self) -> None:
        for fd in (*self.cached, *self.direct):
            if fd >= 0:
                os.close(fd)

    def read_into(self, part: int, dst: memoryview, offset: int) -> None:
        fd = self.cached[part]
        if fd < 0:
            raise OSError(errno.EIO, "partition file is missing")
        done = 0
        try:
            while done < len(dst):
                n = os.preadv(fd, [dst[done:]], offset + done, os.RWF_NOWAIT)
                if n <= 0:
                    break
                done += n
        except BlockingIOError:
            pass  # not (all) in the page cache
        if done < len(dst):
            if self.direct[part] >= 0:
                self._read_direct(self.direct[part], dst[done:], offset + done)
            else:
                _read_full(fd, dst[done:], offset + done)

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


def _open(path: Path, flags: int) -> int:
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC | flags)
    except FileNotFoundError:
        return -1  # served from memory, or EIO on read
    except OSError as e:
        if flags & os.O_DIRECT and e.errno == errno.EINVAL:
            return -1  # this filesystem has no O_DIRECT: read through the page cache
        raise


def _read_full(fd: int, dst: memoryview, offset: int) -> None:
    done = 0
    while done < len(dst):
        n = os.preadv(fd, [dst[done:]], offset + done)
        if n <= 0:
            raise OSError(errno.EIO, "partition file is shorter than its manifest says")
        done += n
