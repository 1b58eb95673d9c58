"""GPU first (sidecar/gpufirst.py) through a real daemon and socket, with the stand-in CUDA runtime: a
tier-empty load copies from the stored files, and the tier is filled after that copy; a client that reads
the segments, or never copies, gets its fill all the same; a damaged file fails the copy and the model."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sllmfs.core.errors import Corrupt
from sllmfs.store.format import digest
from tests.support.cudart import FAKE_PEER_CUDART, memfd_handle
from tests.support.sidecar import make_model, sidecar, wait_log

pytestmark = pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler for the fake CUDA runtime")
GPU0 = "0000:00:06.0"


@pytest.fixture(scope="module")
def fake_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("fakecuda")
    (d / "fake.c").write_text(FAKE_PEER_CUDART)
    lib = d / "libfake.so"
    subprocess.run(["cc", "-O1", "-shared", "-fPIC", "-pthread", "-o", str(lib), str(d / "fake.c")], check=True)
    return {"SLLMFS_CUDART": str(lib), "SLLMFS_RELAY": "off"}


def copy_all(lease: Any) -> tuple[dict[str, Any], dict[str, str]]:
    """load_ipc of every tensor into a memfd the stand-in maps as "GPU memory"; the stats and the digests."""
    total = sum(r.nbytes for r in lease.entries.values())
    fd = os.memfd_create("fake-gpu0")
    try:
        os.ftruncate(fd, total)
        mem = np.memmap(f"/proc/self/fd/{fd}", dtype=np.uint8, mode="r+", shape=(total,))
        mem[:] = 0xEE  # poison
        at, where, pieces = 0, {}, []
        for name, ref in lease.entries.items():
            pieces.append([ref.partition, ref.offset, 0, at, ref.nbytes])
            where[name] = (at, ref.nbytes)
            at += ref.nbytes
        stats = lease.copy_to_gpu([{"handle": memfd_handle(fd, total), "size": total, "device": GPU0}], pieces,
                                  timeout=60)
        got = {n: digest(bytes(mem[a:a + k])) for n, (a, k) in where.items()}
        del mem
        return stats, got
    finally:
        os.close(fd)


def test_a_tier_empty_load_copies_from_the_files_then_fills(tmp_path: Path, fake_env: dict[str, str]) -> None:
    with sidecar(tmp_path, env=fake_env) as sd:
        wait_log(sd, f"gpu copy engine ready device={GPU0}")
        assert "staging ring ready" in sd.log()
        expected = {n: digest(v) for n, v in make_model(sd.store, "org/m", tensors=6, nbytes=3 << 20).items()}
        with sd.connect() as c:
            with c.acquire("org/m", gpu_first=True) as lease:
                assert lease._fill_held
                assert "fill started model=org/m" not in sd.log()  # held for the copy
                stats, got = copy_all(lease)
                assert got == expected and stats["source"] == "files" and stats["mode"] == "stage"
                lease.wait(timeout=30)  # the fill ran after the copy
            assert "copy from the files (through the page cache)" in sd.log()  # just written: cached
            log = wait_log(sd, "filled model=org/m")
            assert "fill released model=org/m variant=hf (after the GPU copy)" in log
            assert log.index("gpu copy model=org/m") < log.index("fill started model=org/m")
            with c.acquire("org/m", gpu_first=True) as lease:  # a hit: from the tier, nothing held
                assert not lease._fill_held
                stats, got = copy_all(lease)
                assert got == expected and stats["source"] == "tier"


def test_a_held_fill_starts_for_a_reader_or_after_the_limit(tmp_path: Path, fake_env: dict[str, str]) -> None:
    with sidecar(tmp_path, env=fake_env) as sd:
        wait_log(sd, f"gpu copy engine ready device={GPU0}")
        expected = make_model(sd.store, "org/a", tensors=3)
        make_model(sd.store, "org/b", tensors=3, seed=1)
        with sd.connect() as c:
            with c.acquire("org/a", gpu_first=True) as lease:  # reads the segments instead: asks for the fill
                assert {n: t.numpy().tobytes() for n, t in lease.tensors(timeout=30).items()} == expected
            assert "fill released model=org/a variant=hf (pid" in wait_log(sd, "fill released model=org/a")
            with c.acquire("org/b", gpu_first=True):  # holds the lease, never copies
                log = wait_log(sd, "filled model=org/b", timeout=10)
                assert "fill released model=org/b variant=hf (no GPU copy asked within 2 s)" in log


def test_a_loader_reading_cpu_views_is_not_held(tmp_path: Path, fake_env: dict[str, str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The frameworks' any-TP path reads the hf variant as CPU views: its lease says so (gpu_first=False) and
    the fill starts at the acquire, beside the model's build; a lease the sidecar copies to a GPU is held."""
    from sllmfs.integrations.common.source import SidecarSource, weights_as_filled

    monkeypatch.delenv("SLLMFS_GPU_COPY", raising=False)  # the sidecar copies to GPUs (its default)

    with sidecar(tmp_path, env=fake_env) as sd:
        wait_log(sd, f"gpu copy engine ready device={GPU0}")
        expected = make_model(sd.store, "org/cpu", tensors=3)
        make_model(sd.store, "org/gpu", tensors=3, seed=1)
        source = SidecarSource("org/cpu", str(sd.socket))
        with source.open("hf", gpu_first=False) as lease:
            assert "filled model=org/cpu" in wait_log(sd, "filled model=org/cpu")  # nobody asked for it
            assert {n: t.numpy().tobytes() for n, t in weights_as_filled(lease)} == expected
        with SidecarSource("org/gpu", str(sd.socket)).open("hf"):
            assert "gpu first model=org/gpu" in wait_log(sd, "gpu first model=org/gpu")
        log = sd.log()
        assert "gpu first model=org/cpu" not in log and "fill released model=org/cpu" not in log


