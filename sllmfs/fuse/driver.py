"""The kernel driver: our own /dev/fuse request loop over the same ``Ops`` pyfuse3 drives.

Why not pyfuse3 here: it cannot answer an open with ``FOPEN_PASSTHROUGH``. With passthrough, a
resident variant's safetensors file is opened on a backing memfd (``backing``) and the kernel
serves its reads and mmaps at memory speed, without a request reaching us. Everything else (the
namespace, metadata files, variants not resident, any kernel without passthrough) is answered by
``Ops`` exactly as under pyfuse3: the semantics have one home.

The kernel allows one io mode per inode at a time: while an inode has cached opens, a passthrough
open fails with EIO, and the reverse. So each inode's open handles share one mode: the first open
picks (passthrough when resident), later opens follow until all are closed.
"""

from __future__ import annotations

import errno
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyfuse3
import trio

from sllmfs.fuse import kernel
from sllmfs.fuse.backing import Backings, CopyBudget, ResidentFile
from sllmfs.fuse.kernel import Opcode, Request
from sllmfs.fuse.ops import Ops
from sllmfs.fuse.tierfile import TierFile
from sllmfs.fuse.tree import Node

log = logging.getLogger(__name__)

READ_BUFFER = (1 << 20) + 4096  # the kernel wants room for its largest write (max_write) plus headers
MAX_WRITE = 1 << 20
MAX_PAGES = 256  # 1 MiB requests (the kernel caps at its max_pages_limit)
MAX_BACKGROUND, CONGESTION_THRESHOLD = 64, 48  # as mount.tune sets them under pyfuse3
EXPIRE_EVERY = 5.0


@dataclass
class _Mode:
    passthrough: bool
    opens: int = 0


