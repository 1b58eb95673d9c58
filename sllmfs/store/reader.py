"""Read a stored variant: tensor bytes, views over mapped data, and verification."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import xxhash

from sllmfs.core import dtypes
from sllmfs.core.errors import Corrupt
from sllmfs.store.format import CHUNK_SIZE, Manifest, corrupt, digest, load_manifest, open_regular


class VariantReader:
    def __init__(self, variant_dir: Path, manifest: Manifest | None = None):
        self.dir = variant_dir
        self.manifest = manifest or load_manifest(variant_dir)
        self._fds: dict[int, int] = {}

    def partition_path(self, index: int) -> Path:
        return self.dir / self.manifest.partitions[index].file

    def _fd(self, index: int) -> int:
        fd = self._fds.get(index)
        if fd is None:
            path = self.partition_path(index)
            try:
                fd = self._fds[index] = open_regular(path)  # no planted symlink, no FIFO to hang on
            except FileNotFoundError:
                raise corrupt(path, "is missing") from None
        return fd

    def read_range(self, partition: int, offset: int, nbytes: int) -> bytes:
        data = os.pread(self._fd(partition), nbytes, offset)
        if len(data) != nbytes:
            raise Corrupt(f"{self.partition_path(partition)} is shorter than its manifest says")
        return data

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
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

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
        what = f"tensor {self.name!r}" if self.name else "padding between tensors"
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
        fd = reader._fd(index)
        tensors = by_part.get(index, [])
        hashers = [xxhash.xxh3_64() for _ in tensors]
        first = 0  # tensors before this one end before the current window
        for k, start in enumerate(range(0, p.size, CHUNK_SIZE)):
            n = min(CHUNK_SIZE, p.size - start)
            got = read_full(fd, view[:n], start)
            actual = digest(view[:got]) if got == n else "file truncated"
            expected = p.chunks[k] if k < len(p.chunks) else "none"
            if actual != expected:
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


def read_full(fd: int, dst: memoryview, offset: int) -> int:
    """Bytes read into ``dst`` from ``offset`` until it is full or the file ends."""
    done = 0
    while done < len(dst):
        n = os.preadv(fd, [dst[done:]], offset + done)
        if n <= 0:
            break
        done += n
    return done


def _in_disk_order(m: Manifest) -> Iterator[tuple[str, Any]]:
    return iter(sorted(m.tensors.items(), key=lambda kv: (kv[1].partition, kv[1].offset)))
