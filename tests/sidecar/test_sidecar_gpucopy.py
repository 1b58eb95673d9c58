"""The load_ipc op on a machine without a GPU: clear refusals, the lease stays usable."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from sllmfs.core.errors import BadInput, SidecarCannotCopy
from tests.support.cudart import FAKE_IPC_CUDART, memfd_handle
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


@pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler for the fake CUDA runtime")
def test_sidecar_relays_through_an_idle_gpu_and_reports_the_cost(tmp_path: Path) -> None:
    """Issue 26 through a real daemon and socket: the stand-in runtime's GPUs have peers and asynchronous
    streams, and the client's "GPU memory" is a memfd the daemon maps through its IPC handle, so every
    byte the sidecar copies (direct or relayed through GPU 1) is checked in the client process."""
    import os

    import numpy as np

    from sllmfs.store.format import digest
    from tests.support.cudart import FAKE_PEER_CUDART

    lib = tmp_path / "libfakepeers.so"
    (tmp_path / "fake.c").write_text(FAKE_PEER_CUDART)
    subprocess.run(["cc", "-O1", "-shared", "-fPIC", "-pthread", "-o", str(lib), str(tmp_path / "fake.c")], check=True)
    gpu0 = "0000:00:06.0"
    for setting, relays in (("auto", True), ("off", False)):
        # links at 4 GB/s: the direct path's window (256 MiB) stays full long enough for the relay to take blocks
        env = {"SLLMFS_CUDART": str(lib), "SLLMFS_RELAY": setting, "FAKE_CUDA_H2D_GBPS": "4"}
        with sidecar(tmp_path / setting, "--mem-pool-size", "1GiB", env=env) as sd:
            wait_log(sd, "gpu copy engine ready device=0000:00:07.0")
            expected = make_model(sd.store, "org/m", tensors=12, nbytes=40 << 20)  # 480 MiB: 8 blocks of 64
            with sd.connect() as c, c.acquire("org/m") as lease:
                lease.wait(timeout=60)
                total = sum(len(v) for v in expected.values())
                fd = os.memfd_create("fake-gpu0")
                os.ftruncate(fd, total)
                mem = np.memmap(f"/proc/self/fd/{fd}", dtype=np.uint8, mode="r+", shape=(total,))
                mem[:] = 0xEE  # poison
                handle = memfd_handle(fd, total)
                blocks = [{"handle": handle, "size": total, "device": gpu0}]
                at, where, pieces = 0, {}, []
                for name, ref in lease.entries.items():
                    pieces.append([ref.partition, ref.offset, 0, at, ref.nbytes])
                    where[name] = (at, ref.nbytes)
                    at += ref.nbytes
                stats = lease.copy_to_gpu(blocks, pieces, timeout=60)
                got = {n: bytes(mem[a:a + k]) for n, (a, k) in where.items()}
                del mem
                os.close(fd)
            assert {n: digest(v) for n, v in got.items()} == {n: digest(v) for n, v in expected.items()}
            st = sd.status()["relay"]
        if relays:
            said = {k: v for k, v in stats.items() if "relay" in k or "direct" in k or k == "mode"}
            assert stats["relay_bytes"] > 0 and stats["relay_peers"].startswith("0000:00:07.0:"), said
            assert stats["direct_bytes"] + stats["relay_bytes"] == stats["bytes"] == total
            cost = st["peers"]["0000:00:07.0"]
            assert st["allowed"] == "auto" and cost["loads"] == 1 and cost["bytes"] == stats["relay_bytes"]
            assert cost["busy_seconds"] > 0 and cost["staging_bytes"] == 4 * (32 << 20)
            assert cost["relaying_for"] == ""  # the copy is over: nothing held on the peer
        else:
            assert stats["relay_bytes"] == 0 and stats["direct_bytes"] == total
            assert st == {"allowed": "off", "peers": {}}


@pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler for the fake CUDA runtime")
def test_no_relay_through_a_gpu_another_process_is_loading(tmp_path: Path) -> None:
    """NVML (a stand-in) shows GPU 1's link receiving 20 GB/s from someone else: no relay through it,
    the reason in status; once its link is quiet again, relays resume."""
    import os
    import time

    import numpy as np

    from tests.support.cudart import FAKE_NVML, FAKE_PEER_CUDART

    libs = {}
    for name, code in (("cudart", FAKE_PEER_CUDART), ("nvml", FAKE_NVML)):
        (tmp_path / f"{name}.c").write_text(code)
        libs[name] = tmp_path / f"lib{name}.so"
        subprocess.run(["cc", "-O1", "-shared", "-fPIC", "-pthread", "-o", str(libs[name]),
                        str(tmp_path / f"{name}.c")], check=True)
    rx = tmp_path / "rx"
    rx.write_text("0000:00:07.0 20000000\n")  # KB/s: 20 GB/s into GPU 1
    env = {"SLLMFS_CUDART": str(libs["cudart"]), "SLLMFS_NVML": str(libs["nvml"]), "FAKE_NVML_RX": str(rx)}
    with sidecar(tmp_path, "--mem-pool-size", "1GiB", env=env) as sd:
        wait_log(sd, "gpu copy engine ready device=0000:00:07.0")
        expected = make_model(sd.store, "org/m", tensors=16, nbytes=40 << 20)  # 640 MiB: 10 blocks
        with sd.connect() as c, c.acquire("org/m") as lease:
            lease.wait(timeout=60)
            total = sum(len(v) for v in expected.values())
            fd = os.memfd_create("fake-gpu0")
            os.ftruncate(fd, total)
            handle = memfd_handle(fd, total)
            blocks = [{"handle": handle, "size": total, "device": "0000:00:06.0"}]
            at, pieces = 0, []
            for ref in lease.entries.values():
                pieces.append([ref.partition, ref.offset, 0, at, ref.nbytes])
                at += ref.nbytes
            mem = np.memmap(f"/proc/self/fd/{fd}", dtype=np.uint8, mode="r+", shape=(total,))
            want = b"".join(expected[n] for n in lease.entries)
            time.sleep(0.6)  # a few samples
            mem[:] = 0xEE
            busy = lease.copy_to_gpu(blocks, pieces, timeout=60)
            assert bytes(mem) == want
            why = sd.status()["relay"]["peers"]["0000:00:07.0"]["last_skipped"]
            rx.write_text("0000:00:07.0 0\n")
            time.sleep(0.6)
            mem[:] = 0xEE
            quiet = lease.copy_to_gpu(blocks, pieces, timeout=60)
            assert bytes(mem) == want
            del mem
            os.close(fd)
    assert busy["relay_bytes"] == 0 and busy["direct_bytes"] == total
    assert why == "its link received 20.0 GB/s from another process"
    assert "another process" in busy["relay_peers"]
    assert quiet["relay_bytes"] > 0
