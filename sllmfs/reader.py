"""Read a stored variant: tensor bytes, views over mapped data, and verification."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import xxhash

from sllmfs import dtypes
from sllmfs.errors import Corrupt
from sllmfs.format import Manifest, load_manifest

BLOCK = 8 << 20


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
            fd = self._fds[index] = os.open(self.partition_path(index), os.O_RDONLY)
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
    name: str
    expected: str
    actual: str


def verify_variant(reader: VariantReader, progress: Callable[[int], None] | None = None) -> BadTensor | None:
    """Re-read every stored tensor and check its checksum; return the first bad one."""
    progress = progress or (lambda n: None)
    buf = bytearray(BLOCK)
    view = memoryview(buf)
    for name, t in _in_disk_order(reader.manifest):
        h = xxhash.xxh3_64()
        fd = reader._fd(t.partition)
        pos, left = t.offset, t.nbytes
        while left:
            n = os.preadv(fd, [view[: min(left, BLOCK)]], pos)
            if n <= 0:
                return BadTensor(name, t.checksum, "file truncated")
            h.update(view[:n])
            progress(n)
            pos += n
            left -= n
        actual = f"{h.intdigest():016x}"
        if actual != t.checksum:
            return BadTensor(name, t.checksum, actual)
    return None


def _in_disk_order(m: Manifest) -> Iterator[tuple[str, Any]]:
    return iter(sorted(m.tensors.items(), key=lambda kv: (kv[1].partition, kv[1].offset)))
