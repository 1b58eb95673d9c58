"""FUSE passthrough on real mounts: resident files are read by the kernel from a backing memfd.

The server runs in a child, as the daemon runs it (a reader in the server's own process could
deadlock on the GIL), with a memory tier of real in-memory segments that is resident only while a
flag file exists and only for the version it was filled from (as the sidecar's memtier). The child
counts the READ requests that reach ``Ops`` for safetensors files and the backings it builds.
"""

from __future__ import annotations

import errno
import mmap
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from safetensors import safe_open

from sllmfs.store.save import save_model
from sllmfs.store.store import Store
from tests.support.fuse import force_unmount, is_mounted
from tests.support.synth import raw

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/fuse") or os.geteuid() != 0,
                                reason="needs /dev/fuse and root")

SERVER = """
import logging, signal, sys, trio
from pathlib import Path
import sllmfs.fuse.backing as backing
import sllmfs.fuse.driver as driver
import sllmfs.fuse.kernel as kernel
from sllmfs.fuse.main import serve
from sllmfs.fuse.ops import Ops
from sllmfs.store.store import Store

logging.basicConfig(level=logging.WARNING, format="sllmfs: %(message)s")
store_root, mnt, model, flag, mode = sys.argv[1:6]
store = Store(store_root, create=False, cleanup=False)
info = store.get(model)
identity = store.identity(model, "hf")
parts = info.manifest("hf").partitions
segments = [memoryview(bytearray((info.variant_dir("hf") / p.file).read_bytes())) for p in parts]
stats = {"reads": 0, "built": 0, "dropped": 0}
backing.LINGER = 0.5
driver.EXPIRE_EVERY = 0.2
if mode == "no-passthrough-kernel":  # a kernel without FUSE passthrough (Linux < 6.9, or built without it)
    offered = kernel.offered
    kernel.offered = lambda flags, flags2: offered(flags, flags2) & ~kernel.PASSTHROUGH
if mode == "no-backing":  # passthrough offered, but backings refused (root in a user namespace: EPERM)
    import errno
    def refused_backing(*a, **k):
        raise OSError(errno.EPERM, "Operation not permitted")
    kernel.backing_open = refused_backing
if mode == "no-room":  # the host (or the pod's cgroup) has no memory left for a copy
    backing.room = lambda: 1000
if mode == "no-cap":  # a container without CAP_SYS_ADMIN: mount(2) is refused, fusermount3 still works
    import errno
    def refused(*a, **k):
        raise OSError(errno.EPERM, "Operation not permitted")
    kernel.mount = refused
if mode in ("mapped", "pwrite"):  # the copy through a mapping (the default where shmem THP is on), or pwrite
    chosen_build = backing.build
    backing.build = lambda synth, views: chosen_build(synth, views, mapped=mode == "mapped")
files = {}
if mode.startswith("tier-files"):  # a tier that holds the variant as its safetensors file
    import os
    from sllmfs.fuse.synth import layout
    for synth in layout(info.manifest("hf")).files:
        files[synth.name] = backing.build(synth, segments)
        if mode == "tier-files-unsealed":  # the same bytes, but nothing stops a change: refused
            fd = os.memfd_create("unsealed")
            os.write(fd, os.pread(files[synth.name], synth.size, 0))
            files[synth.name] = fd

def resident_file(m, variant, ident, name):
    if (m, variant, ident) == (model, "hf", identity) and Path(flag).exists() and name in files:
        from sllmfs.fuse.tierfile import TierFile
        return TierFile(os.dup(files[name]), os.fstat(files[name]).st_size, lambda: None)
    return None

def resident_view(m, variant, ident):
    if (m, variant, ident) == (model, "hf", identity) and Path(flag).exists():
        return segments
    return None

read = Ops.read
async def counting_read(self, fh, off, size):
    node = self.opened(fh)
    if node is not None and node.synth is not None:
        stats["reads"] += 1
    return await read(self, fh, off, size)
Ops.read = counting_read
build, drop = backing.build, backing.Backings._drop
def counting_build(*a):
    stats["built"] += 1
    return build(*a)
def counting_drop(self, inode):
    stats["dropped"] += 1
    return drop(self, inode)
backing.build, backing.Backings._drop = counting_build, counting_drop

async def main():
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGUSR1) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(lambda task_status: serve(Path(mnt), store, resident_view, "/run/sllmfs/test.sock",
                                                          driver="auto" if mode == "no-cap" else "kernel",
                                                          task_status=task_status,
                                                          resident_file=resident_file if files else None))
            print("serving", flush=True)
            async for sig in signals:
                print("stats", stats["reads"], stats["built"], stats["dropped"], flush=True)
                if sig == signal.SIGTERM:
                    nursery.cancel_scope.cancel()
                    break

trio.run(main)
"""


