"""The mount's namespace: store models as directories, files as inodes.

Layout::

    <mount>/.sllmfs.json                       {"socket": ..., "storage_path": ..., "version": 1}
    <mount>/<org>/<name>/config.json ...        metadata files copied at save time
    <mount>/<org>/<name>/model.safetensors      synthesized from the ``hf`` variant
    <mount>/<org>/<name>/adapters/<a>/...       LoRA variants ``lora.<a>``

Namespace directories (the root, org folders, model folders) are recomputed
from the store on every lookup, so saves and removals show at once. A model's
contents are immutable for a given *stamp* (identity of model.json and of the
variants folder); every file inode is keyed by what backs it (a synthesized
file: its variant's ``Identity``), so a replaced model gets new inodes and the
kernel's page cache never serves stale bytes.

The table is pruned by the kernel's lookup-count contract: every reply that hands the kernel an
inode (a lookup, a readdirplus entry) counts one (``looked_up``), the kernel's FORGETs take them
back (``forget``), and an inode nobody counts goes once it is no longer the current version (the
files of a model's current stamp, the root and the marker stay: a lookup finds them again). Inode
numbers only grow, so a number the kernel may still hold is never given to something else.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sllmfs.core import names
from sllmfs.core.errors import SllmfsError
from sllmfs.core.names import ADAPTER_PREFIX, HF_VARIANT
from sllmfs.fuse.synth import SynthFile, layout
from sllmfs.protocol.marker import MARKER_NAME, marker_bytes
from sllmfs.store.format import MANIFEST, Manifest, load_manifest, open_dir
from sllmfs.store.layout import MODEL_JSON, model_variants, variant_files
from sllmfs.store.store import Identity, Store, variant_identity

log = logging.getLogger(__name__)

ROOT_INODE = 1

Stamp = tuple[int, ...]


@dataclass(eq=False)
class StoredVariant:
    """One committed version of a variant: what its synthesized files show, and nothing newer."""

    model: str
    key: str  # the variant key: hf, lora.<adapter>
    dir: Path
    identity: Identity  # store.variant_identity of the version the manifest was read from
    manifest: Manifest


@dataclass
class Node:
    inode: int
    is_dir: bool
    mtime_ns: int = 0
    size: int = 0
    # what backs a file: exactly one of these
    data: bytes | None = None  # small generated content (marker, index JSON)
    path: Path | None = None  # a metadata file in the store
    synth: SynthFile | None = None  # a synthesized safetensors file
    stored: StoredVariant | None = None  # synth: the version whose bytes it shows
    # directories: fixed children, or a namespace prefix whose children come from the store
    children: dict[str, Node] | None = None
    prefix: tuple[str, ...] | None = None
    model_stamp: Stamp | None = None  # namespace dir that is also a model, as of this stamp
    key: tuple[Any, ...] = ()  # what it shows (Tree._node): the same key, the same inode while it is held

    @property
    def dynamic(self) -> bool:
        return self.prefix is not None

    @property
    def mode(self) -> int:
        return (stat.S_IFDIR | 0o555) if self.is_dir else (stat.S_IFREG | 0o444)


def _stat_key(st: os.stat_result) -> Stamp:
    return (st.st_dev, st.st_ino, st.st_mtime_ns)


class Tree:
    def __init__(self, store: Store, socket_path: str, visible: Callable[[str], bool] | None = None):
        self.store = store
        self.socket_path = socket_path
        self.visible = visible  # None: every model; else only those it admits (--registration-required)
        self._inodes: dict[tuple[Any, ...], int] = {}
        self._nodes: dict[int, Node] = {}
        self._lookups: dict[int, int] = {}  # inode -> the kernel's lookup count (absent: zero)
        self._pinned: set[int] = set()  # current versions: root, marker, the files of each model's current stamp
        self._next = ROOT_INODE
        self._content: dict[str, tuple[Stamp, dict[str, Node]]] = {}  # model -> (stamp, its files)
        self.started_ns = time.time_ns()
        self.root = self._node(("ns", ()), is_dir=True, prefix=(), mtime_ns=self.started_ns)
        # the store path lets SGLang's loader write its per-rank state back beside the model
        marker = marker_bytes(socket_path, str(store.root))
        self.marker = self._node(("marker",), is_dir=False, data=marker, size=len(marker), mtime_ns=self.started_ns)
        self._pinned |= {self.root.inode, self.marker.inode}

    # -- inode table -----------------------------------------------------------

    def _node(self, key: tuple[Any, ...], **kw: Any) -> Node:
        """The node for ``key``; the same key always gets the same inode while mounted."""
        ino = self._inodes.get(key)
        if ino is None:
            ino = self._inodes[key] = self._next
            self._next += 1
        node = self._nodes.get(ino)
        if node is None:
            node = self._nodes[ino] = Node(ino, key=key, **kw)
        return node

    def get(self, inode: int) -> Node | None:
        return self._nodes.get(inode)

    @property
    def inode_count(self) -> int:
        return len(self._nodes)

    def looked_up(self, node: Node) -> None:
        """The kernel was handed ``node``'s inode (a lookup or readdirplus reply): one more reference.
        A node swept meanwhile (a listing's snapshot outlives a sweep) comes back under its own number."""
        self._nodes.setdefault(node.inode, node)
        if node.key:  # and the next lookup of that name answers the number the kernel holds
            self._inodes.setdefault(node.key, node.inode)
        self._lookups[node.inode] = self._lookups.get(node.inode, 0) + 1

    def forget(self, inode: int, nlookup: int) -> None:
        """The kernel dropped ``nlookup`` references (FORGET, BATCH_FORGET, pyfuse3's ``forget``)."""
        left = self._lookups.get(inode, 0) - nlookup
        if left > 0:
            self._lookups[inode] = left
            return
        self._lookups.pop(inode, None)
        self._prune(inode)

    def sweep(self) -> None:
        """Drop every node the kernel does not hold and that is not current (e.g. those a listing made
        and no lookup followed; they would never see a FORGET)."""
        for ino in [i for i in self._nodes if i not in self._lookups and i not in self._pinned]:
            self._drop(ino)

    def _prune(self, inode: int) -> None:
        if inode not in self._lookups and inode not in self._pinned and inode in self._nodes:
            self._drop(inode)

    def _drop(self, inode: int) -> None:
        key = self._nodes.pop(inode).key
        if self._inodes.get(key) == inode:
            del self._inodes[key]

    def _set_content(self, name: str, content: tuple[Stamp, dict[str, Node]] | None) -> None:
        """A model's current files (None: gone): the new ones stay, the old ones go once the kernel forgets them."""
        old = self._content.pop(name, None)
        before = _inodes_in(old[1]) if old else set()
        after = _inodes_in(content[1]) if content else set()
        if content is not None:
            self._content[name] = content
        self._pinned -= before - after
        self._pinned |= after
        for ino in before - after:
            self._prune(ino)

    # -- namespace -------------------------------------------------------------

    def _names(self) -> list[tuple[str, ...]]:
        """Name parts of every entry under models/ (one listing, no stats)."""
        try:
            entries = os.listdir(self.store.models_dir)
        except OSError as e:
            log.warning("cannot list %s: %s", self.store.models_dir, e.strerror)
            return []
        out = []
        for d in entries:
            name = names.model_name_from_dirname(d)
            try:
                names.check_model_name(name)
            except SllmfsError:
                continue  # tmp leftovers, stray files: not models
            if self.visible is not None and not self.visible(name):
                continue
            out.append(tuple(name.split("/")))
        return out

    def _stamp(self, parts: tuple[str, ...]) -> Stamp | None:
        """Identity of a stored model's current contents, or None when it is not (or no longer) there."""
        path = self.store.model_path("/".join(parts))
        try:
            mj = os.stat(path / MODEL_JSON)
        except OSError:
            return None
        try:
            vmt = os.stat(model_variants(path)).st_mtime_ns
        except OSError:
            vmt = 0
        return (*_stat_key(mj), vmt)

    def scan(self) -> dict[tuple[str, ...], Stamp]:
        """Every model in the store (name parts -> stamp), read afresh."""
        out = {}
        for parts in self._names():
            stamp = self._stamp(parts)
            if stamp is not None:
                out[parts] = stamp
        return out

    def child(self, node: Node, name: str) -> Node | None:
        """One entry of a directory; in a namespace folder this costs one listing and a few stats."""
        if node.children is not None:
            return node.children.get(name)
        assert node.prefix is not None
        prefix = node.prefix
        if not prefix and name == MARKER_NAME:
            return self.marker
        if node.model_stamp is not None and self._stamp(prefix) == node.model_stamp:
            found = self._model_files("/".join(prefix), node.model_stamp).get(name)
            if found is not None:
                return found  # files win over sub-models, as in children()
        sub = (*prefix, name)
        depth = len(sub)
        stored = self._names()
        stamp = self._stamp(sub) if sub in stored else None
        cached = self._content.get("/".join(sub))
        if cached is not None and cached[0] != stamp:  # replaced or removed: its old files are no longer current
            self._set_content("/".join(sub), None)
        if stamp is None and not any(len(p) > depth and p[:depth] == sub and self._stamp(p) for p in stored):
            return None
        return self._namespace(sub, stamp)

    def children(self, node: Node) -> dict[str, Node]:
        if node.children is not None:
            return node.children
        assert node.prefix is not None
        prefix = node.prefix
        models = self.scan()
        for gone in [n for n in self._content if tuple(n.split("/")) not in models]:
            self._set_content(gone, None)  # removed models: drop their parsed manifests
        out: dict[str, Node] = {}
        depth = len(prefix)
        for parts in models:
            if len(parts) > depth and parts[:depth] == prefix:
                sub = parts[: depth + 1]
                out[sub[-1]] = self._namespace(sub, models.get(sub))
        if node.model_stamp is not None and models.get(prefix) == node.model_stamp:
            out.update(self._model_files("/".join(prefix), node.model_stamp))  # files win over sub-models
        if not prefix:
            out[MARKER_NAME] = self.marker
        return out

    def namespace(self, prefix: tuple[str, ...]) -> Node:
        """A folder for models not (yet) in the store, e.g. ``org`` of an origin's ``org/m``."""
        return self._namespace(prefix, None)

    def _namespace(self, prefix: tuple[str, ...], stamp: Stamp | None) -> Node:
        mtime = stamp[2] if stamp else self.started_ns
        return self._node(("ns", prefix, stamp), is_dir=True, prefix=prefix, model_stamp=stamp, mtime_ns=mtime)

    def current(self, node: Node) -> bool:
        """Whether a metadata file's node still shows what the store holds now (a handle on an old
        version's inode, e.g. a working directory inside a replaced model, must not read the new
        bytes through it). Other nodes: True (a synthesized file's open checks its own version)."""
        kind, *rest = node.key or ("",)
        if kind != "file":
            return True
        if len(rest) == 3:  # a model's file: (name, model.json's stamp, rel)
            stamp = self._stamp(tuple(rest[0].split("/")))
            return stamp is not None and stamp[:3] == rest[1]
        name, variant, ident, _rel = rest  # an adapter's own file: that variant's identity
        return bool(variant_identity(model_variants(self.store.model_path(name)) / variant) == ident)

    # -- one model's files -----------------------------------------------------

    def _model_files(self, name: str, stamp: Stamp) -> dict[str, Node]:
        cached = self._content.get(name)
        if cached and cached[0] == stamp:
            return cached[1]
        try:
            files = self._build_model(name, stamp)
        except (SllmfsError, OSError, KeyError, TypeError, ValueError) as e:  # a damaged model hides, others stay
            log.warning("model %s is hidden from the mount: %s", name, e)  # once per stamp: the result is kept
            files = {}
        self._set_content(name, (stamp, files))
        return files

    def _build_model(self, name: str, stamp: Stamp) -> dict[str, Node]:
        info = self.store.get(name)
        mtime = int(info.created * 1e9)
        out: dict[str, Node] = {}
        for rel in info.files:  # plain names of regular files: Store.get checked them
            path = info.files_dir / rel
            out[rel] = self._node(("file", name, stamp[:3], rel), is_dir=False, path=path,
                                  size=os.lstat(path).st_size, mtime_ns=mtime)
        if HF_VARIANT in info.variants:
            out.update(self._variant_files(name, info.variant_dir(HF_VARIANT), HF_VARIANT, "model", mtime))
        adapters: dict[str, Node] = {}
        for key in info.variants:
            if not key.startswith(ADAPTER_PREFIX):
                continue
            vdir = info.variant_dir(key)
            afiles = self._adapter_meta(name, key, vdir, mtime)
            afiles.update(self._variant_files(name, vdir, key, "adapter_model", mtime))
            adapter = key[len(ADAPTER_PREFIX):]
            adapters[adapter] = self._node(("adir", name, key, _identity(vdir)),
                                           is_dir=True, children=afiles, mtime_ns=mtime)
        if adapters:
            out["adapters"] = self._node(("adirs", name, stamp), is_dir=True, children=adapters, mtime_ns=mtime)
        return out

    def _variant_files(self, name: str, vdir: Path, variant: str, stem: str, mtime: int) -> dict[str, Node]:
        stored = _load_variant(name, variant, vdir, self.store.models_dir)
        vkey = stored.identity
        lay = layout(stored.manifest, stem=stem)
        out: dict[str, Node] = {}
        for f in lay.files:
            out[f.name] = self._node(("synth", name, variant, vkey, f.name), is_dir=False, synth=f, size=f.size,
                                     stored=stored, mtime_ns=mtime)
        if lay.index is not None:
            out[lay.index_name] = self._node(("index", name, variant, vkey), is_dir=False, data=lay.index,
                                             size=len(lay.index), mtime_ns=mtime)
        return out

    def _adapter_meta(self, name: str, variant: str, vdir: Path, mtime: int) -> dict[str, Node]:
        out: dict[str, Node] = {}
        try:
            entries = sorted(os.scandir(variant_files(vdir)), key=lambda e: e.name)
        except FileNotFoundError:
            return out
        vkey = _identity(vdir)
        for e in entries:
            if e.is_file(follow_symlinks=False) and not e.name.startswith("."):
                out[e.name] = self._node(("file", name, variant, vkey, e.name), is_dir=False, path=Path(e.path),
                                         size=e.stat(follow_symlinks=False).st_size, mtime_ns=mtime)
        return out


def _inodes_in(files: dict[str, Node]) -> set[int]:
    """The inodes of a model's files, those inside its adapters folders included."""
    out = set()
    for node in files.values():
        out.add(node.inode)
        if node.children is not None:
            out |= _inodes_in(node.children)
    return out


def _identity(vdir: Path) -> Identity:
    ident = variant_identity(vdir)
    if ident is None:
        raise FileNotFoundError(errno.ENOENT, "no committed variant", str(vdir / MANIFEST))
    return ident


def _load_variant(model: str, key: str, vdir: Path, below: Path) -> StoredVariant:
    """The version committed at ``vdir``: identity and manifest both read through one directory
    fd (a commit puts a whole new directory in place, so the pair always match), reached through
    no symlink under ``below`` (the store's models/)."""
    dfd = open_dir(vdir, below=below)
    try:
        ident = variant_identity(vdir, dir_fd=dfd)
        if ident is None:
            raise FileNotFoundError(errno.ENOENT, "no committed variant", str(vdir / MANIFEST))
        return StoredVariant(model, key, vdir, ident, load_manifest(vdir, dir_fd=dfd))
    finally:
        os.close(dfd)
