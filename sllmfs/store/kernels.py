"""Kernel caches in the store: what an engine compiles on its first start, served to the next one.

Layout::

    <root>/kernels/<key>/manifest.json          every file: path, size, checksum (xxh3_64), mtime, mode
    <root>/kernels/<key>/<kind>/...             triton, tvm-ffi, flashinfer, inductor, vllm: the cache's own tree

The key (``kernel_key.py``) names what makes the files valid (GPU model, driver, CUDA, torch, triton,
the framework and its kernel libraries). The caches are content-addressed inside (their file names
carry hashes of source and options), so the union of two starts' files is valid for both: a publish
merges, never replaces what another node added. An entry is rebuilt under ``tmp/`` and swapped in
with one ``renameat2(RENAME_EXCHANGE)``, so a reader sees the old or the new entry, whole.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import stat
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import xxhash

from sllmfs.core.config import env_str, parse_size
from sllmfs.core.errors import BadInput, Corrupt, NotFound
from sllmfs.store.format import MANIFEST, open_regular, read_json
from sllmfs.store.kernel_key import KernelKey
from sllmfs.store.store import Store, exchange, fsync_dir, fsync_tree

KINDS = ("triton", "tvm-ffi", "flashinfer", "inductor", "vllm")  # vllm: VLLM_CACHE_ROOT (its torch.compile cache)
FORMAT = "sllmfs-kernels"
VERSION = 1
MAX_ENV = "SLLMFS_KERNEL_CACHE_MAX"
DEFAULT_MAX = 2 << 30
_KEY = re.compile(r"^[a-z0-9][a-z0-9._-]{0,127}$")
_BUF = 1 << 20
log = logging.getLogger("sllmfs.store.kernels")


# -- entries ---------------------------------------------------------------------------------


@dataclass
class KernelFile:
    path: str  # "<kind>/<relative path in that cache>"
    size: int
    checksum: str
    mtime_ns: int  # kept: build tools (ninja) compare the files' times with each other
    mode: int = 0o644


@dataclass
class KernelEntry:
    key: str
    files: list[KernelFile]
    created: float
    updated: float
    facts: dict[str, Any] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)


def check_key(key: str) -> str:
    if not _KEY.match(key) or ".." in key:
        raise BadInput(f"bad kernel cache key {key!r}: lowercase letters, digits and . _ - only "
                       "(see `sllmfs kernels ls`)")
    return key


def check_path(rel: Any) -> str:
    """A file's place inside an entry: relative, under a known kind, no '..', '.', empty part or NUL."""
    parts = rel.split("/") if isinstance(rel, str) else []
    if len(parts) < 2 or parts[0] not in KINDS or "\0" in rel or \
            any(p in ("", ".", "..") or len(p.encode()) > 255 for p in parts):
        raise BadInput(f"kernel cache path {rel!r} is not a relative path under one of {', '.join(KINDS)}")
    return rel


def max_entry_bytes() -> int:
    return parse_size(env_str(MAX_ENV) or DEFAULT_MAX, MAX_ENV)


def entry_dir(store: Store, key: str) -> Path:
    return store.layout.kernels_dir / check_key(key)


def load_entry(store: Store, key: str) -> KernelEntry:
    path = entry_dir(store, key)
    try:
        raw = read_json(path / MANIFEST, below=store.root)
    except FileNotFoundError:
        raise NotFound(f"no kernel cache {key!r} in the store at {store.root} (see `sllmfs kernels ls`)") from None
    return _parse(raw, key, path / MANIFEST)


def manifest_bytes(entry: KernelEntry) -> bytes:
    """An entry's manifest as the store (and the origin's copy of it) holds it; parse_entry reads it."""
    return json.dumps({"format": FORMAT, "version": VERSION, "key": entry.key, "facts": entry.facts,
                       "created": entry.created, "updated": entry.updated,
                       "files": [asdict(f) for f in entry.files]}, indent=1).encode()


