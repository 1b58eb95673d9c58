"""Read a stored variant: the one partition reader, tensor bytes, and verification.

Every reader of data files comes through ``Partitions`` (the CLI's verify, the
sidecar's fill, the FUSE view, the SGLang store source): files opened without
following a link and without waiting on a FIFO, through a pinned directory where
the caller needs one version throughout (``pinned_variant``), and every 4 MiB
window checked the one way (``window_ok``). What differs between readers is a
parameter: O_DIRECT beside the page cache (the mount, which must not cache twice),
a missing file as -1 (served from memory instead), a private map (torch views).
"""

from __future__ import annotations

import errno
import mmap
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import xxhash

from sllmfs.core import dtypes
from sllmfs.core.errors import Corrupt
from sllmfs.store.format import (
    CHUNK_SIZE,
    MANIFEST,
    Manifest,
    Partition,
    corrupt,
    digest,
    load_manifest,
    open_dir,
    open_regular,
)

Identity = tuple[int, int]
"""What a committed variant *is*: (inode, mtime_ns) of its manifest. Every commit writes a new
manifest file, so a replaced or re-saved variant never has its predecessor's identity; residency,
mount inodes and open handles are keyed by it, never by the model's name alone."""


def variant_identity(variant_dir: Path, *, dir_fd: int | None = None) -> Identity | None:
    """The identity of the variant committed at ``variant_dir`` now (None: there is none)."""
    try:
        st = os.stat(MANIFEST if dir_fd is not None else variant_dir / MANIFEST, dir_fd=dir_fd)
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns)


@contextmanager
def pinned_variant(variant_dir: Path, *, below: Path | None = None,
                   identity: Identity | None = None) -> Iterator[int]:
    """The variant directory held open (no link followed under ``below``), so files opened through
    it belong to one committed version: a replace puts a whole new directory in place. With
    ``identity``: ESTALE unless the directory still holds that version."""
    dfd = open_dir(variant_dir, below=below)
    try:
        if identity is not None and variant_identity(variant_dir, dir_fd=dfd) != identity:
            raise OSError(errno.ESTALE, "the variant was replaced", str(variant_dir))
        yield dfd
    finally:
        os.close(dfd)


def window_ok(p: Partition, k: int, data: Any) -> bool:
    """Whether ``data`` is window ``k`` of partition ``p`` as its manifest checksummed it."""
    return window_matches(p, k, digest(data))


def window_matches(p: Partition, k: int, hexdigest: str) -> bool:
    """Whether ``hexdigest`` is window ``k``'s checksum in ``p``'s manifest (one it lacks never matches)."""
    return k < len(p.chunks) and hexdigest == p.chunks[k]


class WindowCheck:
    """``window_ok`` fed as the window's bytes land, in reads of any size: the fill checksums each
    read while its bytes are still in the CPU's caches instead of reading 4 MiB back from memory."""

    def __init__(self, p: Partition, k: int):
        self.partition, self.index = p, k
        self._hash = xxhash.xxh3_64()  # the streamed form of format.digest: the same hex, one window

    def update(self, data: Any) -> None:
        self._hash.update(data)

    def ok(self) -> bool:
        return window_matches(self.partition, self.index, self._hash.hexdigest())


