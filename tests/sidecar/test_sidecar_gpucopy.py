"""The load_ipc op on a machine without a GPU: clear refusals, the lease stays usable."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from sllmfs.core.errors import BadInput, SidecarCannotCopy
from tests.support.cudart import FAKE_IPC_CUDART
from tests.support.sidecar import make_model, sidecar, wait_log


def test_load_ipc_without_cuda_is_a_clear_refusal(tmp_path: Path) -> None:
    with sidecar(tmp_path) as sd:
        expected = make_model(sd.store, "org/m", tensors=3)
        with sd.connect() as c, c.acquire("org/m") as lease:
            lease.wait(timeout=30)
            blocks = [{"handle": bytes(64), "size": 1 << 20, "device": "0000:00:00.0"}]
            ref = next(iter(lease.entries.values()))
            pieces = [[ref.partition, ref.offset, 0, 0, ref.nbytes]]
            for _ in range(2):  # the second answer comes from the remembered reason
                with pytest.raises(SidecarCannotCopy, match="cannot copy to GPUs"):
                    lease.copy_to_gpu(blocks, pieces)
            with pytest.raises(BadInput, match="not held on this connection"):
                c._op("load_ipc", lease=lease.id + 99, blocks=blocks, pieces=pieces)
            with pytest.raises(BadInput, match="needs 'blocks' and 'pieces'"):
                c._op("load_ipc", lease=lease.id, blocks="x", pieces=pieces)
            assert {n: t.numpy().tobytes() for n, t in lease.tensors().items()} == expected


@pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler for the fake CUDA runtime")
def test_engines_start_with_the_sidecar_and_fills_are_pinned(tmp_path: Path) -> None:
    """A stand-in CUDA runtime with two GPUs: both engines exist before any load, a fill is pinned at once;
    --no-gpu-warmup leaves them to the first load."""
    lib = tmp_path / "libfakecudart.so"
    (tmp_path / "fake.c").write_text(FAKE_IPC_CUDART)
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(lib), str(tmp_path / "fake.c")], check=True)
    env = {"SLLMFS_CUDART": str(lib)}
    with sidecar(tmp_path / "warm", env=env) as sd:
        wait_log(sd, "gpu copy engine ready device=0000:00:07.0")
        assert sd.status()["gpus"] == ["0000:00:06.0", "0000:00:07.0"]
        expected = make_model(sd.store, "org/m", tensors=3)
        with sd.connect() as c, c.acquire("org/m") as lease:
            assert {n: t.numpy().tobytes() for n, t in lease.tensors(timeout=30).items()} == expected
        assert "pinned model=org/m variant=hf" in wait_log(sd, "pinned model=org/m")
    with sidecar(tmp_path / "lazy", "--no-gpu-warmup", env=env) as sd:
        assert sd.status()["gpus"] == []
        assert "gpu copy engine ready" not in sd.log()


def test_no_gpu_at_start_is_one_quiet_line(tmp_path: Path) -> None:
    with sidecar(tmp_path, env={"SLLMFS_CUDART": str(tmp_path / "missing.so")}) as sd:
        log = wait_log(sd, "no GPU copies from this sidecar")
        assert sd.status()["gpus"] == []
        assert "no GPU copies from this sidecar" in log and "Traceback" not in log
