"""A cold read through the sidecar's mount fills the variant into the memory tier and is served from
it as its windows land (fuse/incoming.py); with no room in the pool, or a damaged window, the store
serves as before: the same bytes, EIO for the bad window only, one line each, the daemon serving on."""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path
from typing import Any

import pytest
from safetensors.numpy import load as load_safetensors

from sllmfs.store.format import CHUNK_SIZE, load_manifest
from sllmfs.store.store import Store
from tests.support.sidecar import Sidecar, make_model, sidecar, wait_log

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/fuse") or os.geteuid() != 0,
                                reason="needs /dev/fuse and root")

MIB = 1 << 20


def _mounted(sd: Sidecar, mnt: Path) -> None:
    deadline = time.monotonic() + 30
    while not (mnt / ".sllmfs.json").exists():
        assert time.monotonic() < deadline, sd.log()
        time.sleep(0.05)


def _tier(st: dict[str, Any], name: str) -> str:
    return str({m["name"]: m["tier"] for m in st["models"]}[name])


def _read_in_requests(path: Path, step: int = MIB) -> tuple[bytes, list[int]]:
    """The file read with O_DIRECT-free preads of ``step`` bytes; the offsets whose read failed with EIO."""
    out, failed = bytearray(), []
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        for off in range(0, size, step):
            try:
                out += os.pread(fd, step, off)
            except OSError as e:
                assert e.errno == errno.EIO, e
                failed.append(off)
                out += b"\0" * min(step, size - off)
    finally:
        os.close(fd)
    return bytes(out), failed


def _bytes_read(sd: Sidecar) -> int:
    """What the sidecar's process read by system calls so far (its store reads among them)."""
    for line in Path(f"/proc/{sd.proc.pid}/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/<pid>/io")


def _tensors(data: bytes) -> dict[str, bytes]:
    return {k: v.tobytes() for k, v in load_safetensors(data).items()}


def test_a_cold_read_fills_the_tier_and_the_next_open_is_a_hit(tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    want = make_model(tmp_path / "store", "org/cold", tensors=6, nbytes=4 * MIB)  # 24 MiB, 6 windows
    with sidecar(tmp_path, "--mount", str(mnt)) as sd:
        _mounted(sd, mnt)
        assert _tier(sd.status(), "org/cold") != "memory"
        path = mnt / "org" / "cold" / "model.safetensors"
        before = _bytes_read(sd)
        data, failed = _read_in_requests(path)
        assert not failed and _tensors(data) == want
        # the store was read once, by the fill: the reads were served from the tier, not the store again
        assert _bytes_read(sd) - before < 1.5 * len(data), (_bytes_read(sd) - before, len(data))
        log = wait_log(sd, "filled model=org/cold")
        assert "mount: model=org/cold variant=hf reads of the mount wait for its fill" in log, log
        st = sd.status()
        assert _tier(st, "org/cold") == "memory" and st["counters"]["misses"] == 1, st
        assert _tensors(path.read_bytes()) == want  # the next reader: a hit (passthrough where the kernel has it)


def test_with_no_room_in_the_pool_cold_reads_come_from_the_store(tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    want = make_model(tmp_path / "store", "org/big", tensors=6, nbytes=4 * MIB)  # 24 MiB > the 8 MiB pool
    with sidecar(tmp_path, "--mount", str(mnt), "--mem-pool-size", "8MiB") as sd:
        _mounted(sd, mnt)
        data, failed = _read_in_requests(mnt / "org" / "big" / "model.safetensors")
        assert not failed and _tensors(data) == want
        log = wait_log(sd, "reads of the mount come from the store")
        lines = [ln for ln in log.splitlines() if "reads of the mount come from the store" in ln]
        assert len(lines) == 1 and "org/big" in lines[0] and "--mem-pool-size" in lines[0], log
        assert _tier(sd.status(), "org/big") != "memory"


def test_a_damaged_window_fails_only_its_reads_and_the_daemon_serves_on(tmp_path: Path) -> None:
    mnt, store = tmp_path / "mnt", tmp_path / "store"
    want = make_model(store, "org/bad", tensors=6, nbytes=4 * MIB)
    good = make_model(store, "org/good", tensors=2, nbytes=MIB, seed=3)
    vdir = Store(store).get("org/bad").variant_dir("hf")
    part = load_manifest(vdir).partitions[0]
    with open(vdir / part.file, "r+b") as f:  # one flipped byte in window 2 of the only partition
        f.seek(2 * CHUNK_SIZE + 4321)
        byte = f.read(1)
        f.seek(2 * CHUNK_SIZE + 4321)
        f.write(bytes([byte[0] ^ 0xFF]))
    with sidecar(tmp_path, "--mount", str(mnt)) as sd:
        _mounted(sd, mnt)
        path = mnt / "org" / "bad" / "model.safetensors"
        data, failed = _read_in_requests(path)
        assert failed, "the damaged window was served"
        header = 8 + int.from_bytes(data[:8], "little")
        # every request that failed overlaps window 2's bytes in the file; every other one read right
        lo, hi = header + 2 * CHUNK_SIZE, header + 3 * CHUNK_SIZE
        assert all(off < hi and off + MIB > lo for off in failed), (failed, lo, hi)
        flat = b"".join(want.values())
        for off in range(0, len(data), MIB):
            start = max(off, header)
            if off not in failed and start < off + MIB:
                assert data[start:off + MIB] == flat[start - header:off + MIB - header], off
        log = wait_log(sd, "refusing the model")
        assert "fill failed model=org/bad" in log, log
        assert _tensors((mnt / "org" / "good" / "model.safetensors").read_bytes()) == good
