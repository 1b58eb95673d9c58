"""The FUSE view serves only verified bytes of exactly one committed version.

Store reads check each 4 MiB window's checksum each time they read it (a flipped byte is EIO and one log line);
a replaced model's old bytes are never served for the new one, whether they come from the
store or the memory tier; a handle opened before a replace reads its own version to the end.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyfuse3
import pytest
import trio
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save_file

import sllmfs.fuse.storeio as storeio
import sllmfs.store.reader as reader  # the window checksum every reader calls
from sllmfs.fuse.ops import Ops
from sllmfs.fuse.tree import ROOT_INODE, Tree
from sllmfs.store.format import CHUNK_SIZE
from sllmfs.store.save import save_model
from sllmfs.store.store import Store, variant_identity
from tests.support.fuse import SOCKET, Runner, force_unmount
from tests.support.sidecar import sidecar

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/fuse") or os.geteuid() != 0,
                                reason="needs /dev/fuse and root")

MiB = 1 << 20
CTX = pyfuse3.RequestContext()  # calls made in-process, as if from root
SHAPES = [(768, 1024)] * 4  # four 3 MiB float32 tensors: a 12 MiB partition, 3 checksum windows


def save(store: Store, name: str, seed: int, shapes: list[tuple[int, int]] = SHAPES) -> dict[str, bytes]:
    """Save a checkpoint of random float32 tensors as ``name`` (replacing it); returns name -> bytes."""
    rng = np.random.default_rng(seed)
    arrays = {f"layer.{i}.weight": rng.standard_normal(s, dtype=np.float32) for i, s in enumerate(shapes)}
    src = store.root.parent / "src" / f"{name.replace('/', '_')}-{seed}"
    src.mkdir(parents=True, exist_ok=True)
    save_file(arrays, str(src / "model.safetensors"))
    (src / "config.json").write_text('{"model_type": "test"}')
    save_model(store, name, src, force=True)
    return {k: v.tobytes() for k, v in arrays.items()}


def tensors(data: bytes) -> dict[str, bytes]:
    return {k: v.tobytes() for k, v in load_safetensors(data).items()}


def flip_byte(store: Store, name: str, offset: int) -> None:
    with open(store.get(name).variant_dir("hf") / "model.safetensors", "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


# -- in-process: the operations without a mount -----------------------------------


async def lookup(ops: Ops, *parts: str) -> int:
    inode = ROOT_INODE
    for part in parts:
        inode = (await ops.lookup(pyfuse3.InodeT(inode), pyfuse3.FileNameT(os.fsencode(part)), CTX)).st_ino
    return inode


async def read_handle(ops: Ops, fh: int, size: int, step: int = 128 << 10, parallel: int = 16) -> bytes:
    """Read a whole file as the kernel's read-ahead does: ``parallel`` requests in flight, in order."""
    out = bytearray(size)
    offsets = iter(range(0, size, step))

    async def reader() -> None:
        for off in offsets:
            got = await ops.read(pyfuse3.FileHandleT(fh), off, step)
            out[off:off + len(got)] = got

    async with trio.open_nursery() as nursery:
        for _ in range(parallel):
            nursery.start_soon(reader)
    return bytes(out)


async def open_file(ops: Ops, *parts: str) -> tuple[int, int, int]:
    """(inode, size, file handle) of a file looked up by path and opened for reading."""
    inode = await lookup(ops, *parts)
    size = ops.tree.get(inode).size  # type: ignore[union-attr]
    return inode, size, (await ops.open(pyfuse3.InodeT(inode), pyfuse3.FlagT(os.O_RDONLY), CTX)).fh


async def read_file(ops: Ops, inode: int) -> bytes:
    fh = (await ops.open(pyfuse3.InodeT(inode), pyfuse3.FlagT(os.O_RDONLY), CTX)).fh
    try:
        return await read_handle(ops, fh, ops.tree.get(inode).size)  # type: ignore[union-attr]
    finally:
        await ops.release(fh)


def count_calls(monkeypatch: pytest.MonkeyPatch, owner: object, name: str) -> list[int]:
    calls = [0]
    real: Callable[..., object] = getattr(owner, name)

    def counted(*args: object) -> object:
        calls[0] += 1
        return real(*args)

    monkeypatch.setattr(owner, name, counted)
    return calls