def parse_entry(raw: Any, key: str, where: Path | str) -> KernelEntry:
    """A kernel cache manifest (the store's, or the origin's copy of one) as an entry; Corrupt if not."""
    return _parse(raw, key, where)


def _parse(raw: Any, key: str, where: Path | str) -> KernelEntry:
    bad = Corrupt(f"kernel cache {key!r}: {where} is not a kernel cache manifest; "
                  f"run `sllmfs kernels rm {key}` (the next start compiles and stores it again)")
    if not isinstance(raw, dict) or raw.get("format") != FORMAT or raw.get("version") != VERSION or \
            raw.get("key") != key or not isinstance(raw.get("files"), list):
        raise bad
    try:
        files = [KernelFile(check_path(f["path"]), int(f["size"]), str(f["checksum"]), int(f["mtime_ns"]),
                            int(f.get("mode", 0o644)) & 0o755) for f in raw["files"]]
        return KernelEntry(key, files, float(raw["created"]), float(raw["updated"]), dict(raw.get("facts", {})))
    except (KeyError, TypeError, ValueError, BadInput):
        raise bad from None


def recorded(store: Store, key: str) -> dict[str, tuple[int, int]]:
    """The entry's files as :func:`scan` reports them once restored (restore keeps sizes and times);
    empty when there is no entry or it is damaged."""
    try:
        return {f.path: (f.size, f.mtime_ns) for f in load_entry(store, key).files}
    except (NotFound, Corrupt):
        return {}


def entries(store: Store) -> tuple[list[KernelEntry], list[tuple[str, str]]]:
    """Every good entry, and each other directory under kernels/ as (name, one line why)."""
    good: list[KernelEntry] = []
    bad: list[tuple[str, str]] = []
    try:
        names = sorted(os.listdir(store.layout.kernels_dir))
    except FileNotFoundError:
        return good, bad
    for name in names:
        try:
            good.append(load_entry(store, check_key(name)))
        except (BadInput, Corrupt, NotFound, OSError) as e:
            bad.append((name, str(e)))
    return good, bad


def remove(store: Store, key: str) -> None:
    """Drop an entry (a damaged one too): moved into a work dir at once, its bytes freed after."""
    path = entry_dir(store, key)
    with _locked(store, key, wait_s=0.0), store.staging() as work:
        try:
            os.rename(path, work / "old")
        except FileNotFoundError:
            raise NotFound(f"no kernel cache {key!r} in the store at {store.root} (see `sllmfs kernels ls`)") from None
        fsync_dir(path.parent)


# -- restore ---------------------------------------------------------------------------------


Dirs = Path | Mapping[str, Path]


def _kind_dirs(dirs: Dirs) -> dict[str, Path]:
    """Where each kind lives: a Path means ``<path>/<kind>``; a mapping names some kinds' folders."""
    if isinstance(dirs, Mapping):
        return {k: Path(v) for k, v in dirs.items() if k in KINDS}
    return {k: Path(dirs) / k for k in KINDS}


def restore(store: Store, key: str, dirs: Dirs, *, stop: Callable[[], bool] = lambda: False) -> int:
    """Copy the entry's verified files into ``dirs`` (new files only, nothing overwritten); returns how
    many were restored. A file that fails its checksum, size or type is skipped with a warning:
    the engine compiles that kernel again rather than load wrong bytes. ``stop``: asked before each
    file (a start that exits does not wait for the rest). Files come in path order, so in Triton's and
    vLLM's layouts the data files come before the index files that name them."""
    try:
        entry = load_entry(store, key)
    except NotFound:
        return 0
    except Corrupt as e:  # the next publish replaces it
        log.warning("sllmfs: %s", e)
        return 0
    src = entry_dir(store, key)
    targets = _kind_dirs(dirs)
    done = 0
    for f in entry.files:
        if stop():
            break
        kind, rel = f.path.split("/", 1)
        if kind not in targets or os.path.lexists(targets[kind] / rel):
            continue  # not asked for, or there already (a later start on this node): the engine's own file wins
        try:
            _restore_file(src, f, targets[kind] / rel, store.root)
            done += 1
        except FileExistsError:
            pass  # the engine's own file wins
        except (Corrupt, OSError) as e:
            log.warning("sllmfs: kernel cache %r: %s not restored (%s); the engine compiles it again", key, f.path, e)
    return done


