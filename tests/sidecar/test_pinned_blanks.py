"""Blanks pinned for GPU copies at start (NOTES-cold run 9): a segment made of one keeps its pins, so
a tier-empty load pins nothing on its path; every pin is given back before its pages are unmapped.

Against the stand-in CUDA runtime (tests/support/cudart.py), whose pin table follows the driver's
rules (a page pinned twice is 712, an unpin needs the exact start, a copy spanning two pins is
refused and counted): in this process, so the test reads that table (fake_pins) after each step;
and through the daemon, where a load into a segment made of a pinned blank reports no new pins."""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sllmfs.sidecar import gpucopy, memtier, prefault
from sllmfs.sidecar.fill import Fill
from sllmfs.store.format import digest, load_manifest
from sllmfs.store.reader import variant_identity
from tests.support.cudart import FAKE_PEER_CUDART, memfd_handle
from tests.support.hugepages import reserved_hugepages
from tests.support.sidecar import make_model, sidecar, wait_log

MiB = 1 << 20
pytestmark = pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler for the fake CUDA runtime")


@pytest.fixture
def hugepages() -> Iterator[int]:
    """192 more 2 MiB pages reserved for the test (root), given back after."""
    with reserved_hugepages(192) as free:
        yield free


_FAKE: dict[str, Any] = {}  # one stand-in per process: the native module opens the runtime once


