"""Copy engine on the host target: the same pipeline as on a GPU, with memcpy for the device copy."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from sllmfs.engine import copy_engine as ce
from sllmfs.protocol.messages import Readiness

MiB = 1 << 20
MODES = ["auto", "stage", "register", "hybrid"]


def memfd_segment(data: np.ndarray) -> tuple[int, object]:
    fd = os.memfd_create("test-seg")
    os.ftruncate(fd, data.nbytes)
    os.pwrite(fd, data.tobytes(), 0)
    return fd, ce.map_segment(fd, data.nbytes)


@pytest.fixture
def segments():
    rng = np.random.default_rng(7)
    datas = [rng.integers(0, 256, n, dtype=np.uint8) for n in (21 * MiB + 123, 9 * MiB, 4096)]
    fds, maps = zip(*(memfd_segment(d) for d in datas), strict=True)
    yield datas, maps
    for m in maps:
        m.close()  # type: ignore[attr-defined]
    for fd in fds:
        os.close(fd)


def tensor_pieces(datas, rng, dst_base):
    """Many tensors: odd sizes, unaligned offsets, 0-byte pieces, a source read twice (tied weights)."""
    rows, expect_parts, cur = [], [], 0
    for s, d in enumerate(datas):
        off = 0
        while off < d.nbytes:
            n = int(min(d.nbytes - off, rng.choice([0, 1, 7, 4095, 4097, 65537, 3 * MiB + 5, 5 * MiB])))
            rows.append((s, off, cur, n))
            expect_parts.append((cur, d[off : off + n]))
            cur += n + int(rng.integers(0, 3)) * 13  # unaligned destinations with gaps
            off += n + (int(rng.integers(0, 2)) if n else 1)
    rows.append((0, 100, cur, 5000))  # the same source bytes again
    expect_parts.append((cur, datas[0][100:5100]))
    total = cur + 5000
    expect = np.full(total, 0xAB, np.uint8)
    for at, part in expect_parts:
        expect[at : at + part.size] = part
    pieces = np.array(rows, dtype=np.uint64)
    pieces[:, 2] += np.uint64(dst_base)
    return pieces, expect


def make_dst(n: int) -> np.ndarray:
    return np.full(n, 0xAB, np.uint8)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("chunk_mib", [2, 8])
def test_copy_matches_source(segments, mode, chunk_mib):
    datas, maps = segments
    rng = np.random.default_rng(chunk_mib)
    dst = make_dst(64 * MiB)
    pieces, expect = tensor_pieces(datas, rng, dst.ctypes.data)
    segs = [ce.Segment.from_buffer(m) for m in maps]
    with ce.CopyEngine(target="host", mode=mode, threads=2, chunk_bytes=chunk_mib * MiB, slot_bytes=MiB) as eng:
        for _ in range(2):  # the second copy reuses the ring and cached registrations
            dst[:] = 0xAB
            stats = eng.copy(segs, pieces)
            assert np.array_equal(dst[: expect.size], expect)
            assert (dst[expect.size :] == 0xAB).all()
    assert stats["bytes"] == int(pieces[:, 3].sum())
    assert stats["staged_bytes"] + stats["registered_bytes"] == stats["bytes"]
    assert stats["mode"] in ("stage", "register", "hybrid")


def test_empty_and_zero_byte_pieces(segments):
    _, maps = segments
    with ce.CopyEngine(target="host") as eng:
        assert eng.copy([], np.zeros((0, 4), np.uint64))["bytes"] == 0
        st = eng.copy([ce.Segment.from_buffer(maps[0])], np.array([[0, 5, 12345, 0]], np.uint64))
        assert st["bytes"] == 0


def test_readiness_arrives_during_copy(segments):
    datas, maps = segments
    data, cs = datas[0], 4 * MiB
    ready = np.zeros(-(-data.nbytes // cs), np.uint8)
    dst = make_dst(data.nbytes)
    pieces = np.array([[0, o, dst.ctypes.data + o, min(MiB, data.nbytes - o)] for o in range(0, data.nbytes, MiB)])
    started = threading.Event()

    def fill() -> None:
        for i in range(ready.size - 1):  # all but the last chunk, out of order
            ready[(i * 3) % (ready.size - 1)] = Readiness.READY
            time.sleep(0.002)
        started.wait(10)  # the copy has moved bytes while the last chunk is still pending
        ready[-1] = Readiness.READY

    seen: list[int] = []

    def progress(done: int, total: int) -> None:
        seen.append(done)
        if done > 0:
            started.set()

    th = threading.Thread(target=fill)
    with ce.CopyEngine(target="host", threads=2, chunk_bytes=4 * MiB) as eng:
        th.start()
        stats = eng.copy([ce.Segment.from_buffer(maps[0], ready, cs)], pieces, timeout=10, progress=progress)
    th.join()
    assert started.is_set(), "the copy waited for every chunk before starting"
    assert np.array_equal(dst, data)
    assert seen[-1] == stats["bytes"] == data.nbytes


def test_failed_chunk_names_segment_and_offset(segments):
    datas, maps = segments
    cs = 2 * MiB
    ready = np.ones(-(-datas[1].nbytes // cs), np.uint8)
    ready[3] = Readiness.FAILED
    dst = make_dst(datas[1].nbytes)
    pieces = np.array([[1, 0, dst.ctypes.data, datas[1].nbytes]], np.uint64)
    segs = [ce.Segment.from_buffer(maps[0]), ce.Segment.from_buffer(maps[1], ready, cs)]
    with ce.CopyEngine(target="host", threads=2, chunk_bytes=2 * MiB) as eng, pytest.raises(ce.ChunkFailed) as err:
        eng.copy(segs, pieces, timeout=5)
    assert "segment 1" in str(err.value) and str(3 * cs) in str(err.value)


def test_readiness_never_arriving_times_out(segments):
    datas, maps = segments
    ready = np.zeros(-(-datas[1].nbytes // (4 * MiB)), np.uint8)
    ready[0] = Readiness.READY
    dst = make_dst(datas[1].nbytes)
    pieces = np.array([[0, 0, dst.ctypes.data, datas[1].nbytes]], np.uint64)
    t = time.monotonic()
    with ce.CopyEngine(target="host", threads=2) as eng:
        with pytest.raises(ce.ReadinessTimeout, match="not ready"):
            eng.copy([ce.Segment.from_buffer(maps[1], ready, 4 * MiB)], pieces, timeout=0.3)
        ready[:] = Readiness.READY  # the same engine works once the data is there
        eng.copy([ce.Segment.from_buffer(maps[1], ready, 4 * MiB)], pieces, timeout=5)
    assert time.monotonic() - t < 10
    assert np.array_equal(dst, datas[1])


@pytest.mark.parametrize(
    "row, needle",
    [((0, 21 * MiB, 0, 1 * MiB), "outside segment 0"), ((5, 0, 0, 10), "segment 5 does not exist")],
)
def test_bad_piece_is_refused_before_copying(segments, row, needle):
    _, maps = segments
    dst = make_dst(2 * MiB)
    good = (0, 0, dst.ctypes.data, 100)
    bad = (row[0], row[1], dst.ctypes.data, row[3])
    with ce.CopyEngine(target="host") as eng, pytest.raises(ce.BadPieces, match=needle):
        eng.copy([ce.Segment.from_buffer(maps[0])], np.array([good, bad], np.uint64))
    assert (dst == 0xAB).all()  # validation happens before any byte moves


def test_pieces_shape_and_short_segment(segments, tmp_path: Path):
    _, maps = segments
    with ce.CopyEngine(target="host") as eng, pytest.raises(ce.BadPieces):
        eng.copy([ce.Segment.from_buffer(maps[0])], np.zeros((2, 3), np.uint64))
    fd = os.memfd_create("short")
    os.ftruncate(fd, 4096)
    with pytest.raises(ce.ShortSegment, match="4096 bytes"):
        ce.map_segment(fd, 8192)
    os.close(fd)
    with pytest.raises(ce.BadPieces):
        ce.Segment.from_buffer(maps[0], np.zeros(1, np.uint8), 4 * MiB)  # readiness too short


def test_progress_exception_stops_the_copy(segments):
    datas, maps = segments
    ready = np.zeros(-(-datas[0].nbytes // (4 * MiB)), np.uint8)  # never ready: only progress can end it

    def boom(done: int, total: int) -> None:
        raise KeyError("stop")

    dst = make_dst(datas[0].nbytes)
    pieces = np.array([[0, 0, dst.ctypes.data, datas[0].nbytes]], np.uint64)
    with ce.CopyEngine(target="host", threads=1) as eng, pytest.raises(KeyError):
        eng.copy([ce.Segment.from_buffer(maps[0], ready, 4 * MiB)], pieces, timeout=30, progress=boom)


def test_engine_arguments_are_checked():
    with pytest.raises(ValueError):
        ce.CopyEngine(target="tpu")
    with pytest.raises(ValueError):
        ce.CopyEngine(target="host", mode="fast")
    with pytest.raises(ce.CopyError, match="2 MiB"):
        ce.CopyEngine(target="host", chunk_bytes=3 * MiB)


def test_cuda_without_gpu_is_one_clear_line():
    try:
        import torch

        if torch.cuda.is_available():
            pytest.skip("a GPU is present")
    except ImportError:
        pass
    code = "from sllmfs.engine.copy_engine import CopyEngine; CopyEngine(target='cuda')"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode != 0
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("sllmfs.engine.errors.CudaUnavailable:") and "CUDA" in last


FAKE_CUDART = r"""
#include <stdlib.h>
#include <string.h>
typedef int E;
E cudaSetDevice(int d) { return d == 0 ? 0 : 101; }
E cudaGetDeviceCount(int* c) { *c = 1; return 0; }
E cudaDeviceSynchronize(void) { return 0; }
E cudaStreamCreateWithFlags(void** s, unsigned f) { *s = malloc(1); return 0; }
E cudaStreamDestroy(void* s) { free(s); return 0; }
E cudaStreamSynchronize(void* s) { return 0; }
E cudaEventCreateWithFlags(void** e, unsigned f) { *e = malloc(1); return 0; }
E cudaEventDestroy(void* e) { free(e); return 0; }
E cudaEventRecord(void* e, void* s) { return 0; }
E cudaEventSynchronize(void* e) { return 0; }
E cudaEventQuery(void* e) { return 0; }
E cudaMemcpyAsync(void* d, const void* s, size_t n, int k, void* st) {
  if ((size_t)d < 4096) return 1;
  memcpy(d, s, n);
  return 0;
}
E cudaHostRegister(void* p, size_t n, unsigned f) { return 0; }
E cudaHostUnregister(void* p) { return 0; }
E cudaHostAlloc(void** p, size_t n, unsigned f) { *p = malloc(n); return 0; }
E cudaFreeHost(void* p) { free(p); return 0; }
E cudaGetLastError(void) { return 0; }
const char* cudaGetErrorName(E e) { return e == 1 ? "cudaErrorInvalidValue" : "cudaErrorUnknown"; }
const char* cudaGetErrorString(E e) { return "invalid argument"; }
E cudaRuntimeGetVersion(int* v) { *v = 13000; return 0; }
E cudaPointerGetAttributes(void* a, const void* p) { memset(a, 0, 16); return 0; }
"""

FAKE_CLIENT = """
import sys, numpy as np
from sllmfs import _native
from sllmfs.engine.errors import CudaError
from sllmfs.engine.native import translate
src = np.random.default_rng(0).integers(0, 256, 9 << 20, dtype=np.uint8)
dst = np.zeros_like(src)
rows = np.array([[0, 0, dst.ctypes.data, 5], [0, 5, dst.ctypes.data + 5, src.size - 5]], np.uint64)
for mode in ("register", "stage", "hybrid"):
    eng = _native.Engine(target="cuda", mode=mode, threads=2, cudart=sys.argv[1], slot_bytes=1 << 20)
    dst[:] = 0
    eng.copy([(src.ctypes.data, src.size, 0, 0)], rows)
    assert (dst == src).all(), mode
    try:
        eng.copy([(src.ctypes.data, src.size, 0, 0)], np.array([[0, 0, 16, 100]], np.uint64))
    except _native.EngineError as e:
        err = translate(e)
        assert isinstance(err, CudaError), err
        print(err)
    eng.close()
