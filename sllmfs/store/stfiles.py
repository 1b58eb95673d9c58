"""A variant as Hugging Face safetensors files: which file holds which tensor, and each file's header.

One contract, two users: ``sllmfs save`` lays a variant's partitions out as these files byte for
byte (the manifest's ``layout: "safetensors"``: the store's data files *are* the checkpoint, so the
memory tier's copy of one can back the mount's file with no copy), and the mount shows a variant
saved in the older aligned layout as the same files, synthesized from its partitions (fuse/synth.py).
A file is the 8-byte little-endian header length, the JSON header padded with spaces to 8 bytes, then
the tensors back to back in the order given: what the safetensors library reads.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

SHARD_LIMIT = 5 * 10**9  # transformers' default max_shard_size ("5GB")
SUFFIX = ".safetensors"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: list[int]
    nbytes: int


@dataclass(frozen=True)
class FilePlan:
    name: str
    header: bytes  # length prefix + padded JSON: the file's first bytes
    tensors: list[TensorSpec]  # in file order, back to back after the header

    @property
    def size(self) -> int:
        return len(self.header) + sum(t.nbytes for t in self.tensors)


def header_metadata(meta: Any) -> dict[str, str] | None:
    """A safetensors ``__metadata__`` from a source's (string values only, as the format allows)."""
    if not isinstance(meta, dict) or not meta:
        return None
    return {str(k): str(v) for k, v in meta.items()}


def header_bytes(tensors: Sequence[TensorSpec], metadata: dict[str, str] | None) -> bytes:
    entries: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    pos = 0
    for t in tensors:
        entries[t.name] = {"dtype": t.dtype, "shape": t.shape, "data_offsets": [pos, pos + t.nbytes]}
        pos += t.nbytes
    raw = json.dumps(entries, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 8)  # data starts 8-aligned, as safetensors writes it
    return struct.pack("<Q", len(raw)) + raw


def plan(tensors: Sequence[TensorSpec], metadata: dict[str, str] | None, *, stem: str = "model",
         shard_limit: int = SHARD_LIMIT) -> list[FilePlan]:
    """The files, in order: one ``<stem>.safetensors`` when the tensors fit ``shard_limit``, else
    ``<stem>-0000i-of-0000n.safetensors`` shards filled in order up to it (a larger tensor alone)."""
    groups: list[list[TensorSpec]] = [[]]
    filled = 0
    for t in tensors:
        if groups[-1] and filled + t.nbytes > shard_limit:
            groups.append([])
            filled = 0
        groups[-1].append(t)
        filled += t.nbytes
    if len(groups) == 1:
        return [FilePlan(stem + SUFFIX, header_bytes(groups[0], metadata), groups[0])]
    n = len(groups)
    return [FilePlan(f"{stem}-{i + 1:05d}-of-{n:05d}{SUFFIX}", header_bytes(g, metadata), g)
            for i, g in enumerate(groups)]


def index_name(stem: str) -> str:
    return f"{stem}{SUFFIX}.index.json"


def index_bytes(weight_map: dict[str, str], total_size: int) -> bytes:
    """``<stem>.safetensors.index.json`` of a sharded checkpoint: tensor name -> its file."""
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    return json.dumps(index, indent=2).encode() + b"\n"
