"""pyfuse3 operations: answer the kernel from the tree, the memory tier and the store.

Reads of synthesized files resolve to header bytes and partition ranges. A
variant that is resident in the memory tier (this very version: its identity)
is served by slicing its segments (no copy on our side; the sidecar verified
them as it filled them). A variant not resident is filled into the tier at a
handle's first tensor read, and reads wait for their windows (``incoming``);
where it cannot be, the ranges are read from the store's data files in a worker
thread (``storeio``, which checks a window's checksum each time it reads it from the store).
Contents never change for a given inode, so the kernel may keep its page cache
across opens (``keep_cache``): re-reads never reach us.

An open handle reads the version it was opened on to its end, or fails: its
data files are opened through the variant directory after checking its identity.
"""

from __future__ import annotations

import errno
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import pyfuse3
import trio

from sllmfs.core.errors import SllmfsError
from sllmfs.fuse.incoming import START_AFTER, Incoming, Warm, wait_for
from sllmfs.fuse.storeio import BadWindow, Checked, PartitionFiles, read_meta
from sllmfs.fuse.synth import Piece
from sllmfs.fuse.tree import Node, StoredVariant, Tree
from sllmfs.protocol.marker import SOCKET_XATTR as _SOCKET_XATTR
from sllmfs.store.format import CHUNK_SIZE
from sllmfs.store.store import Identity

log = logging.getLogger(__name__)

# (model, variant, identity) -> one view per partition when exactly that version is resident
ResidentView = Callable[[str, str, Identity], "list[memoryview] | None"]

SOCKET_XATTR = os.fsencode(_SOCKET_XATTR)  # the kernel hands xattr names as bytes
NAMESPACE_TIMEOUT = 0.0  # root, org and model folders: saves and removals show at once
CONTENT_TIMEOUT = 3600.0  # a model's files never change under a given inode
BLKSIZE = 1 << 20  # st_blksize: tells cp and stdio to read in large blocks
POOL_BUFFER = 1 << 20  # the kernel's largest read request (fuse max_pages 256)
POOL_SIZE = 64  # as many as requests in flight (max_background)


@dataclass
class _Open:
    node: Node
    data: bytes | None = None  # a metadata file: its bytes, read whole at open and checked (storeio.read_meta)
    parts: PartitionFiles | None = None  # a synthesized file: its variant's data files
    incoming: Incoming | None = None  # its variant's copy in the memory tier, filling or ready
    warming: trio.Event | None = None  # a fill was asked for: set once answered (reads meanwhile wait)
    tensor_bytes: int = 0  # asked for so far: past incoming.START_AFTER a fill is started


# Asked about a path the store lacks ("org" or "org/m"): "model" once the model is in the store
# (pulled), "namespace" when models lie below it, None when neither. Blocking: run in a thread.
OnMiss = Callable[[str], str | None]