def _restore_file(src: Path, f: KernelFile, dest: Path, root: Path) -> None:
    fd = open_regular(src / f.path, below=root)  # no symlink followed anywhere under the store root
    with os.fdopen(fd, "rb") as inp:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.sllmfs-{os.getpid()}")
        h = xxhash.xxh3_64()
        size = 0
        try:
            with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, f.mode | 0o600), "wb") as out:
                while chunk := inp.read(_BUF):
                    h.update(chunk)
                    size += len(chunk)
                    out.write(chunk)
            if size != f.size or h.hexdigest() != f.checksum:
                raise Corrupt(f"checksum or size mismatch ({size} bytes, {f.size} recorded)")
            os.utime(tmp, ns=(f.mtime_ns, f.mtime_ns))
            os.link(tmp, dest)  # fails if the file is already there: never overwrite what an engine wrote
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


# -- publish ---------------------------------------------------------------------------------


def skipped(rel: str) -> bool:
    """Whether a publish leaves this file out (a lock, a half-written temp file): never worth fetching."""
    return _skip(rel)


def _skip(rel: str) -> bool:
    """Locks and half-written files the caches make while they compile (triton: tmp.pid_*)."""
    name = rel.rsplit("/", 1)[-1]
    restoring = name.startswith(".") and ".sllmfs-" in name  # another start's restore, mid-copy
    return restoring or name.endswith(".lock") or any(p.startswith("tmp.") for p in rel.split("/"))


def scan(dirs: Dirs) -> dict[str, tuple[int, int]]:
    """Every regular file under the kind folders: entry path -> (size, mtime_ns). Symlinks are not
    followed; files that vanish while we look are left out."""
    found: dict[str, tuple[int, int]] = {}
    for kind, top in _kind_dirs(dirs).items():
        for dirpath, _dirs, files in os.walk(top):  # os.walk follows no directory symlink
            for name in files:
                full = os.path.join(dirpath, name)
                rel = f"{kind}/{os.path.relpath(full, top)}"
                if _skip(rel):
                    continue
                try:
                    st = os.lstat(full)
                except OSError:
                    continue
                if stat.S_ISREG(st.st_mode):
                    found[rel] = (st.st_size, st.st_mtime_ns)
    return found


def publish(store: Store, key: KernelKey | str, dirs: Dirs, *, wait_s: float = 30.0,
            settle_s: float = 0.0, facts: dict[str, Any] | None = None) -> KernelEntry:
    """Merge the files under ``dirs`` into the entry ``key`` (the union; a path in both keeps the new
    bytes) and swap the result in atomically. Unchanged files are hard links to the entry's own.
    ``settle_s``: files changed more recently are left for a later publish (a compile killed at
    exit may have left one half-written, whole-looking). ``facts``: what a key given by name stands
    for (an entry pulled from the origin)."""
    name = key.name if isinstance(key, KernelKey) else check_key(key)
    facts = asdict(key) if isinstance(key, KernelKey) else (facts or {})
    limit = max_entry_bytes()
    dest = entry_dir(store, name)
    with _locked(store, name, wait_s=wait_s), store.staging() as work:
        try:
            old: KernelEntry | None = load_entry(store, name)
        except (NotFound, Corrupt):
            old = None  # a damaged entry is replaced by what this start has
        staged = work / "entry"
        staged.mkdir()
        files: dict[str, KernelFile] = {}
        if old is not None:
            for f in old.files:
                if _link_old(dest, staged, f, store.root):
                    files[f.path] = f
        tops = _kind_dirs(dirs)
        total = sum(f.size for f in files.values())
        for rel, (size, mtime_ns) in sorted(scan(dirs).items()):
            have = files.get(rel)
            if have is not None and (have.size, have.mtime_ns) == (size, mtime_ns):
                continue  # restored from this entry (restore keeps the times) and untouched since
            kind, sub = rel.split("/", 1)
            got = _copy_new(tops[kind] / sub, staged / rel, settle_s)
            if got is None:
                continue
            total += got[0] - (files[rel].size if rel in files else 0)
            files[rel] = KernelFile(rel, *got)
            if total > limit:
                raise BadInput(f"kernel cache {name!r} would hold {total} bytes, over the {limit} allowed "
                               f"({MAX_ENV}); run `sllmfs kernels rm {name}` or raise {MAX_ENV}")
        now = time.time()
        entry = KernelEntry(name, sorted(files.values(), key=lambda f: f.path),
                            old.created if old else now, now, facts or (old.facts if old else {}))
        (staged / MANIFEST).write_bytes(manifest_bytes(entry))
        fsync_tree(staged)
        dest.parent.mkdir(exist_ok=True)
        if os.path.lexists(dest):
            exchange(staged, dest)  # the old entry lands in our work dir and goes with it
        else:
            os.rename(staged, dest)
        fsync_dir(dest.parent)
    return entry


