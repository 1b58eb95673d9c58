"""Server-side copy pieces that run without a GPU: persistent registration, IPC refusals, runtime lookup."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from sllmfs.engine import copy_engine as ce
from tests.support.cudart import FAKE_IPC_CUDART

MiB = 1 << 20


@pytest.fixture
def segment():
    data = np.random.default_rng(3).integers(0, 256, 5 * MiB + 77, dtype=np.uint8)
    fd = os.memfd_create("test-ipc")
    os.ftruncate(fd, data.nbytes)
    os.pwrite(fd, data.tobytes(), 0)
    mm = ce.map_segment(fd, data.nbytes)
    yield data, mm
    mm.close()
    os.close(fd)


def test_register_is_cached_and_auto_copies_from_it(segment):
    data, mm = segment
    seg = ce.Segment.from_buffer(mm)
    dst = np.full(data.nbytes, 0xAB, np.uint8)
    pieces = np.array([[0, o, dst.ctypes.data + o, min(MiB, data.nbytes - o)] for o in range(0, data.nbytes, MiB)])
    with ce.CopyEngine(target="host", chunk_bytes=2 * MiB) as eng:
        first = eng.register(seg)
        assert first["cached"] is False and first["bytes"] >= data.nbytes
        assert eng.register(seg)["cached"] is True
        assert eng.registered_bytes >= data.nbytes
        st = eng.copy([seg], pieces)
        assert st["mode"] == "register" and st["newly_registered_bytes"] == 0  # auto: pinned segments go direct
        assert np.array_equal(dst, data)
        assert eng.release(seg) == 1 and eng.registered_bytes == 0
        assert eng.copy([seg], pieces)["mode"] == "stage"  # 4 KiB pages, no longer pinned


def test_host_target_refuses_ipc_in_one_line():
    with ce.CopyEngine(target="host") as eng:
        assert eng.bus_id == "host"
        with pytest.raises(ce.CopyError, match="target='cuda'") as ei:
            eng.open_ipc(b"\0" * 64, "0000:00:00.0")
        assert "\n" not in str(ei.value)
        with pytest.raises(ce.BadPieces, match="64 bytes"):
            eng.open_ipc(b"short", "0000:00:00.0")
        assert eng.open_ipc_count == 0


def test_copy_ipc_checks_the_plan_before_opening(segment):
    _, mm = segment
    blocks = [{"handle": b"\0" * 64, "size": 4096, "device": "0000:00:00.0"}]
    with ce.CopyEngine(target="host") as eng:
        seg = ce.Segment.from_buffer(mm)
        with pytest.raises(ce.BadPieces, match="block 1"):
            eng.copy_ipc([seg], blocks, [[0, 0, 1, 0, 16]])
        with pytest.raises(ce.BadPieces, match="past the end of block 0"):
            eng.copy_ipc([seg], blocks, [[0, 0, 0, 4000, 200]])
        with pytest.raises(ce.CopyError, match="target='cuda'"):
            eng.copy_ipc([seg], blocks, [[0, 0, 0, 0, 16]])
        assert eng.open_ipc_count == 0


def test_export_targets_refuses_cpu_tensors():
    torch = pytest.importorskip("torch")
    from sllmfs.engine.ipc import BadTarget, export_targets

    assert export_targets({}) == ([], {})
    with pytest.raises(BadTarget, match=r"'w' is on cpu.*CUDA tensors") as ei:
        export_targets({"w": torch.zeros(4)})
    assert isinstance(ei.value, ce.CopyError) and "\n" not in str(ei.value)
    with pytest.raises(BadTarget, match="not a torch.Tensor"):
        export_targets({"x": np.zeros(3)})  # type: ignore[dict-item]


def _without_torch(code: str, **env: str) -> dict:
    """Run code in a fresh interpreter that must not import torch; it prints one JSON line."""
    script = textwrap.dedent(code) + "\nassert 'torch' not in sys.modules, 'torch was imported'\n"
    p = subprocess.run([sys.executable, "-c", "import sys, json\n" + script], capture_output=True, text=True,
                       timeout=60, env={**os.environ, **env})
    assert p.returncode == 0, p.stderr[-2000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_missing_explicit_runtime_is_one_clear_line():
    out = _without_torch(
        """
        from sllmfs.engine import copy_engine as ce
        try:
            ce.CopyEngine(target="cuda")
            r = {"ok": True}
        except ce.CopyError as e:
            r = {"cls": type(e).__name__, "msg": str(e)}
        print(json.dumps(r))
        """,
        SLLMFS_CUDART="/nonexistent/libcudart.so.13",
    )
    assert out["cls"] == "CudaUnavailable"
    assert "SLLMFS_CUDART=/nonexistent/libcudart.so.13 does not exist" in out["msg"] and "\n" not in out["msg"]


def test_cuda_engine_without_torch_opens_or_fails_in_one_line():
    # Here: no GPU. Either no runtime is found ("no CUDA runtime could be opened (tried ...)") or the
    # runtime finds no device; on a GPU machine the engine simply starts. torch stays out either way.
    out = _without_torch(
        """
        from sllmfs.engine import copy_engine as ce
        from sllmfs.engine.cudart import wheel_cudart
        r = {"wheel": wheel_cudart()}
        try:
            eng = ce.CopyEngine(target="cuda")
            r.update(ok=True, bus=eng.bus_id)
            eng.close()
        except ce.CopyError as e:
            r.update(ok=False, cls=type(e).__name__, msg=str(e))
        print(json.dumps(r))
        """
    )
    assert out["wheel"] == "" or os.path.exists(out["wheel"])
    if not out["ok"]:
        assert out["cls"] == "CudaUnavailable" and "\n" not in out["msg"]
        assert "cuda" in out["msg"].lower()


@pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler for the fake CUDA runtime")
def test_sidecar_flow_against_a_fake_runtime(tmp_path):
    """register + copy_ipc through the CUDA target's plumbing, torch-free, as the sidecar runs it."""
    lib = tmp_path / "libfakecudart.so"
    (tmp_path / "fake.c").write_text(FAKE_IPC_CUDART)
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(lib), str(tmp_path / "fake.c")], check=True)
    out = _without_torch(
        f"""
        import ctypes, os, numpy as np
        from sllmfs.engine import copy_engine as ce
        fake = ctypes.CDLL({str(lib)!r})
        src = np.random.default_rng(1).integers(0, 256, 3 << 20, dtype=np.uint8)
        eng = ce.CopyEngine(target="cuda", device="0000:00:06.0", threads=2)
        seg = ce.Segment(src.ctypes.data, src.size, owners=(src,))
        r = {{"bus": eng.bus_id, "reg": eng.register(seg)["cached"], "again": eng.register(seg)["cached"]}}
        a, b = np.zeros(2 << 20, np.uint8), np.zeros(1 << 20, np.uint8)  # two client allocations
        blocks = [{{"handle": int(x.ctypes.data).to_bytes(8, "little") + bytes(56), "size": x.size,
                   "device": "0000:00:06.0"}} for x in (a, b)]
        pieces = [[0, 0, 0, 100, (2 << 20) - 100], [0, 5, 1, 0, 1 << 20]]
        st = eng.copy_ipc([seg], blocks, pieces)
        r.update(ok=bool((a[100:] == src[: (2 << 20) - 100]).all() and (b == src[5 : 5 + (1 << 20)]).all()),
                 mode=st["mode"], opens=st["ipc_opens"], open_now=fake.fake_open_handles())
        st = eng.copy_ipc([seg], blocks, pieces, keep_open=True)
        r["kept"] = fake.fake_open_handles()
        for addr in st["ipc_addrs"]:
            eng.close_ipc(addr)
        r["after_close"] = fake.fake_open_handles()
        try:
            eng.copy_ipc([seg], [dict(blocks[0], device="0000:00:07.0")], [[0, 0, 0, 0, 8]])
        except ce.CudaError as e:
            r["wrong_gpu"] = str(e)
        # Handles open while the copy runs: one that fails to open fails the copy, and the
        # ones already open are closed again. Many small blocks, the bad one last in copy order.
        many = [np.zeros(4096, np.uint8) for _ in range(64)]
        mblocks = [{{"handle": int(x.ctypes.data).to_bytes(8, "little") + bytes(56), "size": x.size,
                    "device": "0000:00:06.0"}} for x in many]
        mblocks[-1]["handle"] = mblocks[-1]["handle"][:63] + b"\x01"
        mpieces = [[0, i * 4096, i, 0, 4096] for i in range(64)][::-1]  # given backwards: order comes from the plan
        try:
            eng.copy_ipc([seg], mblocks, mpieces)
        except ce.CudaError as e:
            r["bad_handle"] = str(e)
        r["after_bad"] = fake.fake_open_handles()
        st = eng.copy_ipc([seg], mblocks[:-1], mpieces[1:])
        r["many_ok"] = all((m == src[i * 4096:(i + 1) * 4096]).all() for i, m in enumerate(many[:-1]))
        r.update(many_opens=st["ipc_opens"], many_open_s=st["ipc_open_s"])
        r.update(device=eng.device, left=eng.open_ipc_count)
        eng.close()
        print(json.dumps(r))
        """,
        SLLMFS_CUDART=str(lib),
    )
    assert out["bus"] == "0000:00:06.0" and out["device"] == 0
    assert out["reg"] is False and out["again"] is True
    assert out["ok"] and out["mode"] == "register" and out["opens"] == 2 and out["open_now"] == 0
    assert out["kept"] == 2 and out["after_close"] == 0 and out["left"] == 0
    assert "use one engine per GPU" in out["wrong_gpu"] and "\n" not in out["wrong_gpu"]
    assert "cudaIpcOpenMemHandle" in out["bad_handle"] and "\n" not in out["bad_handle"]
    assert out["after_bad"] == 0
    assert out["many_ok"] and out["many_opens"] == 63 and out["many_open_s"] >= 0


def test_reservation_counts_large_pool_tensors_only():
    """The reservation matches what torch's large pool gives the weights: small ones not, 512-byte rounding."""
    from sllmfs.engine.ipc import large_pool_bytes, reserve_segment

    big = 4 << 20
    assert large_pool_bytes([1 << 20, (1 << 20) + 1]) == (1 << 20) + 512
    torch = pytest.importorskip("torch")
    assert reserve_segment(torch.device("cpu"), big) == 0  # CPU tensors need no reservation
