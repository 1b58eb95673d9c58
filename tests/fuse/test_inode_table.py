"""The mount's inode table stays bounded over months of replaces (the kernel's lookup-count contract).

Every replaced model version gets new inodes (a replaced model is never served stale); the table
drops an old version's inodes once the kernel forgets them (FORGET, BATCH_FORGET, pyfuse3's
``forget``). Measured through the mount itself: statfs's ``f_files`` is the table's size.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.numpy import load

from tests.support.fuse import force_unmount
from tests.support.sidecar import make_model

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/fuse") or os.geteuid() != 0,
                                reason="needs /dev/fuse and root (drop_caches)")

MODEL = "org/m"
REPLACES = 12


def _table(mnt: Path) -> int:
    return os.statvfs(mnt).f_files


def _walk(mnt: Path) -> None:
    """What a loader does: look the model up, list it, stat and read its files."""
    model = mnt / MODEL
    os.listdir(mnt)
    os.listdir(mnt / "org")
    for name in os.listdir(model):
        os.stat(model / name)
    (model / "config.json").read_bytes()


def _tensors(path: Path) -> dict[str, bytes]:
    return {k: v.tobytes() for k, v in load(path.read_bytes()).items()}


def _drop_caches_until(mnt: Path, bound: int, timeout: float = 20.0) -> int:
    """Ask the kernel to drop unused dentries and inodes (it then sends FORGETs) until the table is
    within ``bound``; returns the size seen last."""
    deadline = time.monotonic() + timeout
    while True:
        Path("/proc/sys/vm/drop_caches").write_text("2")
        size = _table(mnt)
        if size <= bound or time.monotonic() > deadline:
            return size
        time.sleep(0.2)


@pytest.mark.parametrize("driver", ["kernel", "pyfuse3"])
def test_replaces_leave_a_bounded_table_and_every_guarantee(tmp_path: Path, driver: str) -> None:
    store, mnt = tmp_path / "store", tmp_path / "mnt"
    mnt.mkdir()
    versions = [make_model(store, MODEL, tensors=2, seed=0)]
    proc = subprocess.Popen([sys.executable, "-m", "sllmfs.fuse.main", str(store), str(mnt), "--driver", driver],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and "serving" in proc.stdout.readline()
        _walk(mnt)
        weights = mnt / MODEL / "model.safetensors"
        assert _tensors(weights) == versions[0]
        baseline = _table(mnt)
        held = open(weights, "rb")  # noqa: SIM115  # held across every replace: reads its own version
        try:
            peak, seen = baseline, {os.fstat(held.fileno()).st_ino}
            for i in range(1, REPLACES + 1):
                versions.append(make_model(store, MODEL, tensors=2 + i % 3, seed=i, force=True))
                _walk(mnt)
                st = os.stat(weights)
                assert st.st_ino not in seen, f"replace {i}: a new version must get a new inode"
                seen.add(st.st_ino)
                assert _tensors(weights) == versions[i], f"replace {i}: the mount shows another version"
                assert st.st_size == len(weights.read_bytes())
                peak = max(peak, _table(mnt))
            # what stays: the current version's files and folders (as at baseline), plus the held handle's
            # file and the folder it was looked up in (the kernel holds them while the file is open)
            bound = baseline + 2
            after = _drop_caches_until(mnt, bound)
            print(f"{driver}: inode table {baseline} after the first walk, {peak} at most over {REPLACES} "
                  f"replaces, {after} once the kernel forgot")
            assert after <= bound, f"the table kept {after} inodes (bound {bound}, peak {peak})"
            held.seek(0)
            assert {k: v.tobytes() for k, v in load(held.read()).items()} == versions[0]
        finally:
            held.close()
        # the current version is still found (new inodes for names the kernel forgot) and reads new bytes
        _walk(mnt)
        assert _tensors(weights) == versions[-1]
        after_close = _drop_caches_until(mnt, baseline)
        assert after_close <= baseline, f"{after_close} inodes once the handle closed (baseline {baseline})"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        finally:
            force_unmount(mnt)


def test_forget_and_batch_forget_requests_name_every_inode_and_count() -> None:
    from sllmfs.fuse import kernel

    def request(opcode: int, nodeid: int, body: bytes) -> kernel.Request:
        head = kernel.IN_HEADER.pack(kernel.IN_HEADER.size + len(body), opcode, 9, nodeid, 0, 0, 0, 0, 0)
        return kernel.parse(memoryview(head + body))

    assert kernel.forgotten(request(kernel.Opcode.FORGET, 42, kernel.FORGET_IN.pack(3))) == [(42, 3)]
    batch = kernel.BATCH_FORGET_IN.pack(2, 0) + kernel.FORGET_ONE.pack(7, 1) + kernel.FORGET_ONE.pack(8, 5)
    assert kernel.forgotten(request(kernel.Opcode.BATCH_FORGET, 0, batch)) == [(7, 1), (8, 5)]
    short = kernel.BATCH_FORGET_IN.pack(3, 0) + kernel.FORGET_ONE.pack(7, 1)  # a count past the body: what came
    assert kernel.forgotten(request(kernel.Opcode.BATCH_FORGET, 0, short)) == [(7, 1)]


def test_the_table_keeps_current_versions_and_what_the_kernel_holds(tmp_path: Path) -> None:
    from sllmfs.fuse.tree import Tree
    from sllmfs.store.store import Store

    store = tmp_path / "store"
    make_model(store, MODEL, tensors=2, seed=0)
    tree = Tree(Store(store), "/run/s.sock")

    def look(*parts: str):  # type: ignore[no-untyped-def]
        node = tree.root
        for p in parts:
            node = tree.child(node, p)
            assert node is not None
            tree.looked_up(node)
        return node

    old = look("org", "m", "model.safetensors")
    look("org", "m", "model.safetensors")  # the kernel now holds it twice
    make_model(store, MODEL, tensors=3, seed=1, force=True)
    new = look("org", "m", "model.safetensors")
    assert new.inode > old.inode and tree.get(old.inode) is old  # held: stays, and reads its own version
    tree.forget(old.inode, 1)
    assert tree.get(old.inode) is old  # one reference left
    tree.forget(old.inode, 1)
    assert tree.get(old.inode) is None  # forgotten and replaced: gone
    tree.forget(new.inode, 1)
    assert tree.get(new.inode) is new  # forgotten but current: a lookup finds it again, same number
    assert look("org", "m", "model.safetensors") is new
    tree.sweep()
    assert tree.get(new.inode) is new and tree.get(tree.root.inode) is tree.root