def test_each_window_is_read_and_hashed_once_per_read_from_the_store(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    store = Store(tmp_path / "store")
    want = save(store, "m", seed=1)
    hashed = count_calls(monkeypatch, reader, "digest")
    windows = count_calls(monkeypatch, storeio.PartitionFiles, "_read_window")
    ops = Ops(Tree(store, SOCKET), None)
    nwindows = -(-store.get("m").manifest("hf").partitions[0].size // CHUNK_SIZE)

    async def main() -> None:
        inode = await lookup(ops, "m", "model.safetensors")
        assert tensors(await read_file(ops, inode)) == want
        # 16 concurrent readers of each window: one read and one hash each, the rest from memory
        assert (hashed[0], windows[0]) == (nwindows, nwindows)
        checked = next(iter(ops._checked.values()))
        assert not checked._kept and not checked._spares  # window buffers freed with the last handle
        assert tensors(await read_file(ops, inode)) == want
        assert hashed[0] == windows[0] == 2 * nwindows  # read from the store again: hashed again

    trio.run(main)


def test_a_window_changed_after_it_was_verified_is_refused_when_read_again(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """One handle, a window verified, then dropped from memory (one kept here: a file past 8 windows, or
    several readers, do the same) while its bytes go bad on disk: the next read of it is EIO."""
    monkeypatch.setattr(storeio, "KEPT_WINDOWS", 1)
    store = Store(tmp_path / "store")
    want = save(store, "m", seed=3)
    ops = Ops(Tree(store, SOCKET), None)

    async def main() -> None:
        _, size, fh = await open_file(ops, "m", "model.safetensors")
        try:
            assert tensors(await read_handle(ops, fh, size, parallel=1)) == want  # window 0 no longer kept
            flip_byte(store, "m", 100)
            data = store.get("m").variant_dir("hf") / "model.safetensors"
            fd = os.open(data, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)
            with pytest.raises(pyfuse3.FUSEError) as e:
                await ops.read(pyfuse3.FileHandleT(fh), 0, 1 << 20)
            assert e.value.errno == errno.EIO
            got = await ops.read(pyfuse3.FileHandleT(fh), size - (1 << 20), 1 << 20)  # the last window: still good
            assert bytes(got) == tensors_tail(want, 1 << 20)
        finally:
            await ops.release(fh)

    trio.run(main)


def tensors_tail(want: dict[str, bytes], n: int) -> bytes:
    """The file's last ``n`` bytes: the last tensor's (tensors are back to back, in order)."""
    return b"".join(want.values())[-n:]


def test_resident_bytes_of_the_same_version_are_served_without_hashing(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    store = Store(tmp_path / "store")
    want = save(store, "m", seed=1)
    vdir = store.get("m").variant_dir("hf")
    segments = [memoryview(bytearray((vdir / "model.safetensors").read_bytes()))]  # what a fill verified
    flip_byte(store, "m", 5 * MiB)  # the store copy goes bad afterwards
    asked: list[tuple[str, str, object]] = []
    resident = variant_identity(vdir)

    def resident_view(model: str, variant: str, identity: object) -> list[memoryview] | None:
        asked.append((model, variant, identity))
        return segments if identity == resident else None

    hashed = count_calls(monkeypatch, reader, "digest")
    ops = Ops(Tree(store, SOCKET), resident_view)

    async def main() -> None:
        inode = await lookup(ops, "m", "model.safetensors")
        assert tensors(await read_file(ops, inode)) == want
        assert hashed[0] == 0 and asked and set(asked) == {("m", "hf", resident)}

    trio.run(main)


def test_open_after_a_replace_is_stale_and_a_held_handle_reads_its_own_version(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    old = save(store, "m", seed=1)
    ops = Ops(Tree(store, SOCKET), None)

    async def main() -> None:
        inode, size, held = await open_file(ops, "m", "model.safetensors")
        first = bytes(await ops.read(held, 0, 4096))  # replies reuse buffers: copy
        new = save(store, "m", seed=2)  # same shapes, other weights
        # looked up before the replace, opened after: the name now means another version
        with pytest.raises(pyfuse3.FUSEError) as e:
            await ops.open(pyfuse3.InodeT(inode), pyfuse3.FlagT(os.O_RDONLY), CTX)
        assert e.value.errno == errno.ESTALE
        data = await read_handle(ops, held, size)
        assert data[:4096] == first and tensors(data) == old  # its own version, to the end
        await ops.release(held)
        again = await lookup(ops, "m", "model.safetensors")
        assert again != inode and tensors(await read_file(ops, again)) == new

    trio.run(main)


def test_what_reads_verified_is_kept_for_the_current_version_only(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    ops = Ops(Tree(store, SOCKET), None)
    small = [(64, 64)] * 2

    async def main() -> None:
        held = None
        for seed in range(30):  # a model replaced 30 times, each version read through the operations
            want = save(store, "m", seed=seed, shapes=small)
            inode = await lookup(ops, "m", "model.safetensors")
            assert tensors(await read_file(ops, inode)) == want
            if seed == 3:  # a handle held across the replaces keeps reading its own version
                held, held_want = (await ops.open(pyfuse3.InodeT(inode), pyfuse3.FlagT(os.O_RDONLY), CTX)).fh, want
            assert list(ops._checked) == [variant_identity(store.get("m").variant_dir("hf"))]
        assert held is not None
        assert tensors(await read_handle(ops, held, ops._open[held].node.size)) == held_want
        await ops.release(held)

    trio.run(main)


# -- through a real mount ---------------------------------------------------------


def test_a_flipped_byte_fails_reads_of_its_window_with_eio_and_one_log_line(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    want = save(store, "org/bad", seed=1)
    flip_byte(store, "org/bad", 5 * MiB + 123)  # window 1: inside layer.1 (3-6 MiB) of model.safetensors
    runner = Runner(store.root, tmp_path / "mnt")
    try:
        path = tmp_path / "mnt" / "org" / "bad" / "model.safetensors"
        cat = subprocess.run(["cat", str(path)], capture_output=True)
        assert cat.returncode != 0 and b"Input/output error" in cat.stderr
        load = subprocess.run([sys.executable, "-c", "import sys; from safetensors.numpy import load_file; "
                               "load_file(sys.argv[1])", str(path)], capture_output=True)
        assert load.returncode != 0  # an error, or SIGBUS through its mmap: never the altered bytes
        with open(path, "rb") as f:  # bytes outside the bad window still read, verified
            head = f.read(8)
            header_len = int.from_bytes(head, "little")
            f.seek(8 + header_len)
            assert f.read(3 * MiB) == want["layer.0.weight"]
            with pytest.raises(OSError) as e:
                f.read(3 * MiB)
            assert e.value.errno == errno.EIO
    finally:
        runner.stop()
        force_unmount(tmp_path / "mnt")
    assert runner.proc.stderr is not None
    lines = [line for line in runner.proc.stderr.read().splitlines() if "checksum" in line]
    assert len(lines) == 1, lines
    for part in ("org/bad", "model.safetensors", "layer.1.weight", "sllmfs verify --model org/bad"):
        assert part in lines[0], (part, lines[0])


def test_a_replaced_model_is_read_new_through_the_daemon_mount_and_held_handles_stay_old(tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    with sidecar(tmp_path, "--mount", str(mnt)) as sd, sd.connect() as client:
        store = Store(sd.store)
        path = mnt / "org" / "m" / "model.safetensors"
        old = save(store, "org/m", seed=1)
        first = client.acquire("org/m")  # leased through the replace: the old copy stays resident
        first.wait(timeout=60)
        assert tensors(path.read_bytes()) == old
        with open(path, "rb") as held:
            held.read(MiB)
            new = save(store, "org/m", seed=2)  # same shapes, other weights
            assert tensors(path.read_bytes()) == new  # never the resident old copy
            with client.acquire("org/m") as second:  # the new version resident too
                second.wait(timeout=60)
                assert tensors(path.read_bytes()) == new
                # drop what the kernel cached for the held handle: its re-read reaches the server
                os.posix_fadvise(held.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
                held.seek(0)
                try:
                    assert tensors(held.read()) == old  # its own version to the end, or EIO
                except OSError as e:
                    assert e.errno == errno.EIO
            first.release()
        other = save(store, "org/m", seed=3, shapes=[(512, 1024), (1024, 1024), (256, 64)])
        assert tensors(path.read_bytes()) == other
        with client.acquire("org/m") as third:
            third.wait(timeout=60)
            assert tensors(path.read_bytes()) == other
        sd.proc.send_signal(signal.SIGTERM)
        assert sd.proc.wait(timeout=30) == 0


def test_an_old_metadata_inode_never_reads_the_new_versions_bytes(tmp_path: Path) -> None:
    """A kernel dentry of a replaced model (a shell's working directory inside it) opens the old
    config.json inode: ESTALE, not the new file's bytes; a fresh lookup reads the new one."""
    store = Store(tmp_path / "store")
    src = tmp_path / "src"
    src.mkdir()
    save_file({"w": np.ones(16, np.float32)}, str(src / "model.safetensors"))

    def saved(config: str) -> None:
        (src / "config.json").write_text(config)
        save_model(store, "org/m", src, force=True)

    saved('{"v": "old"}')
    ops = Ops(Tree(store, SOCKET), None)

    async def read_meta_file(inode: int) -> bytes:
        fh = (await ops.open(pyfuse3.InodeT(inode), pyfuse3.FlagT(os.O_RDONLY), CTX)).fh
        try:
            return bytes(await ops.read(pyfuse3.FileHandleT(fh), 0, 100))
        finally:
            await ops.release(fh)

    async def main() -> None:
        old = await lookup(ops, "org", "m", "config.json")
        assert await read_meta_file(old) == b'{"v": "old"}'
        saved('{"v": "NEW"}')  # the same size: nothing but the version tells them apart
        with pytest.raises(pyfuse3.FUSEError) as e:
            await read_meta_file(old)
        assert e.value.errno == errno.ESTALE
        assert await read_meta_file(await lookup(ops, "org", "m", "config.json")) == b'{"v": "NEW"}'

    trio.run(main)
