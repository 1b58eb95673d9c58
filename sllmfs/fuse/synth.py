"""Safetensors files synthesized from a stored variant, without copying a byte.

A stored variant keeps tensors aligned in large partitions; a reader of the
FUSE view expects ordinary safetensors files. Each synthesized file is an
8-byte header length, a JSON header padded with spaces to 8 bytes, then the
tensor bytes back to back. We describe it as a sorted list of extents, each
backed either by header bytes or by a range of one partition, so a read at
any offset resolves with a bisect. Pure code: no I/O, no FUSE.
"""

from __future__ import annotations

import bisect
import json
import struct
from dataclasses import dataclass, field

from sllmfs.store.format import Manifest

SHARD_LIMIT = 5 * 10**9  # transformers' default max_shard_size ("5GB")


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


def _header_bytes(entries: dict[str, object]) -> bytes:
    raw = json.dumps(entries, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 8)  # data starts 8-aligned, as safetensors writes it
    return struct.pack("<Q", len(raw)) + raw


def _build_file(name: str, manifest: Manifest, tensor_names: list[str], metadata: dict[str, str] | None) -> SynthFile:
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = metadata
    pos = 0
    for t in tensor_names:
        e = manifest.entry(t)
        header[t] = {"dtype": e.dtype, "shape": e.shape, "data_offsets": [pos, pos + e.nbytes]}
        pos += e.nbytes
    head = _header_bytes(header)
    extents = [Extent(0, len(head), -1, 0)]
    pos = len(head)
    for t in tensor_names:
        e = manifest.entry(t)
        if e.nbytes:
            extents.append(Extent(pos, e.nbytes, e.partition, e.offset))
            pos += e.nbytes
    return SynthFile(name, pos, head, extents, list(tensor_names))


def _metadata(manifest: Manifest) -> dict[str, str] | None:
    meta = manifest.metadata.get("safetensors_metadata")
    if not isinstance(meta, dict) or not meta:
        return None
    return {str(k): str(v) for k, v in meta.items()}  # safetensors allows string values only


def layout(manifest: Manifest, *, stem: str = "model", shard_limit: int = SHARD_LIMIT) -> Layout:
    """The safetensors files (and index) that present ``manifest`` as an HF checkpoint."""
    order = manifest.names()
    sizes = [manifest.entry(n).nbytes for n in order]
    total = sum(sizes)
    meta = _metadata(manifest)
    index_name = f"{stem}.safetensors.index.json"
    if total <= shard_limit:
        return Layout([_build_file(f"{stem}.safetensors", manifest, order, meta)], index_name, None)
    groups: list[list[str]] = [[]]
    filled = 0
    for name, n in zip(order, sizes, strict=True):
        if groups[-1] and filled + n > shard_limit:
            groups.append([])
            filled = 0
        groups[-1].append(name)
        filled += n
    count = len(groups)
    files = [_build_file(f"{stem}-{i + 1:05d}-of-{count:05d}.safetensors", manifest, g, meta)
             for i, g in enumerate(groups)]
    weight_map = {t: f.name for f in files for t in f.tensors}
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    return Layout(files, index_name, json.dumps(index, indent=2).encode() + b"\n")