class Ops(pyfuse3.Operations):
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, tree: Tree, resident_view: ResidentView | None, gid: int | None = None,
                 in_use: Counter[str] | None = None, on_miss: OnMiss | None = None, warm: Warm | None = None):
        super().__init__()
        self.tree = tree
        self.on_miss = on_miss
        self.warm = warm  # fills a variant into the memory tier for a cold reader (None: the store serves)
        # models with a weights file open through the mount (the sidecar's disk budget leaves them alone)
        self.in_use: Counter[str] = in_use if in_use is not None else Counter()
        self.gid = gid  # with a group: root:group and no bits for others (the kernel checks, default_permissions)
        self.resident_view = resident_view
        self._open: dict[int, _Open] = {}
        self._dirs: dict[int, list[tuple[str, Node]]] = {}
        self._next_fh = 1
        self._buffers: list[bytearray] = []  # reply buffers for store reads, reused
        self._checked: dict[Identity, Checked] = {}  # what store reads verified, per committed version
        self._current: dict[tuple[str, str], Identity] = {}  # (model, variant) -> the version last opened
        self._warned: set[tuple[int, str]] = set()  # (inode, line): a damaged metadata file is logged once

    # -- attributes -------------------------------------------------------------

    def _attr(self, node: Node) -> pyfuse3.EntryAttributes:
        try:
            return self._fill_attr(node)
        except OverflowError:  # a value past 64 bits would end pyfuse3's main loop (and the mount)
            log.exception("attributes of inode %d do not fit", node.inode)
            raise pyfuse3.FUSEError(errno.EIO) from None

    def _fill_attr(self, node: Node) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = pyfuse3.InodeT(node.inode)
        a.generation = 0
        timeout = NAMESPACE_TIMEOUT if node.dynamic else CONTENT_TIMEOUT
        a.entry_timeout = timeout
        a.attr_timeout = timeout
        a.st_mode = pyfuse3.ModeT(node.mode if self.gid is None else node.mode & ~0o007)
        a.st_nlink = 2 if node.is_dir else 1
        a.st_uid = 0
        a.st_gid = self.gid or 0
        a.st_size = node.size
        a.st_blksize = BLKSIZE
        a.st_blocks = (node.size + 511) // 512
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = node.mtime_ns
        return a

    def _get(self, inode: int) -> Node:
        node = self.tree.get(inode)
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return node

    def _children(self, node: Node) -> dict[str, Node]:
        # an unexpected error here would end pyfuse3's main loop (and the mount): answer EIO instead
        try:
            return self.tree.children(node)
        except Exception:
            log.exception("listing inode %d failed", node.inode)
            raise pyfuse3.FUSEError(errno.EIO) from None

    async def lookup(self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT,
                     ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        parent = self._get(parent_inode)
        if not parent.is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        try:
            node = self.tree.child(parent, os.fsdecode(name))
        except Exception:
            log.exception("lookup of %r in inode %d failed", name, parent.inode)
            raise pyfuse3.FUSEError(errno.EIO) from None
        if node is None and self.on_miss is not None and parent.prefix is not None and parent.model_stamp is None:
            node = await self._from_origin(parent, os.fsdecode(name))  # only in namespace folders: no probe
        if node is None:  # of a missing file inside a model ever reaches the origin
            raise pyfuse3.FUSEError(errno.ENOENT)
        attr = self._attr(node)
        self.tree.looked_up(node)  # the reply hands the kernel this inode (no await from here to the reply)
        return attr

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        """The kernel let go of inodes (pyfuse3 calls this; our driver calls ``tree.forget`` itself)."""
        for inode, nlookup in inode_list:
            self.tree.forget(inode, nlookup)

    async def _from_origin(self, parent: Node, name: str) -> Node | None:
        """A name the store lacks, looked up in the origin: a model is pulled (verified) before the
        lookup answers; a namespace of origin models is shown as an (empty until pulled) folder."""
        assert parent.prefix is not None and self.on_miss is not None
        full = "/".join((*parent.prefix, name))
        try:
            found = await trio.to_thread.run_sync(self.on_miss, full)
        except SllmfsError as e:  # unreachable, damaged copy: this lookup fails, the mount goes on
            log.warning("lookup of %s in the origin: %s", full, e)
            raise pyfuse3.FUSEError(errno.EIO) from None
        if found == "model":
            return self.tree.child(parent, name)
        if found == "namespace":
            return self.tree.namespace((*parent.prefix, name))
        return None

    async def getattr(self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attr(self._get(inode))

    async def getxattr(self, inode: pyfuse3.InodeT, name: pyfuse3.XAttrNameT,
                       ctx: pyfuse3.RequestContext) -> bytes:
        self._get(inode)
        if name != SOCKET_XATTR:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        return os.fsencode(self.tree.socket_path)

    async def listxattr(self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext) -> list[pyfuse3.XAttrNameT]:
        self._get(inode)
        return [pyfuse3.XAttrNameT(SOCKET_XATTR)]

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        st = os.statvfs(self.tree.store.root)
        s = pyfuse3.StatvfsData()
        s.f_bsize = st.f_bsize
        s.f_frsize = st.f_frsize
        s.f_blocks = st.f_blocks
        s.f_bfree = s.f_bavail = 0  # read-only: nothing to give
        s.f_files = self.tree.inode_count
        s.f_ffree = s.f_favail = 0
        s.f_namemax = 255
        return s

    # -- directories ------------------------------------------------------------

    async def opendir(self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext) -> pyfuse3.FileHandleT:
        node = self._get(inode)
        if not node.is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        fh = self._next_fh
        self._next_fh += 1
        # one snapshot per open, so paged readdir stays consistent while the store changes
        self._dirs[fh] = sorted(self._children(node).items())
        return pyfuse3.FileHandleT(fh)

    async def readdir(self, fh: pyfuse3.FileHandleT, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        entries = self._dirs.get(fh, [])
        for name, attr, next_id in self.dir_entries(fh, start_id):
            if not pyfuse3.readdir_reply(token, name, attr, next_id):
                break
            self.tree.looked_up(entries[next_id - 1][1])  # pyfuse3 answers with readdirplus: a lookup each

    def dir_entries(self, fh: int, start_id: int) -> Iterator[tuple[bytes, pyfuse3.EntryAttributes, int]]:
        """The entries of an open directory from ``start_id`` on: name, attributes, the next id."""
        entries = self._dirs.get(fh, [])
        for i in range(start_id, len(entries)):
            name, node = entries[i]
            yield os.fsencode(name), self._attr(node), i + 1

    async def releasedir(self, fh: pyfuse3.FileHandleT) -> None:
        self._dirs.pop(fh, None)
        self.tree.sweep()  # what listings made and no lookup took goes (it never sees a FORGET)

    # -- files ------------------------------------------------------------------

    async def open(self, inode: pyfuse3.InodeT, flags: pyfuse3.FlagT, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        node = self._get(inode)
        if node.is_dir:
            raise pyfuse3.FUSEError(errno.EISDIR)
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC:
            raise pyfuse3.FUSEError(errno.EROFS)
        h = _Open(node)
        # open now: the bytes stay readable if the model is removed while a reader holds it
        if node.stored is not None:
            st = node.stored
            checked = self._checked.get(st.identity)
            if checked is None:
                checked = Checked(st.manifest.partitions)
            try:  # ESTALE when replaced since the lookup: the kernel looks the name up again
                h.parts = PartitionFiles(st.dir, st.identity, checked, below=self.tree.store.models_dir)
            except OSError as e:
                raise pyfuse3.FUSEError(e.errno or errno.EIO) from None
            except SllmfsError as e:  # a symlink or FIFO planted since the listing
                log.warning("%s", e)
                raise pyfuse3.FUSEError(errno.EIO) from None
            self._keep_checked(st, checked)
            checked.opens += 1
            self.in_use[st.model] += 1
        elif node.path is not None:
            # the whole file, checked against its recorded digest; reads are served from these bytes only
            h.data = await trio.to_thread.run_sync(self._meta_bytes, node)
        fh = self._next_fh
        self._next_fh += 1
        self._open[fh] = h
        return pyfuse3.FileInfo(fh=pyfuse3.FileHandleT(fh), keep_cache=True, direct_io=False)

    def _meta_bytes(self, node: Node) -> bytes:
        """A metadata file's verified bytes, or EIO for this open with one log line per file and failure."""
        assert node.path is not None
        try:
            data = read_meta(self.tree.store, node.path)
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from None
        except SllmfsError as e:  # damaged (checksum, size, a symlink or FIFO planted since the listing)
            self._warn_once(node, str(e))
            raise pyfuse3.FUSEError(errno.EIO) from None
        except Exception:  # anything else would end pyfuse3's main loop (and the mount)
            log.exception("open of %s failed", node.path)
            raise pyfuse3.FUSEError(errno.EIO) from None
        if not self.tree.current(node):  # replaced since the lookup: the kernel looks the name up again
            raise pyfuse3.FUSEError(errno.ESTALE)
        if len(data) != node.size:  # the listing saw another size: serving these bytes at that size is wrong
            self._warn_once(node, f"{node.path} changed since the mount listed it ({node.size} bytes then, "
                                  f"{len(data)} now); its reads fail with EIO: save the model again with --force")
            raise pyfuse3.FUSEError(errno.EIO)
        return data

    def _warn_once(self, node: Node, line: str) -> None:
        if (node.inode, line) not in self._warned:
            self._warned.add((node.inode, line))
            log.warning("%s", line)

    def opened(self, fh: int) -> Node | None:
        """The node an open file handle reads (the kernel driver decides passthrough from it)."""
        h = self._open.get(fh)
        return h.node if h is not None else None

    def _keep_checked(self, st: StoredVariant, checked: Checked) -> None:
        """Keep ``checked`` for the version just opened, and forget its variant's previous version: the
        open succeeded, so that one is replaced and never opens again (open checks the identity); its
        handles still open hold their own reference. One entry per variant, however often it is replaced."""
        slot = (st.model, st.key)
        old = self._current.get(slot)
        if old is not None and old != st.identity:
            self._checked.pop(old, None)
        self._current[slot] = st.identity
        self._checked[st.identity] = checked

    async def release(self, fh: pyfuse3.FileHandleT) -> None:
        h = self._open.pop(fh, None)
        if h:
            if h.parts is not None:
                h.parts.close()
                assert h.node.stored is not None
                self.in_use[h.node.stored.model] -= 1
                if self.in_use[h.node.stored.model] <= 0:
                    del self.in_use[h.node.stored.model]
                h.parts.checked.opens -= 1
                if h.parts.checked.opens == 0:
                    h.parts.checked.drop_buffers()

    async def read(self, fh: pyfuse3.FileHandleT, off: int, size: int) -> bytes:
        h = self._open.get(fh)
        if h is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        node = h.node
        if off >= node.size or size <= 0:
            return b""
        try:
            if node.data is not None:
                return node.data[off:off + size]
            if h.data is not None:
                return h.data[off:off + size]
            if node.synth is None:
                raise OSError(errno.EIO, "not a readable file")
            return await self._read_synth(h, off, size)  # type: ignore[return-value]  # any buffer works
        except BadWindow as e:
            if e.first:  # one line per bad window, however many reads hit it
                log.warning("%s", self._bad_window_line(node, e))
            raise pyfuse3.FUSEError(errno.EIO) from None
        except (OSError, ValueError, IndexError) as e:  # a short, vanished or evicted source
            log.warning("read of %s at %d failed: %s", node.synth.name if node.synth else node.path, off, e)
            raise pyfuse3.FUSEError(errno.EIO) from None
        except Exception:  # anything else would end pyfuse3's main loop (and the mount)
            log.exception("read of inode %d at %d failed", node.inode, off)
            raise pyfuse3.FUSEError(errno.EIO) from None

    def _bad_window_line(self, node: Node, e: BadWindow) -> str:
        st = node.stored
        assert st is not None and node.synth is not None
        names = _tensors_in(st, e.part, e.window)
        inside = "no tensor, only padding" if not names else "tensor(s) " + ", ".join(names[:3])
        if len(names) > 3:
            inside += f" and {len(names) - 3} more"
        return (f"model {st.model} [{st.key}] {node.synth.name}: {e.strerror} (holds {inside}); its reads fail "
                f"with EIO: run `sllmfs verify --model {st.model}{self.tree.store.hint}`, then save it again")

    def resident(self, node: Node) -> list[memoryview] | None:
        """The memory tier's segments of exactly the version ``node`` shows, when resident."""
        return self._resident(node)

    def _resident(self, node: Node) -> list[memoryview] | None:
        st = node.stored
        if self.resident_view is None or st is None:
            return None
        views = self.resident_view(st.model, st.key, st.identity)
        if views is None or len(views) != len(st.manifest.partitions):
            return None
        return views

    async def _read_synth(self, h: _Open, off: int, size: int) -> bytes | bytearray | memoryview:
        synth = h.node.synth
        assert synth is not None
        pieces = synth.resolve(off, size)
        views = self._resident(h.node)
        if views is None and self.warm is not None and h.parts is not None:
            tensor = sum(p.length for p in pieces if p.partition >= 0)
            if tensor:
                h.tensor_bytes += tensor
                views = await self._incoming(h, pieces)
        if len(pieces) == 1:
            p = pieces[0]
            end = p.source_offset + p.length
            if p.partition < 0:
                return synth.header[p.source_offset:end]
            if views is not None:
                return views[p.partition][p.source_offset:end]  # zero-copy: the kernel copies from the segment
        total = sum(p.length for p in pieces)
        buf = self._buffers.pop() if self._buffers else bytearray(POOL_BUFFER)
        if len(buf) < total:
            buf = bytearray(total)
        out = memoryview(buf)[:total]
        try:
            await self._fill(h, pieces, views, out)
        finally:
            # pyfuse3 copies the reply to the kernel as soon as we return, before any other task
            # runs, so the buffer is free again for the next read
            if len(buf) == POOL_BUFFER and len(self._buffers) < POOL_SIZE:
                self._buffers.append(buf)
        return out

    async def _incoming(self, h: _Open, pieces: list[Piece]) -> list[memoryview] | None:
        """The variant's views once the windows of ``pieces`` are in the memory tier: a copy there
        already (filling or not), or one this handle starts past START_AFTER bytes; None: read the store
        (no copy yet, no room, or it failed or went)."""
        st = h.node.stored
        assert st is not None and self.warm is not None
        if h.warming is None and h.incoming is None:
            if h.tensor_bytes >= START_AFTER:
                h.warming = warming = trio.Event()  # reads meanwhile wait for this answer
                try:
                    h.incoming = await self.warm(st.model, st.key, st.identity, True)
                finally:
                    warming.set()
            else:  # join only; another read of this handle may have started a fill while this one asked
                joined = await self.warm(st.model, st.key, st.identity, False)
                if h.warming is None and h.incoming is None:
                    h.incoming = joined
        elif h.warming is not None:
            await h.warming.wait()
        if h.incoming is None:
            return None
        views = await wait_for(h.incoming, pieces)
        if views is None:  # failed or gone: this handle reads the store from now on, starting nothing
            h.incoming = None
            if h.warming is None:
                h.warming = trio.Event()
                h.warming.set()
        return views

    async def _fill(self, h: _Open, pieces: list[Piece], views: list[memoryview] | None, out: memoryview) -> None:
        synth = h.node.synth
        assert synth is not None
        disk: list[tuple[int, memoryview, int]] = []
        pos = 0
        for p in pieces:
            dst = out[pos:pos + p.length]
            if p.partition < 0:
                dst[:] = synth.header[p.source_offset:p.source_offset + p.length]
            elif views is not None:
                dst[:] = views[p.partition][p.source_offset:p.source_offset + p.length]
            else:
                disk.append((p.partition, dst, p.source_offset))
            pos += p.length
        if disk:
            await trio.to_thread.run_sync(_pread_all, h, disk)


def _pread_all(h: _Open, ranges: list[tuple[int, memoryview, int]]) -> None:
    assert h.parts is not None
    for part, dst, offset in ranges:
        h.parts.read_into(part, dst, offset)


def _tensors_in(st: StoredVariant, part: int, window: int) -> list[str]:
    """Stored tensors with bytes in one window of a partition (for the log line)."""
    lo, hi = window * CHUNK_SIZE, (window + 1) * CHUNK_SIZE
    return [name for name, t in st.manifest.tensors.items()
            if t.partition == part and t.offset < hi and t.offset + t.nbytes > lo]
