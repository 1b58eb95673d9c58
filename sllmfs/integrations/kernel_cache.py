"""An engine's kernel caches, served from the store and published back to it.

``activate()`` runs once per start, in the first process that loads an sllmfs plugin (before any
kernel is compiled): it points the engine's caches at the working directory
``$TMPDIR/sllmfs-kernels-<uid>/<key>`` (TRITON_CACHE_DIR, TVM_FFI_CACHE_DIR, FLASHINFER_WORKSPACE_BASE,
TORCHINDUCTOR_CACHE_DIR, and for vLLM VLLM_CACHE_ROOT; a variable the user set is left alone), marks the
environment (SLLMFS_KERNEL_CACHE_DIR) so the worker processes it starts inherit the directories instead
of activating again, and returns. A thread in that process restores the store's entry for this GPU and
software stack into the directory, then publishes new files back once the directory has been quiet for
SLLMFS_KERNEL_CACHE_QUIET seconds, and once more at exit. The restore runs beside the start (a new
node's 99 files: 59 ms on the H200s, where the plugin's whole call may take 0.1 s): the launcher does
not compile, and the processes that do wait for it, bounded by RESTORE_WAIT_S: a worker that loads the
plugin in ``activate()``, a child forked from the launcher in an at-fork hook (both through a locked
mark file, ``RestoreMark``). Past the bound a cache sees some files and not others: each file appears
whole (by link), in path order, so Triton's and vLLM's data files come before the index files that
name them, and a missing one is compiled again.

The working directory's path is the same on every start and every node: tvm-ffi and flashinfer
build with ninja from a build.ninja that names its sources by absolute path, so a cache restored
under another path would be rebuilt. Concurrent starts on a node share it, as they share
~/.cache by default; it stays after a start, a node-local copy the next start only tops up.

Off with SLLMFS_KERNEL_CACHE=0, or when there is no store. A store this process cannot write is
only read. Nothing here fails a start: an error is one warning line, and the engine keeps its own
default caches.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import os
import shutil
import stat
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from sllmfs.core.errors import BadInput

if TYPE_CHECKING:  # imported where a start serves caches (the store's, in the thread): the others read MARK
    from sllmfs.store.kernel_key import KernelKey
    from sllmfs.store.store import Store

SWITCH = "SLLMFS_KERNEL_CACHE"
MARK = "SLLMFS_KERNEL_CACHE_DIR"  # the working dir; "-" when this start decided not to serve caches
QUIET = "SLLMFS_KERNEL_CACHE_QUIET"
DEFAULT_QUIET = 10.0
# kind -> (the variable the engine reads, the cache's folder below the directory it names)
CACHE_VARS = {
    "triton": ("TRITON_CACHE_DIR", ""),
    "tvm-ffi": ("TVM_FFI_CACHE_DIR", ""),
    "flashinfer": ("FLASHINFER_WORKSPACE_BASE", ".cache/flashinfer"),  # flashinfer: <base>/.cache/flashinfer
    "inductor": ("TORCHINDUCTOR_CACHE_DIR", ""),
}
# and a framework's own: vLLM compiles into VLLM_CACHE_ROOT/torch_compile_cache/<hash>/, pointing inductor
# and Triton into it while it compiles, so for vLLM that root is where the kernels are
FRAMEWORK_CACHE_VARS = {"vllm": {"vllm": ("VLLM_CACHE_ROOT", "")}}


@dataclass
class Activation:
    key: KernelKey
    work: Path
    dirs: dict[str, Path]  # kind -> the folder the engine's cache writes into
    keeper: Keeper
    _lock_fd: int = field(default=-1, repr=False)

    def wait_restored(self, timeout: float | None = None) -> int:
        """How many files the restore brought, once it is over (it runs beside the start)."""
        self.keeper.restore_done.wait(timeout)
        return self.keeper.restored

    def close(self) -> None:
        """At exit, in the activating process only: a last publish. The working dir stays (see above)."""
        if self._lock_fd < 0:
            return  # closed already
        self.keeper.close()
        os.close(self._lock_fd)
        self._lock_fd = -1


def work_root() -> Path:
    return Path(tempfile.gettempdir()) / f"sllmfs-kernels-{os.getuid()}"


def activate(store: Store | None = None, *, framework: str = "sglang",
             key: KernelKey | None = None, engine_defaults: dict[str, str] | None = None) -> Activation | None:
    """Serve this start's kernel caches from the store (see the module's doc); None when not serving.
    ``engine_defaults``: values the engine itself put in those variables on import (SGLang >= 0.5.18
    sets them under its own cache dir); such a value is the engine's, not the user's, so it is replaced."""
    if mark := os.environ.get(MARK):
        if mark != "-":  # a process of a start that serves caches: its kernels come after the restore
            await_restore(Path(mark))
        return None  # a process of a start that decided (the only check its workers make)
    from sllmfs.core.config import env_flag

    if not env_flag(SWITCH, True):
        return None
    try:
        act = _activate(store, framework, key, engine_defaults or {})
    except Exception as e:  # any failure: the engine runs with its default caches
        print(f"sllmfs: warning: kernel caches not served from the store for this start: {e}", file=sys.stderr)
        act = None
    if act is None:
        os.environ[MARK] = "-"  # decided once for the whole start: the workers do not try again
    return act


def _activate(store: Store | None, framework: str, key: KernelKey | None,
              engine_defaults: dict[str, str]) -> Activation | None:
    # only what deciding needs, imported here: the store's modules load in the thread, beside the start
    from sllmfs.core.config import env_seconds, load_settings
    from sllmfs.store import kernel_key
    from sllmfs.store.layout import Layout

    kinds = {**CACHE_VARS, **FRAMEWORK_CACHE_VARS.get(framework, {})}
    managed = [k for k, (var, _) in kinds.items()
               if not os.environ.get(var) or os.environ.get(var) == engine_defaults.get(var)]
    if not managed:
        return None  # the user placed every cache
    where: Store | Path = store if store is not None else Path(load_settings().storage_path).expanduser().absolute()
    if isinstance(where, Path) and not Layout(where).holds_store():
        return None  # no store on this host: nothing to serve, nowhere to keep them
    root = _private_dir(work_root())
    key = key or kernel_key.current(framework)
    _sweep(root, keep=key.name)
    work = root / key.name
    lock_fd = os.open(root / f"{key.name}.lock", os.O_CREAT | os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    fcntl.flock(lock_fd, fcntl.LOCK_SH)  # shared by the starts using it; a sweep takes it exclusive
    work.mkdir(exist_ok=True)  # after the lock: a sweep between the two would remove it under us
    dirs = {k: work / k / kinds[k][1] for k in managed}
    try:
        for k in managed:
            dirs[k].mkdir(parents=True, exist_ok=True)
    except BaseException:
        os.close(lock_fd)
        raise
    act = Activation(key, work, dirs, Keeper(where, key, dirs, env_seconds(QUIET, DEFAULT_QUIET)), _lock_fd=lock_fd)
    act.keeper.mark = RestoreMark.make(work)
    for k in managed:
        os.environ[kinds[k][0]] = str(work / k)
    os.environ[MARK] = str(work)
    atexit.register(_at_exit, act, os.getpid())
    global _ACTIVE
    _ACTIVE = act
    act.keeper.start()
    return act


RESTORING = ".restoring-"  # + the launcher's pid: in the working dir, locked, while its restore runs
RESTORE_WAIT_S = 10.0
_ACTIVE: Activation | None = None  # this process's activation: a forked child waits for its restore


@dataclass
class RestoreMark:
    """A file in the working dir holding a POSIX lock (``lockf``) while the launcher restores. The lock
    is the liveness: it dies with the launcher in any pid namespace, and a forked child does not
    inherit it, so a mark a killed launcher left is known stale and removed by the next worker."""

    path: Path
    fd: int

    @classmethod
    def make(cls, work: Path) -> RestoreMark | None:
        name = f"{RESTORING}{os.getpid()}"
        tmp = work / f".new{name}"  # locked before it gets its name: no worker sees it unlocked
        try:
            fd = os.open(tmp, os.O_CREAT | os.O_RDWR | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError:
            return None  # workers then do not wait: a kernel they miss is compiled, never read half-made
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX)
            os.rename(tmp, work / name)
        except OSError:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            return None
        return cls(work / name, fd)

    def end(self) -> None:
        """The restore is over: the name goes first, then the lock (a waiting worker sees either)."""
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        os.close(self.fd)


def await_restore(work: Path) -> None:
    """A worker starts compiling only after the start's restore (it runs beside the launcher: 16-60 ms
    on the H200s): a file not restored yet would be compiled again for nothing. Bounded; a mark whose
    lock is free (its launcher died mid-restore) is removed, not waited for. This process's own mark
    is not waited for (the launcher calling again)."""
    own = f"{RESTORING}{os.getpid()}"
    deadline = time.monotonic() + RESTORE_WAIT_S
    while True:
        try:
            marks = [n for n in os.listdir(work) if n.startswith(RESTORING) and n != own]
        except OSError:
            return
        if not any([_restoring(work / n) for n in marks]) or time.monotonic() >= deadline:
            return
        time.sleep(0.01)


def _restoring(path: Path) -> bool:
    """Whether a live launcher holds this mark; a stale one is removed."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False  # gone: that restore ended
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:  # EAGAIN / EACCES: held
            return True
        with contextlib.suppress(OSError):
            os.unlink(path)  # free: its launcher is gone (or just ended it, having unlinked it already)
        return False
    finally:
        os.close(fd)  # and with it this process's lock


