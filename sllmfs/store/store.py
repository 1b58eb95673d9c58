"""The SSD tier: converted models on disk, committed atomically.

Layout: sllmfs.store.layout (docs/format.md). Every change is built under ``tmp/`` and swapped into place in one step
(``renameat2(RENAME_EXCHANGE)``), so a reader never sees half a model and a crash
at any instant leaves the old or the new one, complete. A ``tmp/`` entry whose
writer died (its lock is free) is a leftover, removed by the next command that
writes to the store. Read-only commands change nothing.
"""

from __future__ import annotations

import builtins
import ctypes
import errno
import fcntl
import json
import os
import shutil
import stat
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sllmfs.core import names
from sllmfs.core.config import hint_flags, load_settings
from sllmfs.core.errors import BadInput, NotFound, SllmfsError
from sllmfs.store.format import (
    MANIFEST,
    FileDigests,
    Manifest,
    check_regular,
    corrupt,
    load_manifest,
    open_dir,
    open_regular,
    read_json,
)
from sllmfs.store.layout import (
    MODEL_JSON,
    STORE_MARKER,
    Layout,
    model_files,
    model_variant,
    model_variants,
    variant_files,
)
from sllmfs.store.metafiles import MetaFiles, model_record, read_meta_files
from sllmfs.store.reader import Identity, variant_identity  # Identity: the sidecar and mount key by it

STORE_VERSION = 1  # store.json's version
RECENT_NS = 2_000_000_000  # changed this recently: checked afresh by every listing (ctime may tick in whole seconds)


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
    file_digests: FileDigests | None = None  # the files' sizes and xxh3_64 as saved; None: an older sllmfs saved it

    @property
    def files_dir(self) -> Path:
        return model_files(self.path)

    def variant_dir(self, key: str) -> Path:
        return model_variant(self.path, key)

    def variant_files_dir(self, key: str) -> Path:
        """An adapter variant's own metadata files (its config), beside its weights."""
        return variant_files(self.variant_dir(key))

    def manifest(self, key: str) -> Manifest:
        d = self.variant_dir(key)
        try:  # every directory on the way a real one: a planted symlink is refused, not followed
            fd = open_dir(d, below=self.path.parent)
        except FileNotFoundError:
            raise NotFound(
                f"model {self.name!r} has no variant {key!r} (has: {', '.join(self.variants) or 'none'}); "
                f"run `sllmfs save --model {self.name} ...` to add it"
            ) from None
        try:
            return load_manifest(d, dir_fd=fd)
        finally:
            os.close(fd)

    def meta_files(self, variant: str | None = None) -> MetaFiles:
        """The model's metadata files (``variant``: an adapter's own), read whole and checked against their
        recorded digests (metafiles.read_meta_files): serve these bytes, never the files on disk."""
        return read_meta_files(self.path, below=self.path.parent, variant=variant)

    def file_path(self, rel: str) -> Path:
        """A metadata file's path, once it is known to be a regular file reached through no symlink."""
        if rel not in self.files:
            raise NotFound(f"model {self.name!r} has no file {rel!r}")
        path = self.files_dir / rel
        try:
            os.close(open_regular(path, below=self.path.parent))
        except FileNotFoundError:
            raise corrupt(path, "is missing") from None
        return path

    def bytes_on_disk(self) -> int:
        total = 0
        for dirpath, _dirs, files in os.walk(self.path):  # follows no symlink
            for f in files:
                try:
                    st = os.lstat(os.path.join(dirpath, f))
                except OSError:
                    continue  # removed meanwhile
                total += st.st_size if stat.S_ISREG(st.st_mode) else 0
        return total


