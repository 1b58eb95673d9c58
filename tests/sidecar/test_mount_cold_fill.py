"""A cold read through the sidecar's mount fills the variant into the memory tier and is served from
it as its windows land, once a handle has read START_AFTER bytes of tensors (fuse/incoming.py); a
small read starts nothing; with no room in the pool, or a damaged window, the store serves as before:
the same bytes, EIO for the bad window only, one line each, the daemon serving on."""

from __future__ import annotations

import errno
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
from safetensors.numpy import load as load_safetensors

from sllmfs.fuse.incoming import START_AFTER
from sllmfs.store.format import CHUNK_SIZE, load_manifest
from sllmfs.store.store import Store
from tests.support.sidecar import Sidecar, make_model, sidecar, wait_log

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/fuse") or os.geteuid() != 0,
                                reason="needs /dev/fuse and root")

MIB = 1 << 20
TENSORS = (START_AFTER + 32 * MIB) // (4 * MIB)  # 4 MiB tensors: START_AFTER and 32 MiB more


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
    want = make_model(tmp_path / "store", "org/cold", tensors=TENSORS, nbytes=4 * MIB)
    # no blanks: where hugetlb pages exist, making them reads /dev/zero, which rchar counts as reads too
    with sidecar(tmp_path, "--mount", str(mnt), "--no-prefault") as sd:
        _mounted(sd, mnt)
        assert _tier(sd.status(), "org/cold") != "memory"
        path = mnt / "org" / "cold" / "model.safetensors"
        before = _bytes_read(sd)
        data, failed = _read_in_requests(path)
        assert not failed and _tensors(data) == want
        # the store was read by the reader up to START_AFTER (and the kernel's read-ahead), then once
        # by the fill: the rest was served from the tier (from the store again, it would be twice the file)
        assert _bytes_read(sd) - before < len(data) + START_AFTER + 16 * MIB, (_bytes_read(sd) - before, len(data))
        log = wait_log(sd, "filled model=org/cold")
        assert "mount: model=org/cold variant=hf reads of the mount wait for its fill" in log, log
        st = sd.status()
        assert _tier(st, "org/cold") == "memory" and st["counters"]["misses"] == 1, st
        assert _tensors(path.read_bytes()) == want  # the next reader: a hit (passthrough where the kernel has it)


def test_with_no_room_in_the_pool_cold_reads_come_from_the_store(tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    want = make_model(tmp_path / "store", "org/big", tensors=TENSORS, nbytes=4 * MIB)  # > the 8 MiB pool
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
    want = make_model(store, "org/bad", tensors=TENSORS, nbytes=4 * MIB)
    good = make_model(store, "org/good", tensors=2, nbytes=MIB, seed=3)
    vdir = Store(store).get("org/bad").variant_dir("hf")
    part = load_manifest(vdir).partitions[0]
    bad = START_AFTER // CHUNK_SIZE + 4  # a window past what the reader reads before the fill starts
    with open(vdir / part.file, "r+b") as f:  # one flipped byte in it, in the only partition
        f.seek(bad * CHUNK_SIZE + 4321)
        byte = f.read(1)
        f.seek(bad * CHUNK_SIZE + 4321)
        f.write(bytes([byte[0] ^ 0xFF]))
    with sidecar(tmp_path, "--mount", str(mnt)) as sd:
        _mounted(sd, mnt)
        path = mnt / "org" / "bad" / "model.safetensors"
        data, failed = _read_in_requests(path)
        assert failed, "the damaged window was served"
        header = 8 + int.from_bytes(data[:8], "little")
        # every request that failed overlaps the bad window's bytes in the file; every other one read right
        lo, hi = header + bad * CHUNK_SIZE, header + (bad + 1) * CHUNK_SIZE
        assert all(off < hi and off + MIB > lo for off in failed), (failed, lo, hi)
        meta = json.loads(data[8:header])
        order = sorted((k for k in meta if k != "__metadata__"), key=lambda k: meta[k]["data_offsets"][0])
        flat = b"".join(want[k] for k in order)  # the tensors as the file lays them out
        for off in range(0, len(data), MIB):
            start = max(off, header)
            if off not in failed and start < off + MIB:
                assert data[start:off + MIB] == flat[start - header:off + MIB - header], off
        log = wait_log(sd, "refusing the model")
        assert "fill failed model=org/bad" in log, log
        assert _tensors((mnt / "org" / "good" / "model.safetensors").read_bytes()) == good


def test_a_small_read_starts_no_fill(tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    want = make_model(tmp_path / "store", "org/probe", tensors=TENSORS, nbytes=4 * MIB)
    with sidecar(tmp_path, "--mount", str(mnt)) as sd:
        _mounted(sd, mnt)
        path = mnt / "org" / "probe" / "model.safetensors"
        with open(path, "rb") as f:  # the header, then the first tensor: a probe, not a load
            header = 8 + int.from_bytes(f.read(8), "little")
            f.seek(header)
            assert f.read(4 * MIB) == want["layer.0.weight"]
        time.sleep(0.5)
        st = sd.status()
        assert _tier(st, "org/probe") != "memory" and st["counters"]["misses"] == 0, st
        assert "mount: model=org/probe" not in sd.log()


def test_a_reader_of_a_replaced_version_starts_no_fill_of_the_new_one(tmp_path: Path) -> None:
    """A handle opened before `save --force` keeps reading its own version from the store; past
    START_AFTER it must not fill the new version (gigabytes it never reads, evicting others)."""
    mnt, store = tmp_path / "mnt", tmp_path / "store"
    old = make_model(store, "org/swap", tensors=TENSORS, nbytes=4 * MIB)
    with sidecar(tmp_path, "--mount", str(mnt)) as sd:
        _mounted(sd, mnt)
        fd = os.open(mnt / "org" / "swap" / "model.safetensors", os.O_RDONLY)
        try:
            first = os.pread(fd, MIB, 0)  # the header: the handle is open on the old version
            new = make_model(store, "org/swap", tensors=TENSORS, nbytes=4 * MIB, seed=9, force=True)
            assert new != old
            size = os.fstat(fd).st_size
            data = first + b"".join(os.pread(fd, MIB, off) for off in range(MIB, size, MIB))
        finally:
            os.close(fd)
        assert _tensors(data) == old
        time.sleep(0.5)
        st = sd.status()
        assert st["counters"]["misses"] == 0 and _tier(st, "org/swap") != "memory", st
        assert "fill started model=org/swap" not in sd.log()