class Child:
    def __init__(self, store: Path, mnt: Path, model: str, flag: Path, mode: str = "passthrough"):
        self.mnt = mnt
        self.proc = subprocess.Popen([sys.executable, "-c", SERVER, str(store), str(mnt), model, str(flag), mode],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        assert line == "serving", (line, self.proc.stderr.read() if self.proc.stderr else "")

    def stats(self) -> tuple[int, int, int]:
        """(safetensors READ requests that reached the daemon, backings built, backings dropped)."""
        self.proc.send_signal(signal.SIGUSR1)
        assert self.proc.stdout is not None
        reads, built, dropped = self.proc.stdout.readline().split()[1:]
        return int(reads), int(built), int(dropped)

    def stop(self) -> tuple[int, str]:
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self.proc.stdout.readline()
        code = self.proc.wait(timeout=30)
        return code, self.proc.stderr.read()


@pytest.fixture
def served(tmp_path: Path, llama_dir: Path) -> Iterator[tuple[Store, Path, Path, list[Child]]]:
    store = Store(tmp_path / "store")
    save_model(store, "org/tiny", llama_dir)
    flag = tmp_path / "resident"
    flag.touch()
    children: list[Child] = []
    yield store, tmp_path / "mnt", flag, children
    for c in children:
        if c.proc.poll() is None:
            c.proc.kill()
            c.proc.wait()
    force_unmount(tmp_path / "mnt")


def _same_tensors(path: Path, ref: Path) -> None:
    with safe_open(path, "pt") as sf, safe_open(ref, "pt") as want:  # safe_open maps the file
        assert sorted(sf.keys()) == sorted(want.keys())
        for k in want.keys():
            assert raw(sf.get_tensor(k)) == raw(want.get_tensor(k)), k


def _one_fallback_line(child: Child, why: str) -> None:
    """The server stopped cleanly and said once, for the one file, why it is not in passthrough."""
    code, err = child.stop()
    assert code == 0
    lines = [ln for ln in err.splitlines() if "not in passthrough" in ln]
    assert len(lines) == 1 and why in lines[0], err


@pytest.mark.parametrize("copy", ["pwrite", "mapped"])
def test_a_resident_file_is_read_by_the_kernel_and_never_reaches_the_daemon(
        served: tuple[Store, Path, Path, list[Child]], llama_dir: Path, copy: str) -> None:
    store, mnt, flag, children = served
    children.append(child := Child(store.root, mnt, "org/tiny", flag, copy))
    path = mnt / "org" / "tiny" / "model.safetensors"
    _same_tensors(path, llama_dir / "model.safetensors")
    with open(path, "rb") as f:
        whole = f.read()
        with mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
            assert m[:] == whole
    assert child.stats() == (0, 1, 0)  # no READ reached us; one backing, shared by every open
    # evicted from the memory tier and gone from the store: an open handle still reads its bytes
    with open(path, "rb", buffering=0) as f:
        flag.unlink()
        info = store.get("org/tiny")
        for p in info.manifest("hf").partitions:
            os.unlink(info.variant_dir("hf") / p.file)
        assert f.read() == whole
    assert child.stats()[0] == 0


def test_the_backing_is_dropped_after_its_linger_and_rebuilt_on_the_next_open(
        served: tuple[Store, Path, Path, list[Child]]) -> None:
    store, mnt, flag, children = served
    children.append(child := Child(store.root, mnt, "org/tiny", flag))
    path = mnt / "org" / "tiny" / "model.safetensors"
    first = path.read_bytes()
    assert path.read_bytes() == first  # within the linger: the same backing
    assert child.stats() == (0, 1, 0)
    deadline = time.monotonic() + 10
    while child.stats()[2] == 0:
        assert time.monotonic() < deadline, "backing never dropped"
        time.sleep(0.2)
    assert path.read_bytes() == first
    assert child.stats() == (0, 2, 1)


def test_not_resident_reads_go_through_the_daemon_and_modes_never_conflict(
        served: tuple[Store, Path, Path, list[Child]], llama_dir: Path) -> None:
    """The kernel refuses (EIO) an open whose io mode differs from the inode's other open handles:
    later opens follow the first, whichever way residency changed meanwhile."""
    store, mnt, flag, children = served
    flag.unlink()
    children.append(child := Child(store.root, mnt, "org/tiny", flag))
    path = mnt / "org" / "tiny" / "model.safetensors"
    want = (llama_dir / "model.safetensors").read_bytes()
    with open(path, "rb", buffering=0) as cached:
        flag.touch()  # resident now, while a cached handle is open
        assert path.read_bytes() == want
        assert cached.read() == want
    reads, built, _ = child.stats()
    assert reads > 0 and built == 0
    with open(path, "rb", buffering=0) as passthrough:  # all closed: this open picks passthrough
        flag.unlink()  # evicted while it is open: the next open shares its backing
        assert path.read_bytes() == want
        assert passthrough.read() == want
    assert child.stats()[:2] == (reads, 1)


def test_a_replaced_model_is_read_new_and_a_held_handle_keeps_its_version(
        served: tuple[Store, Path, Path, list[Child]], llama_dir: Path, qwen_tied_dir: Path) -> None:
    store, mnt, flag, children = served
    children.append(Child(store.root, mnt, "org/tiny", flag))
    path = mnt / "org" / "tiny" / "model.safetensors"
    old = path.read_bytes()
    with open(path, "rb", buffering=0) as held:
        save_model(store, "org/tiny", qwen_tied_dir, force=True)
        _same_tensors(path, qwen_tied_dir / "model.safetensors")  # new inode; the tier holds the old version
        assert held.read() == old


def test_writes_are_refused_and_unknown_names_are_enoent(served: tuple[Store, Path, Path, list[Child]]) -> None:
    store, mnt, flag, children = served
    children.append(Child(store.root, mnt, "org/tiny", flag))
    path = mnt / "org" / "tiny" / "model.safetensors"
    path.read_bytes()  # its backing exists
    for flags in (os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC):
        with pytest.raises(OSError) as e:
            os.open(path, flags)
        assert e.value.errno == errno.EROFS
    with pytest.raises(FileNotFoundError):
        os.stat(mnt / "org" / "tiny" / "other.safetensors")
    with pytest.raises(OSError) as e:
        os.mkdir(mnt / "org" / "new")
    assert e.value.errno == errno.EROFS


@pytest.mark.parametrize("mode, why", [
    ("no-passthrough-kernel", "is not offered by this kernel"),  # Linux < 6.9, or built without it
    ("no-backing", "refuses our backing files"),  # offered, but backings refused: found at INIT, nothing copied
])
def test_a_kernel_without_usable_passthrough_serves_through_the_daemon_with_one_line(
        served: tuple[Store, Path, Path, list[Child]], llama_dir: Path, mode: str, why: str) -> None:
    store, mnt, flag, children = served
    children.append(child := Child(store.root, mnt, "org/tiny", flag, mode=mode))
    path = mnt / "org" / "tiny" / "model.safetensors"
    for _ in range(2):  # no copy made (and thrown away) per open
        _same_tensors(path, llama_dir / "model.safetensors")
    reads, built, _ = child.stats()
    assert reads > 0 and built == 0
    code, err = child.stop()
    assert code == 0
    lines = [ln for ln in err.splitlines() if "passthrough" in ln]
    assert len(lines) == 1 and why in lines[0] and "through the daemon" in lines[0], err


def test_sigterm_unmounts_while_a_passthrough_file_is_open_and_mapped(
        served: tuple[Store, Path, Path, list[Child]]) -> None:
    store, mnt, flag, children = served
    children.append(child := Child(store.root, mnt, "org/tiny", flag))
    path = mnt / "org" / "tiny" / "model.safetensors"
    fd = os.open(path, os.O_RDONLY)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
        whole = m[:]
    with open(path, "rb") as f:
        m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
    code, err = child.stop()  # with a handle open and a mapping alive
    assert code == 0, err
    assert not is_mounted(mnt)
    assert m[:] == whole  # the mapping holds the backing file: it stays readable
    m.close()
    try:
        os.close(fd)
    except OSError as e:  # the kernel's FLUSH of a handle on a server that is gone
        assert e.errno == errno.ENOTCONN


def test_no_memory_for_a_backing_reads_through_the_daemon_with_one_line_per_file(
        served: tuple[Store, Path, Path, list[Child]], llama_dir: Path) -> None:
    store, mnt, flag, children = served
    children.append(child := Child(store.root, mnt, "org/tiny", flag, mode="no-room"))
    path = mnt / "org" / "tiny" / "model.safetensors"
    for _ in range(3):
        _same_tensors(path, llama_dir / "model.safetensors")
    reads, built, _ = child.stats()
    assert reads > 0 and built == 0
    _one_fallback_line(child, "memory left")


def test_a_tier_holding_the_file_backs_it_without_a_copy(served: tuple[Store, Path, Path, list[Child]],
                                                         llama_dir: Path) -> None:
    store, mnt, flag, children = served
    children.append(child := Child(store.root, mnt, "org/tiny", flag, mode="tier-files"))
    path = mnt / "org" / "tiny" / "model.safetensors"
    _same_tensors(path, llama_dir / "model.safetensors")
    assert path.read_bytes() == (llama_dir / "model.safetensors").read_bytes()
    assert child.stats()[:2] == (0, 0)  # no READ reached us, nothing was copied


def test_an_unsealed_tier_file_is_refused_with_one_line(served: tuple[Store, Path, Path, list[Child]],
                                                        llama_dir: Path) -> None:
    store, mnt, flag, children = served
    children.append(child := Child(store.root, mnt, "org/tiny", flag, mode="tier-files-unsealed"))
    path = mnt / "org" / "tiny" / "model.safetensors"
    for _ in range(2):
        assert path.read_bytes() == (llama_dir / "model.safetensors").read_bytes()
    _one_fallback_line(child, "not a sealed file")


def test_without_the_right_to_mount_pyfuse3_serves_with_one_line(served: tuple[Store, Path, Path, list[Child]],
                                                                 llama_dir: Path) -> None:
    store, mnt, flag, children = served
    children.append(child := Child(store.root, mnt, "org/tiny", flag, mode="no-cap"))
    path = mnt / "org" / "tiny" / "model.safetensors"
    _same_tensors(path, llama_dir / "model.safetensors")
    assert child.stats()[1] == 0  # no backing: pyfuse3 cannot open in passthrough
    code, err = child.stop()
    assert code == 0 and not is_mounted(mnt)
    lines = [ln for ln in err.splitlines() if "passthrough" in ln]
    assert len(lines) == 1 and "CAP_SYS_ADMIN" in lines[0], err
