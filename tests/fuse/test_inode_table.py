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
