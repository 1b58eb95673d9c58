"""The mount's passthrough backing copies count in --mem-pool-size: a copy evicts idle variants (never
the one it is copied from) or, with no room, is not made (one line; the daemon serves the reads); the
bytes held show in `sllmfs status` and the metrics, and come back when the copy goes."""

from __future__ import annotations

import os
import socket
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.support.cli import sllmfs
from tests.support.fuse import force_unmount
from tests.support.sidecar import Sidecar, make_model, sidecar, wait_log

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/fuse") or os.geteuid() != 0,
                                reason="needs /dev/fuse and root (passthrough)")

MIB = 1 << 20


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _mounted(sd: Sidecar, mnt: Path) -> None:
    deadline = time.monotonic() + 30
    while not (mnt / ".sllmfs.json").exists():
        assert time.monotonic() < deadline, sd.log()
        time.sleep(0.05)


def _resident(sd: Sidecar, name: str) -> None:
    """Fill ``name`` into the memory tier and leave it there, idle (no lease)."""
    with sd.connect() as c, c.acquire(name) as lease:
        lease.wait(timeout=60)


def _tiers(st: dict[str, Any]) -> dict[str, str]:
    return {m["name"]: m["tier"] for m in st["models"]}


def _bytes_of(st: dict[str, Any], name: str) -> int:
    (m,) = [m for m in st["models"] if m["name"] == name]
    return int(sum(v["bytes"] for v in m["variants"]))


def _metric(port: int, name: str) -> float | None:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    values = [float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ")]
    return values[0] if values else None


def _safetensors_bytes(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def test_a_copy_that_does_not_fit_the_pool_is_not_made_and_the_daemon_serves(tmp_path: Path) -> None:
    store, mnt = tmp_path / "store", tmp_path / "mnt"
    make_model(store, "org/a", tensors=4, nbytes=4 * MIB)  # 16 MiB: resident it leaves 8 MiB of the pool
    with sidecar(tmp_path, "--mount", str(mnt), "--mem-pool-size", "24MiB") as sd:
        try:
            _mounted(sd, mnt)
            _resident(sd, "org/a")
            weights = mnt / "org" / "a" / "model.safetensors"
            data = _safetensors_bytes(weights)
            assert data == _safetensors_bytes(weights) and len(data) == weights.stat().st_size
            log = wait_log(sd, "not in passthrough")
            lines = [ln for ln in log.splitlines() if "not in passthrough" in ln]
            assert len(lines) == 1 and "does not fit in the memory pool (--mem-pool-size)" in lines[0], log
            st = sd.status()
            assert st["memory"]["mount_copies"] == 0 and st["memory"]["used"] <= st["memory"]["budget"]
            assert _tiers(st)["org/a"] == "memory"  # the copy's source is never evicted for it
            assert "passthrough: org/a" not in sd.log()
        finally:
            force_unmount(mnt)


def test_a_copy_counts_in_the_pool_evicts_idle_variants_and_shows_in_status_and_metrics(tmp_path: Path) -> None:
    store, mnt = tmp_path / "store", tmp_path / "mnt"
    make_model(store, "org/a", tensors=4, nbytes=4 * MIB, seed=1)
    make_model(store, "org/b", tensors=4, nbytes=4 * MIB, seed=2)
    port = _free_port()
    with sidecar(tmp_path, "--mount", str(mnt), "--mem-pool-size", "40MiB", "--metrics-port", str(port)) as sd:
        try:
            _mounted(sd, mnt)
            _resident(sd, "org/a")
            _resident(sd, "org/b")  # both fit (32 MiB); a copy of b's file (16 MiB more) does not beside a
            resident_b = _bytes_of(sd.status(), "org/b")
            weights = mnt / "org" / "b" / "model.safetensors"
            size = weights.stat().st_size
            with open(weights, "rb") as f:  # held open: the copy stays
                assert f.read() == _safetensors_bytes(weights)
                wait_log(sd, "passthrough: org/b model.safetensors")
                st = sd.status()
                mem = st["memory"]
                print(f"pool {mem['budget']}: used {mem['used']}, of which {mem['mount_copies']} in the copy; "
                      f"tiers {_tiers(st)}")
                assert mem["mount_copies"] == size
                assert mem["used"] == resident_b + size <= mem["budget"]
                assert _tiers(st) == {"org/a": "disk", "org/b": "memory"}  # a, idle and older, made room
                human = sllmfs("status", "--socket", str(sd.socket)).stdout
                assert "in the mount's passthrough copies" in human, human
                deadline = time.monotonic() + 10  # the metrics snapshot is refreshed every 2 s
                while (copies := _metric(port, "sllmfs_mount_copy_bytes")) != size and time.monotonic() < deadline:
                    time.sleep(0.2)
                assert copies == size
            with sd.connect() as c:  # b leaves the memory tier: its copy goes with it (the mount's expiry loop)
                assert c.evict("org/b")
            deadline = time.monotonic() + 20
            while (mem := sd.status()["memory"])["mount_copies"] and time.monotonic() < deadline:
                time.sleep(0.2)
            assert mem["mount_copies"] == 0 and mem["used"] == 0, mem
        finally:
            force_unmount(mnt)
