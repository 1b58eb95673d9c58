"""The variant manifest: what each stored tensor is and where its bytes lie.

Spec: docs/format.md. One JSON file per variant; every manifest carries
``format_version`` and a reader refuses versions it does not know.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sllmfs import dtypes
from sllmfs.errors import Corrupt, FormatVersionError

FORMAT_VERSION = 1
ALIGNMENT = 4096  # every tensor starts on a 4 KiB boundary: O_DIRECT and page mapping work
CHUNK_SIZE = 4 << 20  # partitions are checksummed in 4 MiB windows (fill verification)
HUGE_PAGE = 2 << 20  # the memory tier's hugetlb page; ALIGNMENT-sized pages otherwise
PARTITION_TARGET = 4 << 30  # start a new data file past this size (parallel reads, sane files)
CHECKSUM = "xxh3_64"
MANIFEST = "manifest.json"


@dataclass
class TensorEntry:
    dtype: str
    shape: list[int]
    partition: int
    offset: int
    nbytes: int
    checksum: str  # xxh3_64 of the tensor's bytes, 16 hex digits


@dataclass
class Partition:
    file: str
    size: int
    chunks: list[str]  # xxh3_64 of each CHUNK_SIZE window of the file (the last may be short)


@dataclass
class Manifest:
    variant: str
    tensors: dict[str, TensorEntry]  # in file order
    partitions: list[Partition]
    aliases: dict[str, str] = field(default_factory=dict)  # tied name -> stored name
    metadata: dict[str, Any] = field(default_factory=dict)  # source info, safetensors __metadata__
    alignment: int = ALIGNMENT
    chunk_size: int = CHUNK_SIZE
    checksum: str = CHECKSUM
    format_version: int = FORMAT_VERSION

    @property
    def total_bytes(self) -> int:
        return sum(p.size for p in self.partitions)

    def entry(self, name: str) -> TensorEntry:
        return self.tensors[self.aliases.get(name, name)]

    def names(self) -> list[str]:
        """Every tensor name a reader sees, aliases included, in file order."""
        by_target: dict[str, list[str]] = {}
        for alias, target in self.aliases.items():
            by_target.setdefault(target, []).append(alias)
        out: list[str] = []
        for name in self.tensors:
            out.append(name)
            out.extend(by_target.get(name, []))
        return out

    def to_json(self) -> str:
        d = asdict(self)
        d = {"format": "sllmfs-variant", "format_version": d.pop("format_version"), **d}
        return json.dumps(d, separators=(",", ":"))

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str) -> Manifest:
        version = d.get("format_version")
        if d.get("format") != "sllmfs-variant" or not isinstance(version, int):
            raise Corrupt(f"{where} is not an sllmfs manifest; run `sllmfs rm` and save the model again")
        if version != FORMAT_VERSION:
            raise FormatVersionError(
                f"{where} has format version {version}; this sllmfs reads version "
                f"{FORMAT_VERSION}: upgrade sllmfs, or save the model again with this one"
            )
        try:
            tensors = {k: TensorEntry(**v) for k, v in d["tensors"].items()}
            parts = [Partition(**p) for p in d["partitions"]]
            m = cls(
                variant=d["variant"],
                tensors=tensors,
                partitions=parts,
                aliases=dict(d.get("aliases", {})),
                metadata=dict(d.get("metadata", {})),
                alignment=int(d["alignment"]),
                chunk_size=int(d["chunk_size"]),
                checksum=d["checksum"],
                format_version=version,
            )
        except (KeyError, TypeError, ValueError) as e:
            raise Corrupt(f"{where} is malformed ({e}); run `sllmfs rm` and save the model again") from None
        m.validate(where)
        return m

    def validate(self, where: str) -> None:
        """Reject manifests whose entries point outside their data (hostile or damaged)."""
        for name, t in self.tensors.items():
            dt = dtypes.by_code(t.dtype, where)
            ok = (
                0 <= t.partition < len(self.partitions)
                and t.offset >= 0
                and t.offset % self.alignment == 0
                and t.nbytes == dtypes.nbytes(dt, t.shape)
                and all(isinstance(s, int) and s >= 0 for s in t.shape)
                and t.offset + t.nbytes <= self.partitions[t.partition].size
            )
            if not ok:
                raise Corrupt(f"{where}: tensor {name!r} has an impossible place or size")
        for alias, target in self.aliases.items():
            if target not in self.tensors:
                raise Corrupt(f"{where}: alias {alias!r} points to missing tensor {target!r}")
        for p in self.partitions:
            if "/" in p.file or p.file.startswith("."):
                raise Corrupt(f"{where}: bad partition file name {p.file!r}")


def load_manifest(variant_dir: Path) -> Manifest:
    path = variant_dir / MANIFEST
    try:
        d = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise Corrupt(f"{path} is missing") from None
    except ValueError as e:
        raise Corrupt(f"{path} is not valid JSON ({e}); run `sllmfs rm` and save again") from None
    return Manifest.from_dict(d, str(path))
