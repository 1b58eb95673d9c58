"""The kernel's FUSE protocol (linux/fuse.h, 7.40+), as much of it as a read-only view needs.

We speak it ourselves, not through libfuse, for one reason: FUSE passthrough (Linux >= 6.9).
An open file can be backed by a kernel file (``FOPEN_PASSTHROUGH`` + a ``backing_id`` from
``FUSE_DEV_IOC_BACKING_OPEN``), after which its reads and mmaps never reach the daemon. libfuse
exposes it from 3.17 only, pyfuse3 not at all. The layouts below are the kernel ABI: fixed.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import struct
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path

KERNEL_MAJOR, KERNEL_MINOR = 7, 40  # 7.40: passthrough


class Opcode(IntEnum):
    LOOKUP = 1
    FORGET = 2
    GETATTR = 3
    OPEN = 14
    READ = 15
    STATFS = 17
    RELEASE = 18
    GETXATTR = 22
    LISTXATTR = 23
    FLUSH = 25
    INIT = 26
    OPENDIR = 27
    READDIR = 28
    RELEASEDIR = 29
    ACCESS = 34
    INTERRUPT = 36
    DESTROY = 38
    POLL = 40
    BATCH_FORGET = 42


NO_REPLY = {Opcode.FORGET, Opcode.BATCH_FORGET, Opcode.INTERRUPT}

# init flags (bits past 31 travel in flags2)
ASYNC_READ = 1 << 0
PARALLEL_DIROPS = 1 << 18
MAX_PAGES = 1 << 22
INIT_EXT = 1 << 30
PASSTHROUGH = 1 << 37
WANTED = ASYNC_READ | PARALLEL_DIROPS | MAX_PAGES | INIT_EXT | PASSTHROUGH

# open reply flags
FOPEN_DIRECT_IO = 1 << 0
FOPEN_KEEP_CACHE = 1 << 1
FOPEN_PASSTHROUGH = 1 << 7

IN_HEADER = struct.Struct("<IIQQIIIHH")  # len, opcode, unique, nodeid, uid, gid, pid, total_extlen, padding
OUT_HEADER = struct.Struct("<IiQ")  # len, error (negative errno), unique
INIT_IN = struct.Struct("<IIIII")  # major, minor, max_readahead, flags, flags2
INIT_OUT = struct.Struct("<IIIIHHIIHHII2x22x")  # ..., max_pages, map_alignment, flags2, max_stack_depth
ATTR = struct.Struct("<QQQQQQIIIIIIIIII")  # ino size blocks a/m/ctime, nsecs, mode nlink uid gid rdev blksize flags
ENTRY_OUT = struct.Struct("<QQQQII")  # nodeid, generation, entry_valid, attr_valid, their nsecs; then ATTR
ATTR_OUT = struct.Struct("<QII")  # attr_valid, attr_valid_nsec, dummy; then ATTR
OPEN_IN = struct.Struct("<II")  # flags, open_flags
OPEN_OUT = struct.Struct("<QIi")  # fh, open_flags, backing_id
READ_IN = struct.Struct("<QQII")  # fh, offset, size, read_flags (lock_owner, flags follow)
RELEASE_IN = struct.Struct("<QII")  # fh, flags, release_flags
GETXATTR_IN = struct.Struct("<II")  # size, padding; then the name
GETXATTR_OUT = struct.Struct("<II")  # size, padding
FORGET_IN = struct.Struct("<Q")  # nlookup
BATCH_FORGET_IN = struct.Struct("<II")  # count, dummy; then count FORGET_ONEs
FORGET_ONE = struct.Struct("<QQ")  # nodeid, nlookup
DIRENT = struct.Struct("<QQII")  # ino, off, namelen, type; then the name, padded to 8
KSTATFS = struct.Struct("<QQQQQIII4x24x")  # blocks bfree bavail files ffree, bsize namelen frsize

_IOC_WRITE = 1
BACKING_MAP = struct.Struct("<iIQ")  # fd, flags, padding


def _iow(nr: int, size: int) -> int:
    return (_IOC_WRITE << 30) | (size << 16) | (229 << 8) | nr  # FUSE_DEV_IOC_MAGIC 229


BACKING_OPEN = _iow(1, BACKING_MAP.size)
BACKING_CLOSE = _iow(2, 4)

MS_RDONLY, MS_NOSUID, MS_NODEV = 1, 2, 4
MNT_DETACH = 2
_libc = ctypes.CDLL(None, use_errno=True)


@dataclass
class Request:
    opcode: int
    unique: int
    nodeid: int
    uid: int
    gid: int
    pid: int
    body: memoryview  # what follows the header


def parse(buf: memoryview) -> Request:
    length, opcode, unique, nodeid, uid, gid, pid, _, _ = IN_HEADER.unpack_from(buf)
    return Request(opcode, unique, nodeid, uid, gid, pid, buf[IN_HEADER.size:length])


def forgotten(req: Request) -> list[tuple[int, int]]:
    """(inode, nlookup) pairs of a FORGET or BATCH_FORGET: the references the kernel let go of."""
    if req.opcode == Opcode.FORGET:
        return [(req.nodeid, FORGET_IN.unpack_from(req.body)[0])]
    count = BATCH_FORGET_IN.unpack_from(req.body)[0]
    count = min(count, (len(req.body) - BATCH_FORGET_IN.size) // FORGET_ONE.size)  # never past what came
    return [FORGET_ONE.unpack_from(req.body, BATCH_FORGET_IN.size + i * FORGET_ONE.size) for i in range(count)]


def offered(flags: int, flags2: int) -> int:
    """The init flags the kernel offers, as one 64-bit set (flags2 only counts under INIT_EXT)."""
    return flags | (flags2 << 32 if flags & INIT_EXT else 0)


def cstring(body: memoryview) -> bytes:
    raw = bytes(body)
    end = raw.find(b"\0")
    return raw if end < 0 else raw[:end]


def dirent(ino: int, next_off: int, name: bytes, mode: int) -> bytes:
    head = DIRENT.pack(ino, next_off, len(name), (mode >> 12) & 0o17)
    entry = head + name
    return entry + b"\0" * (-len(entry) % 8)


def mount(mountpoint: Path, fd: int, *, allow_other: bool) -> None:
    """mount(2) a FUSE filesystem read-only at ``mountpoint``, served through ``fd`` (root only)."""
    opts = f"fd={fd},rootmode=40000,user_id=0,group_id=0,default_permissions"
    if allow_other:
        opts += ",allow_other"
    if _libc.mount(b"sllmfs", os.fsencode(mountpoint), b"fuse.sllmfs", MS_RDONLY | MS_NOSUID | MS_NODEV,
                   opts.encode()) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def unmount(mountpoint: Path) -> None:
    if _libc.umount2(os.fsencode(mountpoint), MNT_DETACH) != 0:
        e = ctypes.get_errno()
        if e not in (errno.EINVAL, errno.ENOENT):  # EINVAL: not mounted (any more)
            raise OSError(e, os.strerror(e))


def backing_open(dev: int, fd: int) -> int:
    """Register ``fd`` as a passthrough backing file; the id an open reply names it by."""
    # a mutable buffer makes fcntl.ioctl return the call's result (the id), not the buffer
    return fcntl.ioctl(dev, BACKING_OPEN, bytearray(BACKING_MAP.pack(fd, 0, 0)))


def backing_close(dev: int, backing_id: int) -> None:
    fcntl.ioctl(dev, BACKING_CLOSE, bytearray(struct.pack("<I", backing_id)))
