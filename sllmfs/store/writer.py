"""Write one variant, with checksums: as its safetensors files (``files``: a stfiles plan), or with
tensors aligned in large ``data_N.bin`` files (per-rank variants).

Bytes arrive either as a range of a source file (safetensors, sllm-store data)
or as an in-memory buffer (a torch tensor from a ``.bin``). Each byte is read
once, hashed twice (per tensor for ``verify``, per 4 MiB window for the
sidecar's fill check) and written once; all-zero blocks become holes.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

from sllmfs.core import dtypes
from sllmfs.core.errors import BadInput
from sllmfs.store.format import (
    ALIGNMENT,
    CHUNK_SIZE,
    LAYOUT_ALIGNED,
    LAYOUT_SAFETENSORS,
    MANIFEST,
    PARTITION_TARGET,
    FileDigests,
    Manifest,
    Partition,
    TensorEntry,
)
from sllmfs.store.stfiles import FilePlan

BLOCK = 8 << 20  # copy unit; a multiple of CHUNK_SIZE keeps window hashing simple
_ZEROS = bytes(BLOCK)
_ZEROS16 = memoryview(bytes(16))

Progress = Callable[[int], None]


def _is_zero(data: memoryview) -> bool:
    # first bytes decide almost always; numpy scans the rest at memory speed
    return data[:16] == _ZEROS16[: len(data[:16])] and not np.frombuffer(data, np.uint8).any()


def _hex(h: Any) -> str:
    return f"{h.intdigest():016x}"


class _PartitionFile:
    def __init__(self, path: Path, index: int):
        self.path = path
        self.index = index
        self.fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o640)  # the store: owner and group
        self.size = 0  # bytes laid out so far (holes included)
        self.chunks: list[str] = []
        self._window = xxhash.xxh3_64()
        self._window_fill = 0

    def _hash_windows(self, data: memoryview) -> None:
        while len(data):
            take = min(len(data), CHUNK_SIZE - self._window_fill)
            self._window.update(data[:take])
            self._window_fill += take
            data = data[take:]
            if self._window_fill == CHUNK_SIZE:
                self.chunks.append(_hex(self._window))
                self._window = xxhash.xxh3_64()
                self._window_fill = 0

    def pad_to(self, offset: int) -> None:
        gap = offset - self.size
        while gap > 0:
            n = min(gap, BLOCK)
            self._hash_windows(memoryview(_ZEROS)[:n])
            gap -= n
        self.size = offset

    def write(self, data: memoryview) -> None:
        self._hash_windows(data)
        if not _is_zero(data):
            written = os.pwrite(self.fd, data, self.size)
            while written < len(data):
                written += os.pwrite(self.fd, data[written:], self.size + written)
        self.size += len(data)

    def close(self) -> Partition:
        if self._window_fill:
            self.chunks.append(_hex(self._window))
        try:
            os.ftruncate(self.fd, self.size)  # trailing holes still count
        finally:
            fd, self.fd = self.fd, -1  # closed once: abort() must not close a number reused meanwhile
            os.close(fd)
        return Partition(file=self.path.name, size=self.size, chunks=self.chunks)


class VariantWriter:
    """Lay out tensors into files under ``out_dir`` and write the manifest: ``files`` (tensors added in
    its order) writes them as those safetensors files, headers included; without it, aligned
    ``data_N.bin`` partitions of about ``partition_target`` bytes."""

    def __init__(self, out_dir: Path, variant: str, *, partition_target: int = PARTITION_TARGET,
                 progress: Progress | None = None, files: list[FilePlan] | None = None):
        self.out_dir = out_dir
        self.files = files
        self._planned = iter([(i, t) for i, f in enumerate(files) for t in f.tensors] if files is not None else [])
        out_dir.mkdir(parents=True, exist_ok=True)
        self.variant = variant
        self.partition_target = partition_target
        self.progress = progress or (lambda n: None)
        self.tensors: dict[str, TensorEntry] = {}
        self.aliases: dict[str, str] = {}
        self.metadata: dict[str, Any] = {}
        self.file_digests: FileDigests | None = None  # an adapter's own files (format.FileDigest), set before finish
        self._parts: list[_PartitionFile] = []
        self._done: list[Partition] = []
        self._buf = bytearray(BLOCK)

    def _place(self, nbytes: int) -> _PartitionFile:
        cur = self._parts[-1] if self._parts else None
        if cur is None or (cur.size > 0 and cur.size + nbytes > self.partition_target):
            if cur is not None:
                self._done.append(cur.close())
            cur = _PartitionFile(self.out_dir / f"data_{len(self._parts)}.bin", len(self._parts))
            self._parts.append(cur)
        cur.pad_to(-(-cur.size // ALIGNMENT) * ALIGNMENT)
        return cur

    def _open_file(self, i: int) -> _PartitionFile:
        """Planned file ``i`` (and every empty one before it), its header written."""
        assert self.files is not None
        while len(self._parts) <= i:
            if self._parts:
                self._done.append(self._parts[-1].close())
            plan = self.files[len(self._parts)]
            self._parts.append(_PartitionFile(self.out_dir / plan.name, len(self._parts)))
            self._parts[-1].write(memoryview(plan.header))
        return self._parts[-1]

    def _next_planned(self, name: str, nbytes: int) -> _PartitionFile:
        i, spec = next(self._planned, (-1, None))
        if spec is None or spec.name != name or spec.nbytes != nbytes:  # the caller's bug, never the user's
            raise AssertionError(f"tensor {name!r} added out of the files' plan (expected {spec})")
        return self._open_file(i)
    def _begin(self, name: str, dtype: str, shape: list[int], nbytes: int) -> tuple[_PartitionFile, int]:
        if name in self.tensors or name in self.aliases:
            raise BadInput(f"tensor {name!r} appears twice in the checkpoint")
        dt = dtypes.by_code(dtype, f"tensor {name!r}")
        if dtypes.nbytes(dt, shape) != nbytes:
            raise BadInput(f"tensor {name!r}: shape {shape} of {dtype} needs "
                           f"{dtypes.nbytes(dt, shape)} bytes, the checkpoint has {nbytes}")
        part = self._place(nbytes) if self.files is None else self._next_planned(name, nbytes)
        return part, part.size

    def add_from_file(self, name: str, dtype: str, shape: list[int],
                      ranges: list[tuple[int, int, int]], where: str = "") -> None:
        """Copy tensor ``name`` from ``(fd, offset, nbytes)`` ranges of open source files."""
        nbytes = sum(r[2] for r in ranges)
        part, start = self._begin(name, dtype, shape, nbytes)
        h = xxhash.xxh3_64()
        view = memoryview(self._buf)
        for fd, pos, left in ranges:
            while left:
                n = os.preadv(fd, [view[: min(left, BLOCK)]], pos)
                if n <= 0:
                    raise BadInput(f"{where or 'source file'} ends inside tensor {name!r}; "
                                   "the checkpoint is truncated")
                h.update(view[:n])
                part.write(view[:n])
                self.progress(n)
                left -= n
                pos += n
        self.tensors[name] = TensorEntry(dtype, list(shape), part.index, start, nbytes, _hex(h))

    def add_bytes(self, name: str, dtype: str, shape: list[int], data: memoryview) -> None:
        """Store an in-memory buffer (C-contiguous bytes) as tensor ``name``."""
        data = data.cast("B")
        part, start = self._begin(name, dtype, shape, len(data))
        h = xxhash.xxh3_64()
        for i in range(0, len(data), BLOCK):
            block = data[i : i + BLOCK]
            h.update(block)
            part.write(block)
            self.progress(len(block))
        self.tensors[name] = TensorEntry(dtype, list(shape), part.index, start, len(data), _hex(h))

    def add_alias(self, name: str, target: str) -> None:
        """``name`` shares ``target``'s bytes (tied weights): stored once (aligned layout only: in a
        safetensors file a tied name is a tensor of its own)."""
        assert self.files is None, "the safetensors layout stores tied names as tensors"
        if name in self.tensors or name in self.aliases:
            raise BadInput(f"tensor {name!r} appears twice in the checkpoint")
        self.aliases[name] = self.aliases.get(target, target)

    def finish(self) -> Manifest:
        if self.files is not None:
            if next(self._planned, None) is not None:
                raise AssertionError("the files' plan has tensors that were never added")
            self._open_file(len(self.files) - 1)  # a plan's files all exist, headers at least
        if self._parts:
            self._done.append(self._parts[-1].close())
            self._parts = []
        m = Manifest(variant=self.variant, tensors=self.tensors, partitions=self._done,
                     aliases=self.aliases, metadata=self.metadata, file_digests=self.file_digests)
        if self.files is not None:
            m.alignment, m.layout = 1, LAYOUT_SAFETENSORS
        else:
            m.layout = LAYOUT_ALIGNED
        m.validate(str(self.out_dir))
        (self.out_dir / MANIFEST).write_text(m.to_json())
        os.chmod(self.out_dir / MANIFEST, 0o640)
        return m

    def abort(self) -> None:
        for p in self._parts:
            if p.fd < 0:
                continue  # closed by close() (its error, e.g. a full disk, is the one the caller sees)
            try:
                os.close(p.fd)
            except OSError:
                pass