class KernelDriver:
    def __init__(self, ops: Ops, mountpoint: Path, dev: int, *, passthrough: bool,
                 resident_file: ResidentFile | None = None, copy_budget: CopyBudget | None = None):
        self.ops = ops
        self.resident_file = resident_file
        self.mountpoint = mountpoint
        self.dev = dev
        self.want_passthrough = passthrough
        self.passthrough = False  # known after INIT
        self.backings = Backings(dev, copy_budget)
        self._modes: dict[int, _Mode] = {}
        self._fh_inode: dict[int, int] = {}
        self._warned: set[int] = set()

    # -- the loop ----------------------------------------------------------------

    async def run(self) -> None:
        buf = bytearray(READ_BUFFER)  # one buffer, reused: requests are small (a read-only view gets no writes)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._expire_loop)
            while True:
                try:
                    n = os.readv(self.dev, [buf])
                except BlockingIOError:
                    await trio.lowlevel.wait_readable(self.dev)
                    continue
                except OSError as e:
                    if e.errno in (errno.EINTR, errno.ENOENT):  # ENOENT: interrupted before we read it
                        continue
                    if e.errno == errno.ENODEV:  # unmounted
                        nursery.cancel_scope.cancel()
                        return
                    raise
                req = kernel.parse(memoryview(buf[:n]))  # a copy: the handler outlives the buffer's next use
                if req.opcode == Opcode.INIT:
                    self._init(req)
                elif req.opcode == Opcode.DESTROY:
                    self._reply(req, b"")
                    nursery.cancel_scope.cancel()
                    return
                elif req.opcode in (Opcode.FORGET, Opcode.BATCH_FORGET):
                    for inode, nlookup in kernel.forgotten(req):  # here, in order with the lookups answered
                        self.ops.tree.forget(inode, nlookup)
                elif req.opcode in kernel.NO_REPLY:
                    continue
                else:
                    nursery.start_soon(self._handle, req)
                await trio.lowlevel.checkpoint_if_cancelled()  # a steady stream of requests still stops

    async def _expire_loop(self) -> None:
        while True:
            await trio.sleep(EXPIRE_EVERY)
            self.expire()

    def expire(self) -> None:
        resident = {}
        for inode in self.backings.inodes():
            node = self.ops.tree.get(inode)
            resident[inode] = node is not None and self.ops.resident(node) is not None
        self.backings.expire(resident)
        self._warned = {i for i in self._warned if self.ops.tree.get(i) is not None}  # forgotten inodes go

    def close(self) -> None:
        self.backings.close_all()

    # -- replies -------------------------------------------------------------------

    def _reply(self, req: Request, *payload: bytes | memoryview, error: int = 0) -> bool:
        """Answer ``req``; False when the kernel no longer waits for it (interrupted meanwhile)."""
        size = kernel.OUT_HEADER.size + sum(len(p) for p in payload)
        head = kernel.OUT_HEADER.pack(size if not error else kernel.OUT_HEADER.size, -error, req.unique)
        try:
            os.writev(self.dev, [head, *payload] if not error else [head])
        except OSError as e:
            if e.errno != errno.ENOENT:  # ENOENT: the request was interrupted meanwhile
                log.warning("reply to request %d (opcode %d) failed: %s", req.unique, req.opcode, e.strerror)
            return False
        return True

    def _init(self, req: Request) -> None:
        major, minor, max_readahead, flags, flags2 = kernel.INIT_IN.unpack_from(
            bytes(req.body) + b"\0" * max(0, kernel.INIT_IN.size - len(req.body)))
        offered = kernel.offered(flags, flags2)
        want = kernel.WANTED if self.want_passthrough else kernel.WANTED & ~kernel.PASSTHROUGH
        agreed = offered & want
        self.passthrough = bool(agreed & kernel.PASSTHROUGH)
        if self.want_passthrough and not self.passthrough:
            log.warning("FUSE passthrough is not offered by this kernel (Linux %s, protocol 7.%d): reads of the mount "
                        "go through the daemon", os.uname().release, minor)
        out = kernel.INIT_OUT.pack(kernel.KERNEL_MAJOR, min(minor, kernel.KERNEL_MINOR), max_readahead,
                                   agreed & 0xFFFFFFFF, MAX_BACKGROUND, CONGESTION_THRESHOLD, MAX_WRITE, 1,
                                   MAX_PAGES, 0, agreed >> 32, 1 if self.passthrough else 0)
        self._reply(req, out)
        if self.passthrough:
            self._probe_backing()

    def _probe_backing(self) -> None:
        """Register an empty file once: a kernel that offers passthrough may still refuse us backings
        (FUSE_DEV_IOC_BACKING_OPEN wants CAP_SYS_ADMIN in the initial user namespace: root in a container's
        own namespace mounts, but gets EPERM). Found now, not at each open after a copy made for nothing."""
        fd = os.memfd_create("sllmfs-backing-probe", os.MFD_CLOEXEC)
        try:
            kernel.backing_close(self.dev, kernel.backing_open(self.dev, fd))
        except OSError as e:
            self.passthrough = False
            log.warning("FUSE passthrough: the kernel refuses our backing files (%s): reads of the mount go through "
                        "the daemon", e.strerror)
        finally:
            os.close(fd)

    # -- requests --------------------------------------------------------------------

    async def _handle(self, req: Request) -> None:
        try:
            payload = await self._answer(req)
        except pyfuse3.FUSEError as e:
            self._reply(req, error=e.errno)
            return
        except Exception:
            log.exception("request %d (opcode %d) failed", req.unique, req.opcode)
            self._reply(req, error=errno.EIO)
            return
        if payload is None:
            self._reply(req, error=errno.ENOSYS)
        elif self._reply(req, *payload):
            pass
        elif req.opcode == Opcode.LOOKUP:  # interrupted: the kernel never got the inode Ops counted
            self.ops.tree.forget(kernel.ENTRY_OUT.unpack_from(payload[0])[0], 1)
        elif req.opcode in (Opcode.OPEN, Opcode.OPENDIR):
            # the opener gave up (a signal) before our answer: no RELEASE will come for this handle
            fh = kernel.OPEN_OUT.unpack_from(payload[0])[0]
            if req.opcode == Opcode.OPEN:
                await self._release(fh)
            else:
                await self.ops.releasedir(pyfuse3.FileHandleT(fh))

    async def _answer(self, req: Request) -> list[Any] | None:
        ops, op, body = self.ops, req.opcode, req.body
        ctx: Any = None  # Ops never reads the request context (the kernel checks permissions)
        if op == Opcode.LOOKUP:
            return [_entry(await ops.lookup(pyfuse3.InodeT(req.nodeid), kernel.cstring(body), ctx))]  # type: ignore[arg-type]
        if op == Opcode.GETATTR:
            a = await ops.getattr(pyfuse3.InodeT(req.nodeid), ctx)
            return [kernel.ATTR_OUT.pack(*_secs(a.attr_timeout), 0), _attr(a)]
        if op == Opcode.OPEN:
            flags, _ = kernel.OPEN_IN.unpack_from(body)
            return [await self._open(req.nodeid, flags)]
        if op == Opcode.READ:
            fh, offset, size, _ = kernel.READ_IN.unpack_from(body)
            return [await ops.read(pyfuse3.FileHandleT(fh), offset, size)]
        if op == Opcode.RELEASE:
            fh = kernel.RELEASE_IN.unpack_from(body)[0]
            await self._release(fh)
            return []
        if op == Opcode.FLUSH:
            return []
        if op == Opcode.OPENDIR:
            fh = await ops.opendir(pyfuse3.InodeT(req.nodeid), ctx)
            return [kernel.OPEN_OUT.pack(fh, 0, 0)]
        if op == Opcode.READDIR:
            fh, offset, size, _ = kernel.READ_IN.unpack_from(body)
            return [self._readdir(fh, offset, size)]
        if op == Opcode.RELEASEDIR:
            await ops.releasedir(pyfuse3.FileHandleT(kernel.RELEASE_IN.unpack_from(body)[0]))
            return []
        if op == Opcode.STATFS:
            s = await ops.statfs(ctx)
            return [kernel.KSTATFS.pack(s.f_blocks, s.f_bfree, s.f_bavail, s.f_files, s.f_ffree, s.f_bsize,
                                        s.f_namemax, s.f_frsize)]
        if op == Opcode.GETXATTR:
            size = kernel.GETXATTR_IN.unpack_from(body)[0]
            value = await ops.getxattr(pyfuse3.InodeT(req.nodeid), kernel.cstring(body[kernel.GETXATTR_IN.size:]),  # type: ignore[arg-type]
                                       ctx)
            return [_sized(value, size)]
        if op == Opcode.LISTXATTR:
            size = kernel.GETXATTR_IN.unpack_from(body)[0]
            names = await ops.listxattr(pyfuse3.InodeT(req.nodeid), ctx)
            return [_sized(b"".join(bytes(n) + b"\0" for n in names), size)]
        if op == Opcode.POLL:
            # ENOSYS: the kernel asks no more and calls every file of the mount readable. That is why io_uring
            # runs its reads of the mount in the reader's submitting thread, never io-wq (bench/NOTES-mount.md,
            # "O_DIRECT and io_uring readers"); no poll answer avoids that without a round trip per read.
            return None
        return None  # ACCESS (the kernel checks: default_permissions) and every write: ENOSYS / EROFS by the VFS

    def _readdir(self, fh: int, offset: int, size: int) -> bytes:
        out = bytearray()
        for name, attr, next_id in self.ops.dir_entries(fh, offset):
            entry = kernel.dirent(attr.st_ino, next_id, name, attr.st_mode)
            if len(out) + len(entry) > size:
                break
            out += entry
        return bytes(out)

    async def _open(self, inode: int, flags: int) -> bytes:
        fi = await self.ops.open(pyfuse3.InodeT(inode), pyfuse3.FlagT(flags), None)  # type: ignore[arg-type]
        fh = int(fi.fh)
        node = self.ops.opened(fh)
        use_backing = False
        mode = self._modes.get(inode)
        if self.passthrough and node is not None and node.synth is not None and (mode is None or mode.passthrough):
            views = self.ops.resident(node)
            lent = self._resident_file(node) if self.backings.get(inode) is None else None
            if views is not None or lent is not None or self.backings.get(inode) is not None:
                try:
                    st = node.stored
                    label = f"{st.model} {node.synth.name}" if st else node.synth.name
                    await self.backings.acquire(inode, node.synth, views, label, lent,
                                                (st.model, st.key) if st else ("", ""))
                    use_backing = True
                except OSError as e:  # no memory for the copy, or the kernel refused it: the daemon serves
                    if inode not in self._warned:  # one line per file, however often it is opened
                        self._warned.add(inode)
                        log.warning("%s is read through the daemon, not in passthrough: %s", node.synth.name,
                                    e.strerror)
                except BaseException:
                    await self.ops.release(pyfuse3.FileHandleT(fh))
                    raise
        # other opens of this inode may have been answered while we built: theirs is the inode's mode
        mode = self._modes.get(inode)
        if mode is None:
            mode = self._modes[inode] = _Mode(use_backing)
        elif mode.passthrough and not use_backing:
            self.backings.share(inode)  # held by the open handles: it exists
            use_backing = True
        elif not mode.passthrough and use_backing:
            self.backings.release(inode)
            use_backing = False
        mode.opens += 1
        self._fh_inode[fh] = inode
        if use_backing:
            backing = self.backings.get(inode)
            assert backing is not None
            return kernel.OPEN_OUT.pack(fh, kernel.FOPEN_PASSTHROUGH, backing.backing_id)
        return kernel.OPEN_OUT.pack(fh, kernel.FOPEN_KEEP_CACHE if fi.keep_cache else 0, 0)

    def _resident_file(self, node: Node) -> TierFile | None:
        st, synth = node.stored, node.synth
        if self.resident_file is None or st is None or synth is None:
            return None
        return self.resident_file(st.model, st.key, st.identity, synth.name)

    async def _release(self, fh: int) -> None:
        inode = self._fh_inode.pop(fh, None)
        await self.ops.release(pyfuse3.FileHandleT(fh))
        if inode is None:
            return
        mode = self._modes[inode]
        if mode.passthrough:
            self.backings.release(inode)
        mode.opens -= 1
        if mode.opens == 0:
            del self._modes[inode]