"""


@pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler for the fake CUDA runtime")
def test_cuda_path_against_a_fake_runtime(tmp_path: Path):
    """The CUDA target's plumbing (dlopen, dlsym, streams, events, errors) with memcpy standing in for the GPU."""
    src = tmp_path / "fake.c"
    src.write_text(FAKE_CUDART)
    lib = tmp_path / "libcudart.so.13"
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(lib), str(src)], check=True)
    p = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(FAKE_CLIENT), str(lib)], capture_output=True, text=True, timeout=60
    )
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines() == ["cudaMemcpyAsync: cudaErrorInvalidValue (1): invalid argument"] * 3


@pytest.mark.parametrize("mode", ["stage", "register"])
def test_streaming_copy_reports_its_timeline(segments, mode):
    """The stats place the copy behind its fill: first and last block ready, pins, last block queued,
    all in seconds from the copy's start (bench_cold_stages --part warm-load reads them)."""
    datas, maps = segments
    data, cs = datas[0], 4 * MiB
    ready = np.zeros(-(-data.nbytes // cs), np.uint8)
    dst = make_dst(data.nbytes)
    pieces = np.array([[0, 0, dst.ctypes.data, data.nbytes]], np.uint64)
    held = 0.2  # the last window arrives this long after the copy started

    def fill() -> None:
        ready[:-1] = Readiness.READY
        time.sleep(held)
        ready[-1] = Readiness.READY

    th = threading.Thread(target=fill)
    with ce.CopyEngine(target="host", mode=mode, threads=2, chunk_bytes=4 * MiB) as eng:
        t0 = time.monotonic()
        th.start()
        st = eng.copy([ce.Segment.from_buffer(maps[0], ready, cs)], pieces, timeout=10)
        wall = time.monotonic() - t0
    th.join()
    assert np.array_equal(dst, data)
    assert 0 <= st["first_ready_seconds"] <= st["last_ready_seconds"] <= st["last_queued_seconds"] <= st["seconds"]
    assert st["seconds"] <= wall  # the order above is the contract; no bound on a loaded host's timing
    if mode == "stage":
        assert st["pin_start_seconds"] == st["pin_end_seconds"] == -1  # nothing pinned
    else:
        assert 0 <= st["pin_start_seconds"] <= st["pin_end_seconds"] <= st["last_queued_seconds"]
