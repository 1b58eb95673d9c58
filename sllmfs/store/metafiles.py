"""A model's metadata files: recorded when saved, checked before any byte of them is served.

config.json, tokenizer.json, generation_config.json, ... are stored verbatim under ``files/``
(an adapter's adapter_config.json under ``variants/<key>/files/``). Saving records each one's size
and xxh3_64 (``FileDigest``): the model's in model.json, an adapter's in its manifest, both under
the field ``file_digests`` (format.FILE_DIGESTS). Every reader — the mount, the sidecar's ``files``
op, origin push, ``sllmfs verify`` — reads a file whole through ``read_meta_files``, which hands out
bytes only once they match what was recorded; what it returns is what gets served, so nothing read
later from the disk can slip past the check.

A model saved by an older sllmfs has no ``file_digests``: its files are served as before, unverified
(``MetaFiles.verified`` False), and the readers say so once per model with the fix
(``sllmfs verify --model M --repair`` records them as they are now; a save records them from the source).

model.json's schema lives here too (``model_record``, ``write_model_json``): one home for the record.
"""

from __future__ import annotations

import builtins
import json
import logging
import os
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sllmfs.core import names
from sllmfs.core.config import hint_flags
from sllmfs.core.errors import Corrupt, NotFound
from sllmfs.store.format import (
    FILE_DIGESTS,
    MAX_JSON,
    FileDigest,
    FileDigests,
    _Bad,
    _kind,
    corrupt,
    describe,
    file_digests_json,
    load_manifest,
    locate,
    open_dir,
    open_regular,
    parse_file_digests,
    plain_name,
    read_json,
)
from sllmfs.store.layout import FILES, MODEL_JSON, VARIANTS, model_files, model_variant, variant_files

MODEL_VERSION = 1  # model.json's "version" (the store's)
MAX_FILE = MAX_JSON  # an unrecorded (legacy) file past this is refused unread: a sparse 1 TiB file costs no read

log = logging.getLogger(__name__)
_warned: set[tuple[str, str | None]] = set()  # (model, variant): the unverified line is said once per process


@dataclass
class ModelRecord:
    """model.json, checked."""

    files: builtins.list[str]
    created: float
    source: dict[str, str]
    file_digests: FileDigests | None  # None: saved by an older sllmfs


def model_record(path: Path, name: str, meta: Any) -> ModelRecord:
    """model.json's fields, each checked (the mount turns ``created`` into 64-bit nanoseconds)."""
    if not isinstance(meta, dict):
        raise corrupt(path, "must hold a JSON object")
    files, created, source = meta.get("files", []), meta.get("created", 0), meta.get("source", {})
    if meta.get("name") != name:
        raise corrupt(path, f"field 'name' must be {name!r}, the model whose directory holds it")
    if not isinstance(files, builtins.list) or not all(plain_name(f) for f in files):
        raise corrupt(path, "field 'files' must list plain file names (no '/', no leading '.')")
    if type(created) not in (int, float) or not 0 <= created < 2**33:
        raise corrupt(path, "field 'created' must be a time in seconds since 1970")
    if not isinstance(source, dict) or not all(isinstance(v, str) for v in source.values()):
        raise corrupt(path, "field 'source' must map names to strings")
    try:
        digests = parse_file_digests(meta)
    except _Bad as e:
        raise corrupt(path, str(e)) from None
    if digests is not None and set(digests) != set(files):
        raise corrupt(path, f"field '{FILE_DIGESTS}' must name exactly the files of field 'files'")
    return ModelRecord(builtins.list(files), float(created), dict(source), digests)


def write_model_json(model_dir: Path, name: str, digests: FileDigests, source: dict[str, Any],
                     created: float | None = None) -> None:
    """A new model.json (a new file: one hard-linked from a live model is never written through)."""
    meta = {"format": "sllmfs-model", "version": MODEL_VERSION, "name": name, "files": sorted(digests),
            FILE_DIGESTS: file_digests_json(digests), "created": time.time() if created is None else created,
            "source": source}
    path = model_dir / MODEL_JSON
    path.unlink(missing_ok=True)
    path.write_text(json.dumps(meta, indent=1))
    os.chmod(path, 0o640)


def record_files(files_dir: Path, rels: builtins.list[str]) -> FileDigests:
    """What the files just written under ``files_dir`` are (read back from there, as readers will)."""
    out: FileDigests = {}
    for rel in rels:  # no symlink followed: a repair must not record a planted link's target
        with os.fdopen(open_regular(files_dir / rel, below=files_dir), "rb") as f:
            out[rel] = FileDigest.of(f.read())
    return out


@dataclass
class MetaFiles:
    """A model's (or an adapter's) metadata files as read and checked: serve ``data``, nothing else."""

    model: str
    variant: str | None  # None: the model's own files; else the adapter variant whose files these are
    data: dict[str, bytes]  # name -> bytes, each matching its recorded size and digest when ``verified``
    verified: bool  # False: saved by an older sllmfs, no digests recorded

    def write_to(self, dest: Path) -> Path:
        """The checked bytes as a folder (``dest``, created) for a tool that wants a config path: point
        it here, never at the store's files/, whose bytes may have changed since they were checked."""
        dest.mkdir(parents=True, exist_ok=True)
        for rel, data in self.data.items():
            (dest / rel).write_bytes(data)
        return dest