class Store:
    def __init__(self, root: str | os.PathLike[str], *, create: bool = True, cleanup: bool = True):
        self.root = Path(root).expanduser().absolute()
        self.layout = Layout(self.root)
        self.models_dir = self.layout.models_dir
        self.tmp_dir = self.layout.tmp_dir
        self.locks_dir = self.layout.locks_dir
        self.used_dir = self.layout.used_dir
        marker = self.layout.marker
        if create:
            _refuse_foreign_dir(self.root)
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                # the marker first: a store being created by another command is never "a foreign dir"
                if not marker.exists():
                    _write_marker(marker)
                self.models_dir.mkdir(exist_ok=True)
                self.tmp_dir.mkdir(exist_ok=True)
                self.locks_dir.mkdir(exist_ok=True)
                _private(self.root)
            except OSError as e:
                raise BadInput(
                    f"cannot use storage path {self.root}: {e.strerror}; "
                    "pick a writable directory with --storage-path"
                ) from None
        elif not self.layout.holds_store():
            raise NotFound(f"no sllmfs store at {self.root}; check --storage-path (or $SLLMFS_STORAGE_PATH), "
                           "or run `sllmfs save` to create one there")
        # listing's verdict per model directory, as of its _dir_key: status and metrics list often
        self._listed: dict[str, tuple[tuple[int, ...] | None, ModelInfo | str]] = {}
        if cleanup:
            self.remove_leftovers()

    @property
    def hint(self) -> str:
        """Flags that make a suggested command act on this store when pasted."""
        return hint_flags(storage_path=str(self.root))

    # -- reading -------------------------------------------------------------

    def model_path(self, name: str) -> Path:
        return self.layout.model_dir(name)

    def variant_path(self, name: str, key: str) -> Path:
        """Where variant ``key`` of model ``name`` is committed (whether or not it is there)."""
        return self.layout.variant_dir(name, key)

    def identity(self, name: str, key: str) -> Identity | None:
        """The identity of variant ``key`` of model ``name`` as committed now (None: there is none)."""
        return variant_identity(self.variant_path(name, key))

    def has(self, name: str) -> bool:
        return self.layout.model_json(name).is_file()

    def get(self, name: str) -> ModelInfo:
        """A stored model, checked as every reader needs it: a valid model.json, and every directory
        and file it is read from a real one (a planted symlink, FIFO or device refuses the model)."""
        path = self.model_path(name)
        missing = NotFound(f"model {name!r} is not in the store at {self.root}; "
                           f"run `sllmfs save --model {name} --local-model-path <checkpoint>{self.hint}` first")
        try:
            fd = open_dir(path, below=self.models_dir)
        except FileNotFoundError:
            raise missing from None
        try:
            try:
                meta = read_json(path / MODEL_JSON, dir_fd=fd)
            except FileNotFoundError:
                raise missing from None
            record = model_record(path / MODEL_JSON, name, meta)
            _check_files(model_files(path), fd, record.files)
            variants = _check_variants(model_variants(path), fd)
        finally:
            os.close(fd)
        return ModelInfo(name=name, path=path, files=record.files, variants=variants, created=record.created,
                         source=record.source, file_digests=record.file_digests)

    def touch(self, name: str) -> None:
        """Record a use of ``name``, for the sidecar's SSD-tier LRU. Outside the model's folder:
        what the mount shows (and its inodes) must not change because a client loaded it."""
        mark = self.layout.used_mark(name)
        try:
            os.utime(mark)
        except FileNotFoundError:
            try:
                self.used_dir.mkdir(exist_ok=True)
                mark.touch()
            except OSError:
                pass
        except OSError:
            pass  # a read-only store: LRU order is only advice

    def last_used(self, name: str) -> float:
        for path in (self.layout.used_mark(name), self.layout.model_json(name)):
            try:
                return path.stat().st_mtime
            except OSError:
                continue
        return 0.0

    def list(self) -> list[ModelInfo]:
        """The good models; ``listing`` also names the entries that are not."""
        return self.listing()[0]

    def listing(self) -> tuple[builtins.list[ModelInfo], builtins.list[tuple[str, str]]]:
        """Every good model, and each other entry under models/ as (directory name, one line why):
        one bad entry never hides the others."""
        good: builtins.list[ModelInfo] = []
        bad: builtins.list[tuple[str, str]] = []
        entries = sorted(os.listdir(self.models_dir))
        for entry in entries:
            name = names.model_name_from_dirname(entry)
            try:
                spelled = names.model_dirname(name) == entry  # not another spelling of a valid name
            except BadInput:
                spelled = False
            if not spelled:
                # escaped: a newline would split the one line, undecodable bytes would not encode on the socket
                shown = entry if entry.isprintable() else repr(entry)[1:-1]
                bad.append((shown, f"{self.models_dir / shown} is not a model directory (its name does not decode "
                                   "to a valid model name); remove it by hand"))
                continue
            key = _dir_key(self.models_dir / entry)
            seen = self._listed.get(entry)
            if seen is None or seen[0] != key:  # new or changed since the last listing: check it again
                try:
                    seen = (key, self.get(name))
                except NotFound:
                    if not os.path.lexists(self.models_dir / entry):  # removed meanwhile
                        continue
                    seen = (key, f"{self.models_dir / entry} has no {MODEL_JSON}: not a model sllmfs saved; "
                                 "remove it by hand")
                except SllmfsError as e:
                    seen = (key, str(e))
                except OSError as e:  # EMFILE, EIO...: maybe gone next time, so not remembered
                    seen, key = (key, str(e)), None
                if key is not None:
                    self._listed[entry] = seen
            if isinstance(seen[1], ModelInfo):
                good.append(seen[1])
            else:
                bad.append((entry, seen[1]))
        for gone in set(self._listed) - set(entries):
            self._listed.pop(gone, None)
        return good, bad

    # -- writing -------------------------------------------------------------

    @contextmanager
    def writing(self, name: str, *, wait: bool = False) -> Iterator[None]:
        """Hold the right to change model ``name`` (save, replace, remove, add a variant).

        ``wait=False``: a second writer gets one clear line at once (concurrent saves of one name:
        one wins). ``wait=True``: queue behind it (framework ranks writing back their variants)."""
        self.locks_dir.mkdir(exist_ok=True)
        fd = _open_lock(self.layout.lock_file(name))
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                raise BadInput(f"model {name!r} is being written by another command (save, rm or a "
                               "write-back) right now; wait for it to finish and run this again") from None
            yield
        finally:
            os.close(fd)  # the lock file stays: unlinking it would let two writers hold two locks

    @contextmanager
    def _gate(self, mode: int) -> Iterator[None]:
        """Writers creating a work dir hold it shared, a cleanup exclusive: a cleanup never sees a
        work dir (or its lock file) in the instant before its writer locked it."""
        self.locks_dir.mkdir(exist_ok=True)
        fd = _open_lock(self.layout.tmp_gate)
        try:
            fcntl.flock(fd, mode)
            yield
        finally:
            os.close(fd)

    @contextmanager
    def staging(self) -> Iterator[Path]:
        """A private directory under tmp/, locked while we live, removed unless renamed away."""
        work = self.tmp_dir / uuid.uuid4().hex
        with self._gate(fcntl.LOCK_SH):
            lock = os.open(work.with_suffix(".lock"), os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
            fcntl.flock(lock, fcntl.LOCK_EX)
            work.mkdir()
        try:
            yield work
        finally:
            shutil.rmtree(work, ignore_errors=True)
            os.unlink(work.with_suffix(".lock"))
            os.close(lock)

    def commit_model(self, staged: Path, name: str, *, force: bool) -> None:
        """Publish a fully written model directory under its name, atomically (hold ``writing``)."""
        self._publish(staged, self.model_path(name), force=force,
                      exists=f"model {name!r} is already in the store")

    def commit_variant(self, staged: Path, name: str, key: str, *, force: bool) -> None:
        """Publish one variant directory into an existing model, atomically (hold ``writing``)."""
        dest = self.get(name).variant_dir(key)
        dest.parent.mkdir(exist_ok=True)
        fsync_dir(dest.parent.parent)  # variants/ itself must survive a crash with what it will hold
        self._publish(staged, dest, force=force, exists=f"model {name!r} already has variant {key!r}")

    def _publish(self, staged: Path, dest: Path, *, force: bool, exists: str) -> None:
        """fsync, then put ``staged`` in place in one step: a new name is a rename, a replacement an
        exchange (the old copy lands where ``staged`` was, inside the writer's locked work dir, and
        goes with it). A crash at any instant leaves the old or the new directory, complete."""
        fsync_tree(staged)
        if dest.exists():
            if not force:
                raise BadInput(f"{exists}; pass --force to replace it")
            exchange(staged, dest)
        else:
            try:
                os.rename(staged, dest)
            except OSError as e:
                if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
                raise BadInput(f"{exists} (saved meanwhile by another command); pass --force to replace it") from None
        fsync_dir(dest.parent)

    def remove(self, name: str, *, only_if: Callable[[], bool] | None = None) -> bool:
        """Remove a model, damaged ones included (whatever sits at its path goes, never followed).
        ``only_if`` is asked under the model's lock (no save can replace it meanwhile): False keeps
        the model and returns False (the disk budget's "is it still safe to delete")."""
        path = self.model_path(name)
        with self.writing(name), self.staging() as work:
            if only_if is not None and not only_if():
                return False
            try:  # checked under the lock: a concurrent rm or eviction may have taken it first
                os.rename(path, work / "old")  # gone from listings at once; bytes freed after (or by cleanup)
            except FileNotFoundError:
                raise NotFound(f"model {name!r} is not in the store at {self.root}") from None
            fsync_dir(path.parent)
            try:  # under the lock: a save of the name right after keeps the mark it makes
                self.layout.used_mark(name).unlink()
            except OSError:
                pass
        return True

    def remove_variant(self, name: str, key: str) -> None:
        """Drop one framework variant (e.g. a stale per-rank state); the hf variant is the model itself."""
        info = self.get(name)
        if key == names.HF_VARIANT:
            raise BadInput(f"variant {names.HF_VARIANT!r} is model {name!r} itself; remove the model with "
                           f"`sllmfs rm --model {name}{self.hint}`")
        if key not in info.variants:
            raise NotFound(f"model {name!r} has no variant {key!r} (has: {', '.join(info.variants)})")
        with self.writing(name), self.staging() as work:
            try:  # under the lock: another rm may have taken it since the check above
                os.rename(info.variant_dir(key), work / "old")
            except FileNotFoundError:
                raise NotFound(f"model {name!r} has no variant {key!r} any more (removed meanwhile)") from None
            fsync_dir(info.variant_dir(key).parent)

    def remove_leftovers(self) -> builtins.list[str]:
        """Delete tmp/ entries whose writer is gone (its lock is free)."""
        with self._gate(fcntl.LOCK_EX):
            return self._remove_leftovers()

    def _remove_leftovers(self) -> builtins.list[str]:
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
                except FileNotFoundError:
                    continue
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    os.unlink(lock_path)
                except (BlockingIOError, FileNotFoundError):
                    pass  # held: a writer between its lock and its mkdir
                finally:
                    os.close(fd)
        return removed


def open_store(storage_path: str | None = None, *, write: bool = False) -> Store:
    """The store for a command (``storage_path`` None: from the settings). Read-only commands
    (``write=False``) never create or tidy one: a mistyped path is an error, and a path that is
    not a store is left as it is."""
    path = load_settings(storage_path=storage_path).storage_path
    return Store(path) if write else Store(path, create=False, cleanup=False)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_libc = ctypes.CDLL(None, use_errno=True)


def exchange(a: Path, b: Path) -> None:
    """Swap two directory entries in one step (renameat2 RENAME_EXCHANGE, Linux >= 3.15)."""
    rc = _libc.renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc != 0:
        err = ctypes.get_errno()
        if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise BadInput(f"the filesystem under {b.parent} cannot swap directories atomically "
                           f"(renameat2 RENAME_EXCHANGE: {os.strerror(err)}); put the store on ext4, xfs, "
                           "btrfs or tmpfs") from None
        raise OSError(err, os.strerror(err), str(b))


def _open_lock(path: Path) -> int:
    """A lock file, opened read-only (flock needs no more), so a store shared by root's daemon and a
    user's commands never fails on a lock file the other made."""
    try:
        return os.open(path, os.O_CREAT | os.O_RDONLY | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise BadInput(f"cannot open lock file {path}: {e.strerror}; run the command as the user that owns the "
                       "store (or as root)") from None


def _private(root: Path) -> None:
    """Owner and group only (0750 or stricter), whoever made the directory and whatever the umask:
    raw weights are not for every local user (they read through the sidecar's socket or mount)."""
    mode = root.stat().st_mode & 0o777
    if mode & 0o007 or mode & 0o020:
        os.chmod(root, mode & 0o750)


def _write_marker(marker: Path) -> None:
    """Create store.json whole, in one rename: a reader never sees it empty or half written."""
    tmp = marker.with_name(f".{marker.name}.{os.getpid()}")
    tmp.write_text(json.dumps({"format": "sllmfs-store", "version": STORE_VERSION}))
    os.replace(tmp, marker)


def _refuse_foreign_dir(root: Path) -> None:
    """A store goes into a new or empty directory, or one that already is a store: pointing
    --storage-path at a checkpoint or a home folder must not scatter models/ and tmp/ into it."""
    try:
        entries = {p.name for p in root.iterdir()}
    except FileNotFoundError:
        return
    except OSError as e:
        raise BadInput(f"cannot use storage path {root}: {e.strerror}; pick another with --storage-path") from None
    entries = {e for e in entries if not e.startswith(f".{STORE_MARKER}.")}  # a marker being written
    if entries and STORE_MARKER not in entries:
        raise BadInput(f"storage path {root} is not empty and not an sllmfs store (no {STORE_MARKER}); "
                       "pass a new or empty directory with --storage-path")


def _check_files(files_dir: Path, model_fd: int, files: builtins.list[str]) -> None:
    """Metadata files are served as they are: regular files in a real files/ directory."""
    try:
        fd = open_dir(files_dir, dir_fd=model_fd)
    except FileNotFoundError:
        if files:
            raise corrupt(files_dir, "is missing") from None
        return
    try:
        for rel in files:
            check_regular(files_dir / rel, dir_fd=fd)
    finally:
        os.close(fd)


def _check_variants(variants_dir: Path, model_fd: int) -> builtins.list[str]:
    """The model's variant keys: each a real directory with a regular manifest.json (and, for adapters,
    regular files in its files/)."""
    try:
        fd = open_dir(variants_dir, dir_fd=model_fd)
    except FileNotFoundError:
        return []
    try:
        keys = sorted(os.listdir(fd))
        for key in keys:
            _check_variant(variants_dir / key, fd)
    finally:
        os.close(fd)
    return keys


def _check_variant(vdir: Path, variants_fd: int) -> None:
    try:
        names.check_variant(vdir.name)
    except BadInput:
        raise corrupt(vdir, "is not a variant sllmfs writes (bad key)") from None
    fd = open_dir(vdir, dir_fd=variants_fd)
    try:
        check_regular(vdir / MANIFEST, dir_fd=fd)
        try:
            files_fd = open_dir(variant_files(vdir), dir_fd=fd)
        except FileNotFoundError:
            return
        try:
            for rel in os.listdir(files_fd):
                check_regular(variant_files(vdir) / rel, dir_fd=files_fd)
        finally:
            os.close(files_fd)
    finally:
        os.close(fd)


def _dir_key(model_dir: Path) -> tuple[int, ...] | None:
    """What changes whenever anything ``Store.get`` checks changes: inode, mode and ctime (any write,
    rename in or out, chmod) of the model directory, model.json, files/, variants/ and each variant
    directory and its files/, none followed. None (never cached) when the directory cannot be read, or
    was changed in the last RECENT_NS: a ctime is a coarse clock tick, so a second change within the
    tick would leave the key as it was."""
    key: list[int] = []
    newest = 0
    try:
        paths = [model_dir, model_dir / MODEL_JSON, model_files(model_dir), model_variants(model_dir)]
        try:
            for e in os.scandir(model_variants(model_dir)):
                paths += [Path(e.path), variant_files(Path(e.path))]
        except (NotADirectoryError, FileNotFoundError):
            pass
        for path in paths:
            try:
                st = os.lstat(path)
            except (FileNotFoundError, NotADirectoryError):
                key += [0, 0, 0]
                continue
            key += [st.st_ino, st.st_mode, st.st_ctime_ns]
            newest = max(newest, st.st_ctime_ns)
    except OSError:
        return None
    return tuple(key) if time.time_ns() - newest > RECENT_NS else None
