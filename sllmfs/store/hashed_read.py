"""Reads checksummed as they land: one native call reads a window and hashes each read while it is
still in the CPU's caches, with no trip through the GIL per read (csrc/hashread.cpp).

``read`` is None where the native module is missing or python xxhash's library does not expose xxh3
(a build from source may hide its symbols), or where its digests would differ from python xxhash's
(checked once on import): callers then read and hash in Python, the same bytes at a lower rate.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import NamedTuple

import xxhash

from sllmfs.store.format import digest, hex_digest

log = logging.getLogger(__name__)


class Hashed(NamedTuple):
    done: int  # bytes that landed, from the start of the buffer
    digest: str  # xxh3_64 of those bytes, hex as store.format.digest writes it
    errno: int  # what stopped the reads early (0: a short read, or the buffer is full)


ReadFn = Callable[[int, memoryview, int, int, int], Hashed]
DirectFn = Callable[[int, int, memoryview, int, int], Hashed]


def _bind() -> tuple[ReadFn | None, DirectFn | None, int]:
    try:
        import xxhash._xxhash as ext  # the library python xxhash itself hashes with

        import sllmfs._hashread as native
    except ImportError:
        return None, None, 0
    try:
        if not native.bind(ext.__file__):
            log.info("xxhash's library exposes no xxh3: the fill hashes in Python")
            return None, None, 0
    except (TypeError, AttributeError):  # an xxhash without a library file (__file__ None or missing)
        return None, None, 0

    def read(fd: int, dst: memoryview, offset: int, step: int, flags: int = 0) -> Hashed:
        done, value, err = native.read(fd, dst, offset, step, flags)
        return Hashed(done, hex_digest(value), err)

    def direct(fd_direct: int, fd: int, dst: memoryview, offset: int, depth: int) -> Hashed:
        done, value, err = native.read_direct(fd_direct, fd, dst, offset, depth)
        return Hashed(done, hex_digest(value), err)

    try:
        agrees = _agrees(read)
    except OSError as e:  # no memfd for the check (EMFILE, a sandbox): not proven, so not used
        log.info("cannot check the native xxh3 (%s): the fill hashes in Python", e.strerror)
        return None, None, 0
    if not agrees:
        log.warning("native xxh3 disagrees with python xxhash %s: the fill hashes in Python", xxhash.VERSION)
        return None, None, 0
    return read, direct, int(native.DIRECT_STEP)


def _agrees(read: ReadFn) -> bool:
    """Digests of reads in odd steps across xxh3's block sizes equal python xxhash's."""
    data = os.urandom((1 << 20) + 4099)
    fd = os.memfd_create("sllmfs-hash-check", os.MFD_CLOEXEC)
    try:
        os.write(fd, data)
        for step, n in ((65536 + 7, len(data)), (1 << 20, len(data)), (240, 4000), (1 << 20, 0)):
            got = read(fd, memoryview(bytearray(n)), 0, step, 0)
            if got != Hashed(n, digest(data[:n]), 0):
                return False
        return True
    finally:
        os.close(fd)


# read(fd, dst, offset, step, flags): a window from the page cache; read_direct(fd_direct, fd, dst, offset,
# depth): a window past it, ``depth`` O_DIRECT reads in flight; each hashed as its reads land
# (csrc/hashread.cpp). Both None where the native module does not bind or agree.
# DIRECT_STEP: the size of read_direct's O_DIRECT reads (0 where it is None)
read, read_direct, DIRECT_STEP = _bind()
