"""The safetensors files a stored variant shows in the FUSE view, without copying a byte.

A variant saved in the safetensors layout is its files: each is one partition, whole. One saved in
the aligned layout (4 KiB-aligned tensors in large partitions) is shown as the same files
(store/stfiles.py) synthesized from it. Either is a sorted list of extents, each backed by header
bytes or by a range of one partition, so a read at any offset resolves with a bisect. Pure code: no
I/O, no FUSE.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from sllmfs.store.format import Manifest
from sllmfs.store.stfiles import SHARD_LIMIT, FilePlan, TensorSpec, header_metadata, index_bytes, index_name, plan


@dataclass(frozen=True)
class Extent:
    offset: int  # in the synthesized file
    length: int
    partition: int  # -1: the bytes come from `header`
    source_offset: int  # in the partition, or in the header bytes


@dataclass(frozen=True)
class Piece:
    """A part of one read: header bytes, or a range of a partition."""

    partition: int  # -1 for header bytes
    source_offset: int
    length: int


@dataclass
class SynthFile:
    name: str
    size: int
    header: bytes  # length prefix + padded JSON
    extents: list[Extent]
    tensors: list[str] = field(default_factory=list)
    _starts: list[int] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        self._starts = [e.offset for e in self.extents]

    def resolve(self, offset: int, size: int) -> list[Piece]:
        """The pieces that make up bytes [offset, offset+size), clipped to the file."""
        end = min(offset + size, self.size)
        out: list[Piece] = []
        i = max(bisect.bisect_right(self._starts, offset) - 1, 0)
        pos = offset
        while pos < end and i < len(self.extents):
            e = self.extents[i]
            if e.offset + e.length > pos:
                skip = pos - e.offset
                n = min(e.length - skip, end - pos)
                prev = out[-1] if out else None
                if prev and prev.partition == e.partition >= 0 and \
                        prev.source_offset + prev.length == e.source_offset + skip:
                    # neighbours contiguous in the partition: one pread, not two
                    out[-1] = Piece(prev.partition, prev.source_offset, prev.length + n)
                else:
                    out.append(Piece(e.partition, e.source_offset + skip, n))
                pos += n
            i += 1
        return out


@dataclass
class Layout:
    files: list[SynthFile]
    index_name: str
    index: bytes | None  # <stem>.safetensors.index.json, only when sharded


def layout(manifest: Manifest, *, stem: str = "model", shard_limit: int = SHARD_LIMIT) -> Layout:
    """The safetensors files (and index) that present ``manifest`` as an HF checkpoint: its partitions
    whole where it is stored as those files, else synthesized from its aligned partitions."""
    names = manifest.names()
    total = sum(manifest.entry(n).nbytes for n in names)
    if manifest.as_files:
        files = [SynthFile(p.file, p.size, b"", [Extent(0, p.size, i, 0)] if p.size else [],
                           [n for n in names if manifest.entry(n).partition == i])
                 for i, p in enumerate(manifest.partitions)]
    else:
        specs = [TensorSpec(n, manifest.entry(n).dtype, manifest.entry(n).shape, manifest.entry(n).nbytes)
                 for n in names]
        meta = header_metadata(manifest.metadata.get("safetensors_metadata"))
        files = [_synthesized(f, manifest) for f in plan(specs, meta, stem=stem, shard_limit=shard_limit)]
    if len(files) == 1:
        return Layout(files, index_name(stem), None)
    weight_map = {t: f.name for f in files for t in f.tensors}
    return Layout(files, index_name(stem), index_bytes(weight_map, total))


def _synthesized(f: FilePlan, manifest: Manifest) -> SynthFile:
    """``f`` from an aligned variant: its header, then each tensor's range of its partition."""
    extents = [Extent(0, len(f.header), -1, 0)]
    pos = len(f.header)
    for t in f.tensors:
        e = manifest.entry(t.name)
        if e.nbytes:
            extents.append(Extent(pos, e.nbytes, e.partition, e.offset))
            pos += e.nbytes
    return SynthFile(f.name, pos, f.header, extents, [t.name for t in f.tensors])
