"""Where things lie in a store: every path of the on-disk layout, spelled once.

    <root>/store.json                        store format marker
    <root>/models/<quoted name>/model.json    name, metadata files, creation time
    <root>/models/<quoted name>/files/...     config, tokenizer, ... copied verbatim
    <root>/models/<quoted name>/variants/<key>/manifest.json + data_N.bin (+ files/ for adapters)
    <root>/tmp/<id>/                         work in progress, locked by its writer
    <root>/locks/<quoted name>.lock           held by the one command writing that model
    <root>/locks/tmp.gate                     shared by writers creating work dirs, exclusive for cleanup
    <root>/used/<quoted name>                 its mtime: the model's last use (the SSD tier's LRU)
    <root>/registered.json                   the sidecar's --registration-required list
    <root>/kernels/<key>/                     an engine's kernel caches for one GPU + software stack
    <root>/pulls/<quoted name>/               a pull from the origin in progress (the next one resumes it)

Paths only: nothing here touches the disk. A model directory's parts (``model_files``,
``model_variant``) are functions of the directory, so a model being built under tmp/ is
laid out by the same spelling as a committed one.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from sllmfs.core import names

STORE_MARKER = "store.json"
MODELS = "models"
TMP = "tmp"
LOCKS = "locks"
USED = "used"
KERNELS = "kernels"
PULLS = "pulls"
MODEL_JSON = "model.json"
FILES = "files"  # a model's metadata files; an adapter variant's own files
VARIANTS = "variants"
TMP_GATE = "tmp.gate"
REGISTERED = "registered.json"


def model_files(model_dir: Path) -> Path:
    return model_dir / FILES


def model_variants(model_dir: Path) -> Path:
    return model_dir / VARIANTS


def model_variant(model_dir: Path, key: str) -> Path:
    return model_dir / VARIANTS / names.check_variant(key)


def variant_files(variant_dir: Path) -> Path:
    """An adapter variant's own metadata files (its config), beside its weights."""
    return variant_dir / FILES


class Layout:
    """The paths of one store."""

    def __init__(self, root: Path):
        self.root = root
        self.marker = root / STORE_MARKER
        self.models_dir = root / MODELS
        self.tmp_dir = root / TMP
        self.locks_dir = root / LOCKS
        self.used_dir = root / USED
        self.tmp_gate = self.locks_dir / TMP_GATE
        self.registered = root / REGISTERED
        self.kernels_dir = root / KERNELS
        self.pulls_dir = root / PULLS

    def holds_store(self) -> bool:
        """Whether a store is there (its marker and models dir): what opening one without creating it asks."""
        return self.marker.is_file() and self.models_dir.is_dir()

    def model_dir(self, name: str) -> Path:
        return self.models_dir / names.model_dirname(name)

    def model_json(self, name: str) -> Path:
        return self.model_dir(name) / MODEL_JSON

    def files_dir(self, name: str) -> Path:
        return model_files(self.model_dir(name))

    def variants_dir(self, name: str) -> Path:
        return model_variants(self.model_dir(name))

    def variant_dir(self, name: str, key: str) -> Path:
        return model_variant(self.model_dir(name), key)

    def used_mark(self, name: str) -> Path:
        return self.used_dir / names.model_dirname(name)

    def lock_file(self, name: str) -> Path:
        """The model's lock: its directory name, hashed where that plus '.lock' would pass the
        255-byte file name limit."""
        dirname = names.model_dirname(name)
        if len(os.fsencode(dirname)) > 240:
            dirname = "h-" + hashlib.sha256(os.fsencode(dirname)).hexdigest()
        return self.locks_dir / (dirname + ".lock")