def _secs(t: float) -> tuple[int, int]:
    whole = int(t)
    return whole, int((t - whole) * 1e9)


def _attr(a: pyfuse3.EntryAttributes) -> bytes:
    def split(ns: int) -> tuple[int, int]:
        return ns // 10**9, ns % 10**9

    (at, atn), (mt, mtn), (ct, ctn) = split(a.st_atime_ns), split(a.st_mtime_ns), split(a.st_ctime_ns)
    return kernel.ATTR.pack(a.st_ino, a.st_size, a.st_blocks, at, mt, ct, atn, mtn, ctn, a.st_mode, a.st_nlink,
                            a.st_uid, a.st_gid, a.st_rdev, a.st_blksize, 0)


def _entry(a: pyfuse3.EntryAttributes) -> bytes:
    (entry_s, entry_ns), (attr_s, attr_ns) = _secs(a.entry_timeout), _secs(a.attr_timeout)
    return kernel.ENTRY_OUT.pack(a.st_ino, a.generation, entry_s, attr_s, entry_ns, attr_ns) + _attr(a)


def _sized(value: bytes, size: int) -> bytes:
    """getxattr/listxattr: size 0 asks how long the value is; a short buffer is ERANGE."""
    if size == 0:
        return kernel.GETXATTR_OUT.pack(len(value), 0)
    if len(value) > size:
        raise pyfuse3.FUSEError(errno.ERANGE)
    return value