def _link_old(dest: Path, staged: Path, f: KernelFile, root: Path) -> bool:
    """Carry one file of the current entry over (a hard link, reached through no symlink); a damaged
    one is dropped, and this start's copy (if any) replaces it."""
    target = staged / f.path
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = open_regular(dest / f.path, below=root)
    except (Corrupt, OSError):
        return False
    try:
        if os.fstat(fd).st_size != f.size:
            return False
        try:  # checked above to be reached through no symlink
            os.link(dest / f.path, target, follow_symlinks=False)
        except OSError:  # no hard links here (or too many): a copy
            with open(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, f.mode | 0o600), "wb") as out:
                shutil.copyfileobj(os.fdopen(os.dup(fd), "rb"), out, _BUF)
            os.utime(target, ns=(f.mtime_ns, f.mtime_ns))
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def _copy_new(src: Path, target: Path, settle_s: float = 0.0) -> tuple[int, str, int, int] | None:
    """Copy one cache file into the staged entry (over a linked old copy: that one may be damaged),
    hashing it; None when it vanished, is no regular file or changed while we read it (the engine
    still writing it: the next publish takes it)."""
    try:
        fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".new.{target.name}")
    with os.fdopen(fd, "rb") as inp:
        before = os.fstat(fd)
        if not stat.S_ISREG(before.st_mode) or time.time_ns() - before.st_mtime_ns < settle_s * 1e9:
            return None
        mode = before.st_mode & 0o755 | 0o600
        h = xxhash.xxh3_64()
        size = 0
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode), "wb") as out:
            while chunk := inp.read(_BUF):
                h.update(chunk)
                size += len(chunk)
                out.write(chunk)
        after = os.fstat(fd)
    checksum = h.hexdigest()
    if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns) or size != after.st_size:
        tmp.unlink()
        return None
    os.replace(tmp, target)
    return size, checksum, before.st_mtime_ns, mode


class _locked:
    """``Store.writing`` for the entry, retried for up to ``wait_s`` (never blocks forever: an engine's
    exit waits on it)."""

    def __init__(self, store: Store, key: str, *, wait_s: float):
        self.store, self.name, self.wait_s = store, f"sllmfs-kernels/{key}", wait_s
        self._cm: Any = None

    def __enter__(self) -> None:
        deadline = time.monotonic() + self.wait_s
        while True:
            cm = self.store.writing(self.name)
            try:
                cm.__enter__()
            except BadInput:
                if time.monotonic() >= deadline:
                    raise BadInput(f"kernel cache {self.name.split('/', 1)[1]!r} is being written by another "
                                   "process right now; try again when it is done") from None
                time.sleep(0.05)
                continue
            self._cm = cm
            return

    def __exit__(self, *exc: Any) -> None:
        self._cm.__exit__(*exc)