@pytest.fixture
def fake_cuda(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> ctypes.CDLL:
    """The stand-in runtime the copy engines of this process use; its pin table is shared by the tests
    in it, so each counts from its own start (``base``)."""
    if "handle" not in _FAKE:
        d = tmp_path_factory.mktemp("fakecudart")
        lib = d / "libfakecudart.so"
        (d / "fake.c").write_text(FAKE_PEER_CUDART)
        subprocess.run(["cc", "-O1", "-shared", "-fPIC", "-pthread", "-o", str(lib), str(d / "fake.c")], check=True)
        fake = ctypes.CDLL(str(lib))  # the handle the engine opens too: one pin table
        fake.fake_pins.restype = ctypes.c_int
        fake.fake_bad_copies.restype = ctypes.c_longlong
        _FAKE.update(lib=lib, handle=fake)
    monkeypatch.setenv("SLLMFS_CUDART", str(_FAKE["lib"]))
    return _FAKE["handle"]


def _copy_to_fake_gpu(gpu: gpucopy.GpuCopier, res: memtier.Resident, expected: dict[str, bytes]) -> dict:
    """load_ipc as the op runs it: the client's "GPU memory" is a memfd the fake maps through its handle."""
    total = sum(len(v) for v in expected.values())
    fd = os.memfd_create("fake-gpu0")
    try:
        os.ftruncate(fd, total)
        handle = memfd_handle(fd, total)
        blocks = [{"handle": handle, "size": total, "device": "0000:00:06.0"}]
        at, where, pieces = 0, {}, []
        for name, t in res.manifest.tensors.items():
            pieces.append([t.partition, t.offset, 0, at, t.nbytes])
            where[name] = (at, t.nbytes)
            at += t.nbytes
        stats, close = gpu.copy(res, blocks, pieces, 60.0)
        close()
        got = {n: os.pread(fd, k, a) for n, (a, k) in where.items()}
    finally:
        os.close(fd)
    assert {n: digest(v) for n, v in got.items()} == {n: digest(v) for n, v in expected.items()}
    return stats


def test_a_resident_made_of_pinned_blanks_pins_nothing_and_gives_every_pin_back(
        tmp_path: Path, hugepages: int, fake_cuda: ctypes.CDLL, monkeypatch: pytest.MonkeyPatch) -> None:
    for mod in (prefault, memtier, gpucopy):
        monkeypatch.setattr(mod, "PIN_PIECE", 8 * MiB)  # a 64 MiB blank: eight pins
    monkeypatch.setenv("SLLMFS_RELAY", "off")  # one link: the copy's pins are all the registrars'
    gpu = gpucopy.GpuCopier()
    assert gpu.warm_up() == ["0000:00:06.0", "0000:00:07.0"]
    base = fake_cuda.fake_pins()
    tier = memtier.MemoryTier(512 * MiB)
    prefault.make_blanks(tier.blanks, budget=192 * MiB, threads=2, size=64 * MiB)
    tier.release_pins = gpu.release
    assert tier.blanks.pin_all(gpu.pin_blank) == 3
    assert fake_cuda.fake_pins() == base + 24  # the second engine shares the first's pins

    store = tmp_path / "store"
    cases = {"org/whole": (4, 16 * MiB), "org/cut": (5, 4 * MiB)}  # 64 MiB; 20 MiB, its blank shrunk
    for name, (tensors, nbytes) in cases.items():
        expected = make_model(store, name, tensors=tensors, nbytes=nbytes, seed=len(name), aligned=True)
        vdir = store / "models" / name.replace("/", "%2F") / "variants" / "hf"
        res = tier.reserve(name, "hf", load_manifest(vdir), variant_identity(vdir))
        assert res.timeline.from_blanks == res.timeline.pinned_blanks == 1 and res.segments[0].pinned
        assert res.unpin is not None
        fill = Fill(res, vdir, 8 * MiB)
        fill.worker()
        fill.close()
        assert not fill.error
        res.state = "ready"
        stats = _copy_to_fake_gpu(gpu, res, expected)
        # every page came pinned: a cut blank keeps the piece crossing its end (the copy reads through it)
        assert stats["newly_registered_bytes"] == 0 and stats["register_calls"] == 0
        assert tier.evict(name, "hf") == [res]
    assert fake_cuda.fake_bad_copies() == 0
    assert fake_cuda.fake_pins() == base + 8  # the two residents' pins all given back; the third blank's held
    tier.close_all()
    assert fake_cuda.fake_pins() == base
    for engine, _lock in gpu._pairs():
        engine.close()


def test_the_daemon_pins_its_blanks_at_start_and_a_load_into_one_pins_nothing(
        tmp_path: Path, hugepages: int, fake_cuda: ctypes.CDLL) -> None:
    env = {"SLLMFS_CUDART": os.environ["SLLMFS_CUDART"]}
    with sidecar(tmp_path, "--mem-pool-size", "256MiB", env=env) as sd:
        wait_log(sd, "as blank segments")
        deadline = time.monotonic() + 30  # pinned as they are made, or once the engines exist
        while (mem := sd.status()["memory"])["blanks_pinned"] < mem["blanks"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert mem["blanks_pinned"] == mem["blanks"] > 0
        # one 64 MiB partition: a blank (the aligned layout, as a per-rank variant)
        expected = make_model(sd.store, "org/m", tensors=4, nbytes=16 * MiB, aligned=True)
        with sd.connect() as c, c.acquire("org/m") as lease:
            total = sum(len(v) for v in expected.values())
            fd = os.memfd_create("fake-gpu0")
            os.ftruncate(fd, total)
            handle = memfd_handle(fd, total)
            at, where, pieces = 0, {}, []
            for name, ref in lease.entries.items():
                pieces.append([ref.partition, ref.offset, 0, at, ref.nbytes])
                where[name] = (at, ref.nbytes)
                at += ref.nbytes
            stats = lease.copy_to_gpu([{"handle": handle, "size": total, "device": "0000:00:06.0"}], pieces, 60)
            mem = np.memmap(f"/proc/self/fd/{fd}", dtype=np.uint8, mode="r", shape=(total,))
            got = {n: bytes(mem[a:a + k]) for n, (a, k) in where.items()}
            del mem
            os.close(fd)
        assert got == expected
        assert stats["newly_registered_bytes"] == 0 and stats["tier_from_blanks"] == 1
        with sd.connect() as c:
            assert c.evict("org/m") == ["hf"]  # its pins given back, then its pages
            with c.acquire("org/m") as lease:  # filled again into the next pinned blank
                assert {k: v.tobytes() for k, v in lease.numpy().items()} == expected
        assert "Traceback" not in sd.log()


def test_the_daemon_unpins_a_cut_blanks_pieces_past_the_end_after_the_load(
        tmp_path: Path, fake_cuda: ctypes.CDLL) -> None:
    """Through the daemon: a 100 MiB partition in a 512 MiB blank (a 2 GiB pool makes blanks that size: two
    pin pieces) loads without pinning anything, then the after-fill pin gives back the piece past its end
    and the memory the tier counts falls by it (NOTES-cold run 13)."""
    env = {"SLLMFS_CUDART": os.environ["SLLMFS_CUDART"]}
    with reserved_hugepages(640), sidecar(tmp_path, "--mem-pool-size", "2GiB", env=env) as sd:
        wait_log(sd, "as blank segments")
        deadline = time.monotonic() + 30
        while (mem := sd.status()["memory"])["blanks_pinned"] < mem["blanks"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert mem["blanks_pinned"] == mem["blanks"] >= 512 * MiB
        expected = make_model(sd.store, "org/cut", tensors=5, nbytes=20 * MiB, aligned=True)  # one 100 MiB partition
        with sd.connect() as c, c.acquire("org/cut") as lease:
            total = sum(len(v) for v in expected.values())
            fd = os.memfd_create("fake-gpu0")
            os.ftruncate(fd, total)
            at, where, pieces = 0, {}, []
            for name, ref in lease.entries.items():
                pieces.append([ref.partition, ref.offset, 0, at, ref.nbytes])
                where[name] = (at, ref.nbytes)
                at += ref.nbytes
            stats = lease.copy_to_gpu([{"handle": memfd_handle(fd, total), "size": total, "device": "0000:00:06.0"}],
                                      pieces, 60)
            got = {n: os.pread(fd, k, a) for n, (a, k) in where.items()}
            os.close(fd)
        assert got == expected
        assert stats["newly_registered_bytes"] == 0 and stats["tier_from_blanks"] == 1
        assert stats["tier_cut_s"] < 1.0
        log = wait_log(sd, "unpinned_past_end=")
        assert f"unpinned_past_end={256 * MiB}" in log
        deadline = time.monotonic() + 10
        while (used := sd.status()["memory"]["used"]) > 256 * MiB + MiB and time.monotonic() < deadline:
            time.sleep(0.05)
        assert 100 * MiB < used <= 256 * MiB + MiB  # the partition and the piece crossing its end, no more
        assert "Traceback" not in sd.log()


def test_a_model_with_a_small_partition_copies_in_register_mode_from_pinned_blanks(
        tmp_path: Path, hugepages: int, fake_cuda: ctypes.CDLL, monkeypatch: pytest.MonkeyPatch) -> None:
    """A partition that is not whole 2 MiB pages (here 3 MiB) is not made of a blank (holds no pins): the
    after-fill pin still pins every segment whole, or the copy engine stages the whole model (review)."""
    from safetensors.numpy import save_file

    from sllmfs.store.save import save_model
    from sllmfs.store.store import Store

    monkeypatch.setenv("SLLMFS_RELAY", "off")
    gpu = gpucopy.GpuCopier()
    gpu.warm_up()
    rng = np.random.default_rng(1)
    arrays = {f"a.{i}": rng.standard_normal(16 * MiB // 4).astype(np.float32) for i in range(4)}
    arrays["z.small"] = rng.standard_normal(3 * MiB // 4).astype(np.float32)
    src = tmp_path / "src"
    src.mkdir()
    save_file(arrays, str(src / "model.safetensors"))
    (src / "config.json").write_text('{"model_type": "test"}')
    store = Store(tmp_path / "store")
    save_model(store, "org/mixed", src, partition_target=64 * MiB)
    vdir = store.variant_path("org/mixed", "hf")
    man = load_manifest(vdir)
    assert len(man.partitions) == 2  # 64 MiB and the 3 MiB tail
    tier = memtier.MemoryTier(512 * MiB)
    prefault.make_blanks(tier.blanks, budget=128 * MiB, threads=2, size=64 * MiB)
    tier.release_pins = gpu.release
    assert tier.blanks.pin_all(gpu.pin_blank) == 2
    res = tier.reserve("org/mixed", "hf", man, variant_identity(vdir))
    try:
        fill = Fill(res, vdir, 8 * MiB)
        fill.worker()
        fill.close()
        assert not fill.error
        res.state = "ready"
        gpu.pin(res)  # what the fill's end does
        assert res.gpu_pinned
        expected = {k: v.tobytes() for k, v in arrays.items()}
        modes = [_copy_to_fake_gpu(gpu, res, expected)["mode"] for _ in range(2)]
        assert modes == ["register", "register"]
    finally:
        tier.evict("org/mixed", "hf")
        tier.close_all()


def test_a_blank_pass_that_fails_does_not_stop_the_daemon(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """The pass runs after every eviction and fill now: an error in it (EMFILE, say) is one log line,
    and the next pass may run (review)."""
    import errno
    import logging

    import trio

    from sllmfs.sidecar.cache import Cache

    def broken(*args: object, **kw: object) -> None:
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(prefault, "run", broken)
    cache = Cache.__new__(Cache)  # only what blank_pass reads
    cache._blanking, cache._blank_again = False, False
    cache.tier = memtier.MemoryTier(64 * MiB)
    cache.settings = type("S", (), {"num_thread": 2})()  # type: ignore[assignment]
    with caplog.at_level(logging.ERROR):
        trio.run(cache.blank_pass)
        trio.run(cache.blank_pass)
    assert caplog.text.count("making blank segments failed") == 2 and not cache._blanking


def _cut_setup(tmp_path: Path, fake_cuda: ctypes.CDLL, monkeypatch: pytest.MonkeyPatch, name: str,
               budget: int = 512 * MiB) -> tuple[gpucopy.GpuCopier, memtier.MemoryTier, memtier.Resident,
                                                 dict[str, bytes], int]:
    """A 20 MiB partition reserved from a 64 MiB blank pinned in 8 MiB pieces (8 pins), two engines."""
    for mod in (prefault, memtier, gpucopy):
        monkeypatch.setattr(mod, "PIN_PIECE", 8 * MiB)
    monkeypatch.setenv("SLLMFS_RELAY", "off")
    gpu = gpucopy.GpuCopier()
    assert len(gpu.warm_up()) == 2  # the pieces are shared: each unpin must reach both engines
    base = fake_cuda.fake_pins()
    tier = memtier.MemoryTier(budget)
    prefault.make_blanks(tier.blanks, budget=64 * MiB, threads=2, size=64 * MiB)
    tier.release_pins = gpu.release
    assert tier.blanks.pin_all(gpu.pin_blank) == 1
    expected = make_model(tmp_path / "store", name, tensors=5, nbytes=4 * MiB, aligned=True)
    vdir = tmp_path / "store" / "models" / name.replace("/", "%2F") / "variants" / "hf"
    res = tier.reserve(name, "hf", load_manifest(vdir), variant_identity(vdir))
    return gpu, tier, res, expected, base


def test_a_cut_blank_is_sealed_at_its_size_and_unpins_past_its_end_only_after_the_load(
        tmp_path: Path, hugepages: int, fake_cuda: ctypes.CDLL, monkeypatch: pytest.MonkeyPatch) -> None:
    """The reserve shrinks the memfd and seals its size (a client never sees it resizable) but unpins
    nothing (NOTES-cold run 13: the unpins were all of the reserve's 36-43 ms on the H200): the copy
    behind the fill reads the last bytes through the piece crossing the end, pinning nothing; the
    after-fill pin gives back the pieces past the end (their pages return to the hugetlb pool there,
    not at the shrink), and the tier counts those pages until then."""
    free_before = prefault.hugepages_free()[0]
    gpu, tier, res, expected, base = _cut_setup(tmp_path, fake_cuda, monkeypatch, "org/cut")
    bad = fake_cuda.fake_bad_copies()
    seg = res.segments[0]
    assert seg.length == 20 * MiB and os.fstat(seg.fd).st_size == 20 * MiB
    import fcntl
    seals = fcntl.fcntl(seg.fd, fcntl.F_GET_SEALS)
    assert seals & memtier._SIZE_SEALS == memtier._SIZE_SEALS  # sized for good before any client
    assert seg.pinned and fake_cuda.fake_pins() == base + 8  # nothing unpinned on the reserve
    assert seg.past_end == 44 * MiB and res.nbytes == 64 * MiB + res.ready.length  # counted while held
    # (the stand-in pins no pages: that pinned pages past the end stay allocated until their unpin is the
    # real driver's part, checked on the GPU machine by bench/truncate_pinned.py)
    fill = Fill(res, res_dir(tmp_path, "org/cut"), 8 * MiB)
    fill.worker()
    fill.close()
    assert not fill.error
    res.state = "ready"
    stats = _copy_to_fake_gpu(gpu, res, expected)  # the load streaming behind the fill: nothing to pin
    assert stats["mode"] == "register" and stats["newly_registered_bytes"] == 0
    gpu.pin(res)
    assert res.gpu_pinned and fake_cuda.fake_pins() == base + 3  # 0-8, 8-16 and the one crossing 20
    assert seg.past_end == 4 * MiB and res.nbytes == 24 * MiB + res.ready.length
    stats = _copy_to_fake_gpu(gpu, res, expected)  # a hit: the same pins
    assert stats["mode"] == "register" and stats["newly_registered_bytes"] == 0
    assert fake_cuda.fake_bad_copies() == bad
    assert tier.evict("org/cut", "hf") == [res]
    assert fake_cuda.fake_pins() == base and prefault.hugepages_free()[0] == free_before
    tier.close_all()
    for engine, _lock in gpu._pairs():
        engine.close()


def test_a_cut_blank_evicted_before_its_after_fill_pin_gives_back_every_piece(
        tmp_path: Path, hugepages: int, fake_cuda: ctypes.CDLL, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failed or dropped fill never reaches the after-fill pin: closing the segment unpins the pieces
    past its end too (none left pinned on unmapped memory), and a late pin finds nothing to drop."""
    free_before = prefault.hugepages_free()[0]
    gpu, tier, res, _expected, base = _cut_setup(tmp_path, fake_cuda, monkeypatch, "org/gone")
    assert fake_cuda.fake_pins() == base + 8
    res.state = "failed"  # as a fill that failed leaves it (the cache then drops it)
    tier.drop(res, why="fill failed")
    assert res.closed and fake_cuda.fake_pins() == base and prefault.hugepages_free()[0] == free_before
    assert res.segments[0].drop_past_end() == 0
    tier.close_all()
    for engine, _lock in gpu._pairs():
        engine.close()


def test_pages_held_past_an_end_go_before_a_load_is_refused_or_a_model_evicted(
        tmp_path: Path, hugepages: int, fake_cuda: ctypes.CDLL, monkeypatch: pytest.MonkeyPatch) -> None:
    """The pieces past a filling segment's end count in the budget until the after-fill pin; a reserve
    that needs their room meanwhile gives them back itself (no copy reads them) instead of refusing
    (review): 20 MiB + 44 MiB held of an 80 MiB budget, and a second 20 MiB model arrives."""
    gpu, tier, first, _expected, base = _cut_setup(tmp_path, fake_cuda, monkeypatch, "org/first", budget=80 * MiB)
    assert first.state == "filling" and first.segments[0].past_end == 44 * MiB
    make_model(tmp_path / "store", "org/second", tensors=5, nbytes=4 * MiB, aligned=True)
    vdir = res_dir(tmp_path, "org/second")
    second = tier.reserve("org/second", "hf", load_manifest(vdir), variant_identity(vdir))
    assert tier.entries.keys() == {("org/first", "hf"), ("org/second", "hf")}  # nothing refused or evicted
    assert first.segments[0].past_end == 4 * MiB and fake_cuda.fake_pins() == base + 3
    assert tier.used <= tier.budget
    _fail_and_close(gpu, tier, fake_cuda, base, first, second)


def test_a_passthrough_copy_gets_the_room_of_pages_held_past_an_end(
        tmp_path: Path, hugepages: int, fake_cuda: ctypes.CDLL, monkeypatch: pytest.MonkeyPatch) -> None:
    """The mount's copy of a file counts in the budget too: held pages past a filling segment's end make
    room for it rather than refusing it (review)."""
    gpu, tier, first, _expected, base = _cut_setup(tmp_path, fake_cuda, monkeypatch, "org/first", budget=80 * MiB)
    assert first.busy and first.segments[0].past_end == 44 * MiB
    assert tier.hold_copy(40 * MiB, ("org/first", "hf"))  # 64 + 40 > 80 until the 40 MiB past the end go
    assert first.segments[0].past_end == 4 * MiB and tier.used <= tier.budget
    assert not tier.hold_copy(40 * MiB, ("org/first", "hf"))  # nothing more to give back: refused
    tier.free_copy(40 * MiB)
    _fail_and_close(gpu, tier, fake_cuda, base, first)


def _fail_and_close(gpu: gpucopy.GpuCopier, tier: memtier.MemoryTier, fake_cuda: ctypes.CDLL, base: int,
                    *residents: memtier.Resident) -> None:
    """Fail and drop ``residents`` as a failed fill would; then every pin is back and all is closed."""
    for res in residents:
        res.state = "failed"
        tier.drop(res, why="fill failed")
    assert fake_cuda.fake_pins() == base
    tier.close_all()
    for engine, _lock in gpu._pairs():
        engine.close()


def res_dir(tmp_path: Path, name: str) -> Path:
    return tmp_path / "store" / "models" / name.replace("/", "%2F") / "variants" / "hf"
