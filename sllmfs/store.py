"""The SSD tier: converted models on disk, committed atomically.

Layout (docs/format.md)::

    <root>/store.json                        store format marker
    <root>/models/<quoted name>/model.json    name, metadata files, creation time
    <root>/models/<quoted name>/files/...     config, tokenizer, ... copied verbatim
    <root>/models/<quoted name>/variants/<key>/manifest.json + data_N.bin
    <root>/tmp/<id>/                         work in progress, locked by its writer

Every change is built under ``tmp/`` and renamed into place, so a reader never
sees half a model. A ``tmp/`` entry whose writer died (its lock is free) is a
leftover and is removed when any sllmfs command opens the store.
"""

from __future__ import annotations

import builtins
import fcntl
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sllmfs import names
from sllmfs.config import hint_flags
from sllmfs.errors import BadInput, Corrupt, NotFound
from sllmfs.format import MANIFEST, Manifest, load_manifest

STORE_MARKER = "store.json"
MODEL_JSON = "model.json"
STORE_VERSION = 1


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


def fsync_tree(root: Path) -> None:
    """Flush every file and directory under root (data before the rename that publishes it)."""
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            fd = os.open(os.path.join(dirpath, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class ModelInfo:
    name: str
    path: Path
    files: list[str]
    variants: list[str]
    created: float
    source: dict[str, Any]

    def variant_dir(self, key: str) -> Path:
        return self.path / "variants" / names.check_variant(key)

    def manifest(self, key: str) -> Manifest:
        d = self.variant_dir(key)
        if not d.is_dir():
            raise NotFound(
                f"model {self.name!r} has no variant {key!r} (has: {', '.join(self.variants) or 'none'}); "
                f"run `sllmfs save --model {self.name} ...` to add it"
            )
        return load_manifest(d)

    def file_path(self, rel: str) -> Path:
        if rel not in self.files:
            raise NotFound(f"model {self.name!r} has no file {rel!r}")
        return self.path / "files" / rel

    def bytes_on_disk(self) -> int:
        return sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())


class Store:
    def __init__(self, root: str | os.PathLike[str], *, create: bool = True, cleanup: bool = True):
        self.root = Path(root).expanduser().absolute()
        self.models_dir = self.root / "models"
        self.tmp_dir = self.root / "tmp"
        marker = self.root / STORE_MARKER
        if create:
            _refuse_foreign_dir(self.root)
            try:
                self.models_dir.mkdir(parents=True, exist_ok=True)
                self.tmp_dir.mkdir(exist_ok=True)
                if not marker.exists():
                    marker.write_text(json.dumps({"format": "sllmfs-store", "version": STORE_VERSION}))
            except OSError as e:
                raise BadInput(
                    f"cannot use storage path {self.root}: {e.strerror}; "
                    "pick a writable directory with --storage-path"
                ) from None
        elif not (marker.is_file() and self.models_dir.is_dir()):
            raise NotFound(f"no sllmfs store at {self.root}; check --storage-path (or $SLLMFS_STORAGE_PATH), "
                           "or run `sllmfs save` to create one there")
        if cleanup:
            self.remove_leftovers()

    @property
    def hint(self) -> str:
        """Flags that make a suggested command act on this store when pasted."""
        return hint_flags(storage_path=str(self.root))

    # -- reading -------------------------------------------------------------

    def model_path(self, name: str) -> Path:
        return self.models_dir / names.model_dirname(name)

    def has(self, name: str) -> bool:
        return (self.model_path(name) / MODEL_JSON).is_file()

    def get(self, name: str) -> ModelInfo:
        path = self.model_path(name)
        try:
            meta = json.loads((path / MODEL_JSON).read_bytes())
        except FileNotFoundError:
            raise NotFound(
                f"model {name!r} is not in the store at {self.root}; "
                f"run `sllmfs save --model {name} --local-model-path <checkpoint>{self.hint}` first"
            ) from None
        except ValueError as e:
            raise Corrupt(f"{path / MODEL_JSON} is not valid JSON ({e})") from None
        variants_dir = path / "variants"
        variants = sorted(p.name for p in variants_dir.iterdir()) if variants_dir.is_dir() else []
        return ModelInfo(
            name=meta["name"],
            path=path,
            files=list(meta.get("files", [])),
            variants=variants,
            created=float(meta.get("created", 0)),
            source=dict(meta.get("source", {})),
        )

    def touch(self, name: str) -> None:
        """Record a use of ``name`` (model.json's mtime), for the sidecar's SSD-tier LRU."""
        try:
            os.utime(self.model_path(name) / MODEL_JSON)
        except OSError:
            pass  # removed meanwhile, or a read-only store: LRU order is only advice

    def last_used(self, name: str) -> float:
        try:
            return (self.model_path(name) / MODEL_JSON).stat().st_mtime
        except OSError:
            return 0.0

    def list(self) -> list[ModelInfo]:
        out = []
        for d in sorted(self.models_dir.iterdir()):
            if (d / MODEL_JSON).is_file():
                out.append(self.get(names.model_name_from_dirname(d.name)))
        return out

    # -- writing -------------------------------------------------------------

    @contextmanager
    def staging(self) -> Iterator[Path]:
        """A private directory under tmp/, locked while we live, removed unless renamed away."""
        work = self.tmp_dir / uuid.uuid4().hex
        # lock before the directory exists, so a concurrent cleanup never takes it for a leftover
        lock = os.open(work.with_suffix(".lock"), os.O_CREAT | os.O_RDWR, 0o600)
        fcntl.flock(lock, fcntl.LOCK_EX)
        work.mkdir()
        try:
            yield work
        finally:
            shutil.rmtree(work, ignore_errors=True)
            os.unlink(work.with_suffix(".lock"))
            os.close(lock)

    def commit_model(self, staged: Path, name: str, *, force: bool) -> None:
        """Publish a fully written model directory under its name, atomically."""
        self._publish(staged, self.model_path(name), force=force,
                      exists=f"model {name!r} is already in the store")

    def commit_variant(self, staged: Path, name: str, key: str, *, force: bool) -> None:
        """Publish one variant directory into an existing model, atomically."""
        dest = self.get(name).variant_dir(key)
        dest.parent.mkdir(exist_ok=True)
        self._publish(staged, dest, force=force, exists=f"model {name!r} already has variant {key!r}")

    def _publish(self, staged: Path, dest: Path, *, force: bool, exists: str) -> None:
        """fsync, then rename into place; a replaced directory goes to tmp/ first and is deleted after."""
        fsync_tree(staged)
        old = None
        if dest.exists():
            if not force:
                raise BadInput(f"{exists}; pass --force to replace it")
            old = self.tmp_dir / (uuid.uuid4().hex + ".old")
            os.rename(dest, old)
        os.rename(staged, dest)
        fsync_dir(dest.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def remove(self, name: str) -> None:
        path = self.model_path(name)
        if not (path / MODEL_JSON).is_file():
            raise NotFound(f"model {name!r} is not in the store at {self.root}")
        trash = self.tmp_dir / (uuid.uuid4().hex + ".old")
        os.rename(path, trash)  # gone from listings at once; bytes freed after
        shutil.rmtree(trash, ignore_errors=True)

    def remove_variant(self, name: str, key: str) -> None:
        """Drop one framework variant (e.g. a stale per-rank state); the hf variant is the model itself."""
        info = self.get(name)
        if key == "hf":
            raise BadInput(f"variant 'hf' is model {name!r} itself; remove the model with "
                           f"`sllmfs rm --model {name}{self.hint}`")
        if key not in info.variants:
            raise NotFound(f"model {name!r} has no variant {key!r} (has: {', '.join(info.variants)})")
        trash = self.tmp_dir / (uuid.uuid4().hex + ".old")
        os.rename(info.variant_dir(key), trash)
        shutil.rmtree(trash, ignore_errors=True)

    def remove_leftovers(self) -> builtins.list[str]:
        """Delete tmp/ entries whose writer is gone (its lock is free)."""
        removed = []
        for entry in self.tmp_dir.iterdir():
            if entry.suffix == ".lock":
                continue
            if entry.suffix != ".old":
                lock_path = entry.with_suffix(".lock")
                try:
                    fd = os.open(lock_path, os.O_RDWR)
                except FileNotFoundError:
                    fd = -1
                if fd >= 0:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        os.close(fd)
                        continue  # a live save owns it
                    os.unlink(lock_path)
                    os.close(fd)
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry.name)
        # locks whose directory is gone
        for lock_path in self.tmp_dir.glob("*.lock"):
            if not lock_path.with_suffix("").exists():
                try:
                    fd = os.open(lock_path, os.O_RDWR)
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    os.unlink(lock_path)
                    os.close(fd)
                except (BlockingIOError, FileNotFoundError):
                    pass
        return removed


def _refuse_foreign_dir(root: Path) -> None:
    """A store goes into a new or empty directory, or one that already is a store: pointing
    --storage-path at a checkpoint or a home folder must not scatter models/ and tmp/ into it."""
    try:
        entries = {p.name for p in root.iterdir()}
    except FileNotFoundError:
        return
    except OSError as e:
        raise BadInput(f"cannot use storage path {root}: {e.strerror}; pick another with --storage-path") from None
    if entries and STORE_MARKER not in entries:
        raise BadInput(f"storage path {root} is not empty and not an sllmfs store (no {STORE_MARKER}); "
                       "pass a new or empty directory with --storage-path")


def write_model_json(model_dir: Path, name: str, files: list[str], source: dict[str, Any]) -> None:
    meta = {"format": "sllmfs-model", "version": STORE_VERSION, "name": name,
            "files": sorted(files), "created": time.time(), "source": source}
    (model_dir / MODEL_JSON).write_text(json.dumps(meta, indent=1))