def _after_fork_in_child() -> None:
    """A child forked from the launcher (vLLM's default for its engine core) has no keeper thread and
    did not load the plugins again: it waits here for the restore its parent runs."""
    act = _ACTIVE
    if act is not None and not act.keeper.restore_done.is_set():
        await_restore(act.work)


os.register_at_fork(after_in_child=_after_fork_in_child)


def _at_exit(act: Activation, pid: int) -> None:
    if os.getpid() == pid:  # a forked child inherits atexit handlers but is no publisher
        act.close()


def _private_dir(path: Path) -> Path:
    """Our own directory in a shared temp dir: kernels are code, so one another user made (or a
    symlink planted there) is refused, never used."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise BadInput(f"{path} is not a private directory of this user (owner, mode 0700); remove it")
    return path


def _writable(store: Store) -> bool:
    dirs = [store.tmp_dir, store.locks_dir, store.layout.kernels_dir]
    return all(os.access(d, os.W_OK) for d in dirs if d.exists()) and os.access(store.root, os.W_OK)


def _sweep(root: Path, *, keep: str) -> None:
    """Remove the working dirs of other keys (an older driver, torch, framework) no start uses now."""
    for d in root.iterdir():
        if d.name == keep or d.suffix == ".lock" or not d.is_dir() or d.is_symlink():
            continue
        try:
            fd = os.open(root / f"{d.name}.lock", os.O_CREAT | os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            shutil.rmtree(d, ignore_errors=True)
        except BlockingIOError:
            pass  # a live start of that key
        finally:
            os.close(fd)


# The keeper lives in the launching process (SGLang's HTTP server and tokenizer manager, vLLM's API
# server) for the engine's whole life, and a scan of a few thousand cache files holds the GIL for tens of
# ms (45 ms for 3000 files on the CPU VM): once the dirs are quiet and published it looks half as often
# each time, up to this; a kernel compiled later (a new shape) is still published within about as long.
SCAN_MAX_S = 60.0


class Keeper(threading.Thread):
    """Restores the store's entry into the working dir, then publishes the dir's new files once it has
    been quiet for ``quiet`` seconds (a store this process cannot write is only read)."""

    def __init__(self, store: Store | Path, key: KernelKey, dirs: dict[str, Path], quiet: float):
        super().__init__(name="sllmfs-kernel-cache", daemon=True)
        self.where, self.key, self.dirs, self.quiet = store, key, dirs, quiet
        self.store: Store | None = None  # opened in the thread; None until then, or when it could not be
        self.restored = 0
        self.restore_done = threading.Event()
        self.mark: RestoreMark | None = None  # what workers wait on (await_restore) while this restores
        # what the store holds: restored files are no news, anything else in the dir (left by a start
        # that died before publishing, say) goes out with the first publish
        self.published: dict[str, tuple[int, int]] = {}
        self.publishes = 0
        self.scans = 0  # looks at the dirs after the restore
        self._mutex = threading.Lock()
        self._halt = threading.Event()
        self._warned = False

    def run(self) -> None:
        try:
            from sllmfs.store import kernels
            from sllmfs.store.store import Store

            store = self.where if not isinstance(self.where, Path) else \
                Store(self.where, create=False, cleanup=False)
            if _writable(store):  # first: a restore that fails or stops still leaves the start its publish
                self.published = {p: v for p, v in kernels.recorded(store, self.key.name).items()
                                  if p.split("/", 1)[0] in self.dirs}
                self.store = store
            self.restored = kernels.restore(store, self.key.name, self.dirs, stop=self._halt.is_set)
        except Exception as e:  # the engine compiles what is missing, as with no store
            self._warn(f"sllmfs: warning: kernel caches not restored from the store for this start: {e}")
        finally:
            if self.mark is not None:
                self.mark.end()
            self.restore_done.set()
        if self.store is None:
            return
        seen, changed = self.published, time.monotonic()
        base = interval = min(1.0, self.quiet / 4)
        while not self._halt.wait(interval):
            now = kernels.scan(self.dirs)
            self.scans += 1
            if now != seen:
                seen, changed, interval = now, time.monotonic(), base
            elif seen != self.published and time.monotonic() - changed >= self.quiet:
                self.publish()
            elif seen == self.published:  # nothing new since the last publish: look less often
                interval = min(interval * 2, SCAN_MAX_S)

    def publish(self, settle_s: float = 0.0) -> None:
        from sllmfs.store import kernels

        with self._mutex:
            if self.store is None:
                return
            snap = kernels.scan(self.dirs)
            if snap == self.published:
                return
            try:
                kernels.publish(self.store, self.key, self.dirs, wait_s=10.0, settle_s=settle_s)
                self.publishes += 1
            except Exception as e:
                self._warn(f"sllmfs: warning: kernel caches not stored: {e}")
            self.published = snap  # failed or not: the same files are not tried again

    def _warn(self, line: str) -> None:
        if not self._warned:
            print(line, file=sys.stderr)
            self._warned = True

    def close(self) -> None:
        self._halt.set()
        if self.is_alive():
            self.join(timeout=60)
        with contextlib.suppress(Exception):  # at exit: never turn a clean exit into a traceback
            self.publish(settle_s=min(self.quiet, 2.0))  # files still being written are not taken
