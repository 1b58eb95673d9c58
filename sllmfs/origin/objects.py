"""A model as objects: what push uploads and pull fetches, and the index that says it is whole.

Every object is named by its path under the model's store directory (``rel``) and carries a size
and an xxh3 digest: of its bytes for small files, of its manifest's per-window digests for a data
partition (so push never re-reads a partition to name it, and pull checks each 4 MiB window as it
arrives, exactly as the store's fill does).
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sllmfs.core import names
from sllmfs.core.errors import Corrupt
from sllmfs.store.format import MANIFEST, Manifest, Partition, digest, open_regular, plain_name
from sllmfs.store.layout import variant_files
from sllmfs.store.metafiles import MetaFiles, warn_unverified
from sllmfs.store.store import MODEL_JSON, ModelInfo

INDEX_FORMAT = "sllmfs-origin"
INDEX_VERSION = 1
_VARIANT_REL = re.compile(r"^variants/([^/]+)/(?:files/)?([^/]+)$")


@dataclass(frozen=True)
class Obj:
    rel: str  # path under the model's directory: model.json, files/x, variants/<key>/data_0.bin
    size: int
    digest: str
    partition: bool = False  # a data partition: digest is over its window digests
    windows: tuple[str, ...] = ()  # a local partition's per-window checksums: push checks what it sends


def partition_digest(p: Partition) -> str:
    """A partition's identity without reading it: the digest of its manifest's window digests."""
    return digest(",".join(p.chunks).encode())


def read_small(path: Path, below: Path) -> bytes:
    """A metadata file, manifest or model.json of the store, opened as the store's readers open them."""
    with open(open_regular(path, below=below), "rb") as f:
        return f.read()


def local_objects(info: ModelInfo) -> tuple[list[Obj], dict[str, bytes]]:
    """Every object of a stored model and the bytes of its small ones (hashed from these very bytes,
    so what is uploaded is what the index names)."""
    below = info.path.parent
    small: dict[str, bytes] = {}
    objs: list[Obj] = []

    def add_small(rel: str) -> None:
        small[rel] = read_small(info.path / rel, below)
        objs.append(Obj(rel, len(small[rel]), digest(small[rel])))

    def add_meta(prefix: str, meta: MetaFiles) -> None:
        """Metadata files as checked against their recorded digests: a damaged one stops the push here,
        before anything is uploaded (the origin never gets bytes the store would not serve)."""
        warn_unverified(meta, below.parent)
        for f, data in sorted(meta.data.items()):
            small[prefix + f] = data
            objs.append(Obj(prefix + f, len(data), digest(data)))

    add_meta("files/", info.meta_files())
    for key in info.variants:
        manifest = info.manifest(key)
        vdir = info.variant_dir(key)
        for p in manifest.partitions:
            rel = f"variants/{key}/{p.file}"
            try:
                st = os.stat(vdir / p.file, follow_symlinks=False)
            except FileNotFoundError:
                raise Corrupt(f"model {info.name!r} [{key}]: {p.file} is missing; run `sllmfs verify "
                              f"--model {info.name}` and save it again before pushing") from None
            if st.st_size != p.size:
                raise Corrupt(f"model {info.name!r} [{key}]: {p.file} is {st.st_size} bytes, its manifest says "
                              f"{p.size}; run `sllmfs verify --model {info.name}` and save it again")
            objs.append(Obj(rel, p.size, partition_digest(p), partition=True, windows=tuple(p.chunks)))
        if os.path.lexists(variant_files(vdir)) or manifest.file_digests:  # an adapter's own files
            add_meta(f"variants/{key}/files/", info.meta_files(key))
        add_small(f"variants/{key}/{MANIFEST}")
    add_small(MODEL_JSON)
    return objs, small


def make_index(model: str, objs: list[Obj]) -> bytes:
    return json.dumps({
        "format": INDEX_FORMAT, "version": INDEX_VERSION, "model": model, "pushed": time.time(),
        "objects": {o.rel: {"size": o.size, "digest": o.digest, "partition": o.partition} for o in objs},
    }, indent=1).encode()


def parse_index(raw: Any, model: str, where: str) -> list[Obj]:
    """The index's objects, each field checked: a tampered index is one line, never a path outside the store."""
    def bad(why: str) -> Corrupt:
        return Corrupt(f"origin index {where} {why}; push the model again (`sllmfs push --model {model} ...`)")

    if not isinstance(raw, dict) or raw.get("format") != INDEX_FORMAT:
        raise bad("is not an sllmfs origin index")
    if raw.get("version") != INDEX_VERSION:
        raise bad(f"has version {raw.get('version')!r}; this sllmfs reads version {INDEX_VERSION}: upgrade sllmfs")
    if raw.get("model") != model:
        raise bad(f"names model {raw.get('model')!r}, not {model!r}")
    entries = raw.get("objects")
    if not isinstance(entries, dict) or MODEL_JSON not in entries:
        raise bad(f"lists no objects (or no {MODEL_JSON})")
    out = []
    for rel, e in entries.items():
        if not (isinstance(rel, str) and valid_rel(rel)):
            raise bad(f"names object {str(rel)[:60]!r}, which is not a file sllmfs stores")
        if not (isinstance(e, dict) and type(e.get("size")) is int and 0 <= e["size"] < 1 << 62
                and isinstance(e.get("digest"), str) and re.fullmatch(r"[0-9a-f]{16}", e["digest"])
                and isinstance(e.get("partition"), bool)):
            raise bad(f"has a bad entry for {rel!r} (want size, digest, partition)")
        out.append(Obj(rel, e["size"], e["digest"], e["partition"]))
    return out


def valid_rel(rel: str) -> bool:
    """model.json, files/<name>, variants/<key>/<name>, variants/<key>/files/<name>: nothing else."""
    if rel == MODEL_JSON:
        return True
    if rel.startswith("files/"):
        return plain_name(rel[len("files/"):])
    m = _VARIANT_REL.match(rel)
    if not m or not plain_name(m.group(2)):
        return False
    try:
        names.check_variant(m.group(1))
    except Exception:  # noqa: BLE001 - BadInput: not a key sllmfs writes
        return False
    return True


def check_manifest_matches(manifest: Manifest, key: str, by_rel: dict[str, Obj], where: str) -> None:
    """Each partition the manifest names is in the index with the size and window digests it says."""
    for p in manifest.partitions:
        o = by_rel.get(f"variants/{key}/{p.file}")
        if o is None or not o.partition or o.size != p.size or o.digest != partition_digest(p):
            raise Corrupt(f"origin copy {where} is inconsistent: variant {key!r} partition {p.file} does not "
                          "match the index; push the model again")