@pytest.mark.parametrize("view", ["buffers", "tensors", "numpy"])
def test_views_taken_without_waiting_ask_for_the_held_fill(tmp_path: Path, fake_env: dict[str, str],
                                                          view: str) -> None:
    """A caller that takes the views first and polls readiness itself (wait=False) gets its fill at once,
    not after the 2 s a lease with no copy is held for."""
    with sidecar(tmp_path, env=fake_env) as sd:
        wait_log(sd, f"gpu copy engine ready device={GPU0}")
        expected = make_model(sd.store, "org/v", tensors=3)
        with sd.connect() as c, c.acquire("org/v", gpu_first=True) as lease:
            assert lease._fill_held
            views = lease.buffers() if view == "buffers" else getattr(lease, view)(wait=False)
            log = wait_log(sd, "fill released model=org/v", timeout=10)
            assert "fill released model=org/v variant=hf (pid" in log  # asked by this reader, not the limit
            lease.wait(timeout=30)
            if view == "buffers":
                assert sum(len(b) for b in views) == sum(lease.sizes)
            else:
                got = {n: (t.numpy() if view == "tensors" else t).tobytes() for n, t in views.items()}
                assert got == expected


def uncache(store: Path) -> None:
    """Drop the stored files from the page cache (skips the test where the filesystem keeps them: tmpfs)."""
    for data in (store / "models").rglob("*.safetensors"):
        fd = os.open(data, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            page = bytearray(4096)
            try:
                cached = os.preadv(fd, [page], 0, os.RWF_NOWAIT) > 0
            except OSError:
                cached = False
        finally:
            os.close(fd)
        if cached:
            pytest.skip("this filesystem keeps the files in memory (tmpfs): cannot make them uncached")


@pytest.mark.parametrize("cold", [False, True], ids=["page-cache", "O_DIRECT-tee"])
def test_a_damaged_file_fails_the_copy_and_the_model(tmp_path: Path, fake_env: dict[str, str], cold: bool) -> None:
    """Cold, the copy tees what it reads into the tier: the damaged window is never published, the windows
    it did verify are not enough, and the fill refuses the model all the same."""
    with sidecar(tmp_path, env={**fake_env, "SLLMFS_COPY_DIRECT": "1"}) as sd:
        wait_log(sd, f"gpu copy engine ready device={GPU0}")
        make_model(sd.store, "org/m", tensors=4, nbytes=2 << 20)
        data = next((sd.store / "models").rglob("*.safetensors"))
        with open(data, "r+b") as f:  # one byte of the second window, after save recorded its digest
            f.seek((4 << 20) + 5)
            b = f.read(1)
            f.seek((4 << 20) + 5)
            f.write(bytes([b[0] ^ 0xFF]))
        if cold:
            uncache(sd.store)
        with sd.connect() as c:
            with c.acquire("org/m", gpu_first=True) as lease:
                why = (r"org/m.* failed verification: copying its stored files: model.safetensors: checksum window 1 "
                       r".* differs")
                with pytest.raises(Corrupt, match=why):
                    copy_all(lease)
            wait_log(sd, "fill failed model=org/m")
            with pytest.raises(Corrupt):  # refused until saved again, as a failed fill's model is
                c.acquire("org/m", gpu_first=True)
            assert c.status()["pid"] > 0  # serving everyone else
        assert ("copy from the files (O_DIRECT)" in sd.log()) is cold


@pytest.mark.parametrize("copy_direct", [False, True], ids=["buffered", "O_DIRECT"])
def test_from_disk_too_the_copy_reads_the_files(tmp_path: Path, fake_env: dict[str, str], copy_direct: bool) -> None:
    """Files the page cache does not hold: the copy reads them from disk (checked; with --copy-direct past
    the page cache), then the fill runs."""
    env = {**fake_env, "SLLMFS_COPY_DIRECT": "1" if copy_direct else "0"}
    with sidecar(tmp_path, env=env) as sd:
        wait_log(sd, f"gpu copy engine ready device={GPU0}")
        expected = {n: digest(v) for n, v in make_model(sd.store, "org/m", tensors=4, nbytes=2 << 20).items()}
        uncache(sd.store)
        with sd.connect() as c, c.acquire("org/m", gpu_first=True) as lease:
            assert lease._fill_held
            stats, got = copy_all(lease)
            assert got == expected and stats["source"] == "files"
            lease.wait(timeout=30)
        # the sample finds (almost) nothing cached: its one-page probes of the skip check above may be
        how = r"\(O_DIRECT\)" if copy_direct else r"\(through the page cache\)"
        assert re.search(r"page_cache_share=0\.[01]\d: copy from the files " + how, sd.log())
        # past the page cache the copy's reads also fill the tier (its tee): the fill reads nothing again
        total = sum(f.stat().st_size for f in (sd.store / "models").rglob("*.safetensors"))
        wait_log(sd, "filled model=org/m")
        teed = int(re.findall(r"gpu copy model=org/m .* teed_bytes=(\d+)", sd.log())[-1])
        adopted, read = map(int, re.findall(r"filled model=org/m .* from_the_gpu_copy=(\d+) read=(\d+)",
                                            sd.log())[-1])
        assert teed == adopted == (total if copy_direct else 0)
        assert read == (0 if copy_direct else total)  # the fill read only what the copy did not publish
        with sd.connect() as c, c.acquire("org/m", gpu_first=True) as lease:  # a hit: from the tier's bytes
            stats, got = copy_all(lease)
            assert got == expected and stats["source"] == "tier"