def windows(p: Partition) -> int:
    return -(-p.size // CHUNK_SIZE)


class Partitions:
    """A variant's data files, each opened once: on first use (``fd``) or all now (``open_all``).

    No link is followed and no FIFO waited on. ``dir_fd``: open through that directory (from
    ``pinned_variant``; it must stay open until the files are). ``direct``: open with O_DIRECT,
    -1 where the filesystem has none (read through the page cache then). ``missing_ok``: -1 for
    a missing file, else FileNotFoundError.
    """

    def __init__(self, variant_dir: Path, partitions: Sequence[Partition], *, dir_fd: int | None = None,
                 direct: bool = False, missing_ok: bool = False):
        self.dir = variant_dir
        self.partitions = list(partitions)
        self._dir_fd = dir_fd
        self._flags = os.O_DIRECT if direct else 0
        self._missing_ok = missing_ok
        self._fds: dict[int, int] = {}

    def path(self, index: int) -> Path:
        return self.dir / self.partitions[index].file

    def fd(self, index: int) -> int:
        fd = self._fds.get(index)
        if fd is None:
            fd = self._fds[index] = self._open(index)
        return fd

    def open_all(self) -> Partitions:
        try:
            for index in range(len(self.partitions)):
                self.fd(index)
        except BaseException:
            self.close()
            raise
        return self

    def _open(self, index: int) -> int:
        try:
            return open_regular(self.path(index), dir_fd=self._dir_fd, flags=self._flags)
        except FileNotFoundError:
            if self._missing_ok:
                return -1
            raise
        except OSError as e:
            if self._flags & os.O_DIRECT and e.errno == errno.EINVAL:
                return -1  # this filesystem has no O_DIRECT
            raise

    def read_into(self, index: int, dst: memoryview, offset: int) -> int:
        """Bytes read into ``dst`` from ``offset`` until it is full or the file ends."""
        return read_full(self.fd(index), dst, offset)

    def read(self, index: int, offset: int, nbytes: int) -> bytes:
        data = os.pread(self.fd(index), nbytes, offset)
        if len(data) != nbytes:
            raise Corrupt(f"{self.path(index)} is shorter than its manifest says")
        return data

    def map_private(self, index: int) -> mmap.mmap | None:
        """Partition ``index`` mapped copy-on-write (torch wants a writable buffer; nothing is copied
        unless written), its descriptor closed; None for an empty partition."""
        p = self.partitions[index]
        if p.size == 0:
            return None
        fd = self._fds.pop(index, None)
        fd = self._open(index) if fd is None else fd
        try:
            if os.fstat(fd).st_size < p.size:
                raise Corrupt(f"{self.path(index)} is shorter than its manifest says; run "
                              "`sllmfs verify` and save the model again")
            return mmap.mmap(fd, p.size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)

    def close(self) -> None:
        for fd in self._fds.values():
            if fd >= 0:
                os.close(fd)
        self._fds.clear()

    def __enter__(self) -> Partitions:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class VariantReader:
    def __init__(self, variant_dir: Path, manifest: Manifest | None = None):
        self.dir = variant_dir
        self.manifest = manifest or load_manifest(variant_dir)
        self.files = Partitions(variant_dir, self.manifest.partitions)

    def fd(self, index: int) -> int:
        try:
            return self.files.fd(index)
        except FileNotFoundError:
            raise corrupt(self.files.path(index), "is missing") from None

    def read_range(self, partition: int, offset: int, nbytes: int) -> bytes:
        self.fd(partition)
        return self.files.read(partition, offset, nbytes)

    def read_tensor(self, name: str) -> bytes:
        t = self.manifest.entry(name)
        return self.read_range(t.partition, t.offset, t.nbytes)

    def tensor(self, name: str) -> Any:
        """A torch tensor copy (for tests and small models; loaders map instead)."""
        import torch

        t = self.manifest.entry(name)
        dt = dtypes.by_code(t.dtype)
        if not t.nbytes:
            return torch.empty(t.shape, dtype=dtypes.to_torch(dt))
        buf = bytearray(self.read_tensor(name))
        return torch.frombuffer(buf, dtype=torch.uint8).view(dtypes.to_torch(dt)).reshape(t.shape)

    def close(self) -> None:
        self.files.close()

    def __enter__(self) -> VariantReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class BadTensor:
    name: str  # the tensor, or for a window the first tensor in it ("" where it holds none)
    expected: str
    actual: str
    window: str = ""  # "data_0.bin window 3" when a checksum window failed

    def describe(self) -> str:
        what = f"tensor {self.name!r}" if self.name else "bytes in no tensor: a file's header or padding"
        where = f"{self.window} ({what})" if self.window else what
        return f"{where} is corrupt (checksum {self.actual}, expected {self.expected})"


def verify_variant(reader: VariantReader, progress: Callable[[int], None] | None = None) -> BadTensor | None:
    """Re-read every stored byte once and check exactly what the sidecar's fill checks (every
    partition's 4 MiB windows, padding included) plus every tensor's own checksum; return the
    first failure."""
    progress = progress or (lambda n: None)
    buf = bytearray(CHUNK_SIZE)
    view = memoryview(buf)
    m = reader.manifest
    by_part: dict[int, list[tuple[str, Any]]] = {}
    for name, t in _in_disk_order(m):
        by_part.setdefault(t.partition, []).append((name, t))
    for index, p in enumerate(m.partitions):
        fd = reader.fd(index)
        tensors = by_part.get(index, [])
        hashers = [xxhash.xxh3_64() for _ in tensors]
        first = 0  # tensors before this one end before the current window
        for k, start in enumerate(range(0, p.size, CHUNK_SIZE)):
            n = min(CHUNK_SIZE, p.size - start)
            got = read_full(fd, view[:n], start)
            if got != n or not window_ok(p, k, view[:n]):
                actual = digest(view[:got]) if got == n else "file truncated"
                expected = p.chunks[k] if k < len(p.chunks) else "none"
                inside = [(nm, t) for nm, t in tensors if t.offset < start + n and t.offset + t.nbytes > start]
                return BadTensor(_culprit(reader, inside), expected, actual, window=f"{p.file} window {k}")
            while first < len(tensors) and tensors[first][1].offset + tensors[first][1].nbytes <= start:
                first += 1
            for i in range(first, len(tensors)):
                t = tensors[i][1]
                if t.offset >= start + n:
                    break
                lo, hi = max(t.offset, start), min(t.offset + t.nbytes, start + n)
                hashers[i].update(view[lo - start:hi - start])
            progress(n)
        for (name, t), h in zip(tensors, hashers, strict=True):
            if f"{h.intdigest():016x}" != t.checksum:
                return BadTensor(name, t.checksum, f"{h.intdigest():016x}")
    return None


def _culprit(reader: VariantReader, inside: list[tuple[str, Any]]) -> str:
    """The first tensor of a failed window whose own checksum fails ("" : only padding changed)."""
    for name, t in inside:
        try:
            data = reader.read_range(t.partition, t.offset, t.nbytes)
        except Corrupt:
            return name
        if digest(data) != t.checksum:
            return name
    return ""


class ReadFailed(OSError):
    """A read of a store file failed at byte ``at`` (EIO from a failing disk, say): ``error`` is the
    read's own error, whose errno and message this one carries."""

    def __init__(self, at: int, error: OSError):
        super().__init__(error.errno, error.strerror)
        self.at, self.error = at, error


def read_full(fd: int, dst: memoryview, offset: int, preadv: Callable[..., int] | None = None) -> int:
    """Bytes read into ``dst`` from ``offset`` until it is full or the file ends; an error is a
    ``ReadFailed`` naming the byte it hit. ``preadv(fd, buffers, offset)``: os.preadv by default."""
    read = preadv or os.preadv
    done = 0
    while done < len(dst):
        try:
            n = read(fd, [dst[done:]], offset + done)
        except OSError as e:
            raise ReadFailed(offset + done, e) from e
        if n <= 0:
            break
        done += n
    return done


def _in_disk_order(m: Manifest) -> Iterator[tuple[str, Any]]:
    return iter(sorted(m.tensors.items(), key=lambda kv: (kv[1].partition, kv[1].offset)))