def read_meta_files(model_dir: Path, *, below: Path, variant: str | None = None,
                    only: str | None = None) -> MetaFiles:
    """Read the model's metadata files (``variant``: an adapter's own files; ``only``: just that one),
    whole, through one pinned model directory (a concurrent replace cannot pair one version's record
    with another's bytes), no symlink followed under ``below`` (the store's models/). Each must match
    its recorded size and xxh3_64, else Corrupt: one line naming model, file and the fix."""
    name = names.model_name_from_dirname(model_dir.name)
    with ExitStack() as fds:
        mfd = open_dir(model_dir, below=below)
        fds.callback(os.close, mfd)
        if variant is None:
            record = model_record(model_dir / MODEL_JSON, name, read_json(model_dir / MODEL_JSON, dir_fd=mfd))
            fdir, wanted, digests = model_files(model_dir), record.files, record.file_digests
            dfd = _open_files_dir(fdir, mfd, missing_ok=not wanted)
        else:
            vdir = model_variant(model_dir, variant)
            vfd = _open_variant(vdir, mfd, name)
            fds.callback(os.close, vfd)
            digests = load_manifest(vdir, dir_fd=vfd).file_digests
            fdir = variant_files(vdir)
            dfd = _open_files_dir(fdir, vfd, missing_ok=not digests)
        if dfd >= 0:
            fds.callback(os.close, dfd)
        if variant is not None:
            present = sorted(f for f in os.listdir(dfd) if plain_name(f)) if dfd >= 0 else []
            wanted = sorted(digests) if digests is not None else present
            extra = sorted(set(present) - set(wanted))
            if extra:  # planted or left over: not what the adapter was saved with
                raise damaged(fdir / extra[0], "is not a file this adapter was saved with")
        if only is not None:
            if only not in wanted:
                raise NotFound(f"model {name!r} has no metadata file {only!r}")
            wanted = [only]
        data = {rel: _read_checked(fdir / rel, dfd, None if digests is None else digests[rel]) for rel in wanted}
    return MetaFiles(name, variant, data, verified=digests is not None)


def meta_file_place(models_dir: Path, path: Path) -> tuple[Path, str | None, str]:
    """Where a metadata file's path lies: (model directory, adapter variant or None, file name)."""
    parts = Path(path).relative_to(models_dir).parts
    if len(parts) == 3 and parts[1] == FILES:
        return models_dir / parts[0], None, parts[2]
    if len(parts) == 5 and parts[1] == VARIANTS and parts[3] == FILES:
        return models_dir / parts[0], parts[2], parts[4]
    raise ValueError(f"{path} is not a metadata file of the store at {models_dir}")


def warn_unverified(meta: MetaFiles, store_root: Path) -> None:
    """One log line per model (and adapter) whose files carry no digests: served, but unverified."""
    if meta.verified or (meta.model, meta.variant) in _warned:
        return
    _warned.add((meta.model, meta.variant))
    log.warning("%s", unverified_line(meta.model, meta.variant, store_root))


def unverified_line(model: str, variant: str | None, store_root: Path) -> str:
    what = f"model {model!r}" + (f" [{variant}]" if variant else "")
    return (f"{what}: metadata files were saved by an older sllmfs without checksums and are served unverified; "
            f"run `sllmfs verify --model {model} --repair{hint_flags(storage_path=str(store_root))}` to record "
            "them as they are now (or save the model again)")


def damaged(path: Path, why: str) -> Corrupt:
    """One line for a metadata file that fails its record: model, file, what is wrong, the fix."""
    where, _ = describe(path)
    found = locate(path)
    if found is None:
        return Corrupt(f"{where} {why}; its bytes are not served: save the model again")
    root, model, _rest = found
    hint = hint_flags(storage_path=str(root))
    return Corrupt(f"{where} {why}; its bytes are not served: save the model again with --force or pull it again "
                   f"(`sllmfs verify --model {model}{hint}` lists every damaged file)")


def _open_variant(vdir: Path, model_fd: int, name: str) -> int:
    try:
        vsfd = open_dir(vdir.parent, dir_fd=model_fd)
    except FileNotFoundError:
        raise NotFound(f"model {name!r} has no variant {vdir.name!r}") from None
    try:
        return open_dir(vdir, dir_fd=vsfd)
    except FileNotFoundError:
        raise NotFound(f"model {name!r} has no variant {vdir.name!r}") from None
    finally:
        os.close(vsfd)


def _open_files_dir(fdir: Path, parent_fd: int, *, missing_ok: bool) -> int:
    try:
        return open_dir(fdir, dir_fd=parent_fd)
    except FileNotFoundError:
        if missing_ok:
            return -1
        raise damaged(fdir, "is missing") from None


def _read_checked(path: Path, dir_fd: int, want: FileDigest | None) -> bytes:
    """The whole file, once it matches ``want`` (None: unrecorded, read as it is)."""
    try:
        fd = open_regular(path, dir_fd=dir_fd)
    except FileNotFoundError:
        raise damaged(path, "is missing") from None
    except Corrupt:  # a symlink, FIFO, device or directory in its place
        kind = _kind(os.stat(path.name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
        raise damaged(path, f"is {kind}, not a regular file") from None
    with open(fd, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        limit = MAX_FILE if want is None else want.size
        if size > limit or (want is not None and size != want.size):  # refused unread
            raise damaged(path, f"is {size} bytes, but was {limit} bytes when saved" if want is not None
                          else f"is larger than {MAX_FILE} bytes")
        data = f.read(limit + 1)
    if want is None:
        if len(data) > limit:
            raise damaged(path, f"is larger than {MAX_FILE} bytes")
        return data
    if len(data) != want.size:  # changed while read
        raise damaged(path, f"is {len(data)} bytes, but was {want.size} bytes when saved")
    got = FileDigest.of(data).xxh3_64
    if got != want.xxh3_64:
        raise damaged(path, f"fails its xxh3_64 checksum (recorded {want.xxh3_64}, read {got})")
    return data
