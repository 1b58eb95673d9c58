"""What a start costs the kernel cache when there is little to do (#21.4): a later start on a node
restores only what its working dir lacks, and the processes a start spawns read only its mark."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sllmfs.store import kernels
from sllmfs.store.kernel_key import KernelKey
from sllmfs.store.store import Store

KEY = KernelKey(gpu="NVIDIA H200", driver="570.86.15", cuda="12.8", torch="2.11.0+cu128",
                triton="3.5.1", framework="sglang 0.5.17")
FILES = {"triton/ab/k.cubin": os.urandom(4000), "triton/ab/k.json": b'{"n": 1}', "tvm-ffi/lib.so": os.urandom(900)}
REPO = Path(__file__).resolve().parents[2]


def _write(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)


def test_a_later_start_restores_only_what_the_working_dir_lacks(tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    store = Store(tmp_path / "store")
    _write(tmp_path / "compiled", FILES)
    kernels.publish(store, KEY, tmp_path / "compiled")
    work = tmp_path / "work"
    assert kernels.restore(store, KEY.name, work) == 3
    (work / "triton/ab/k.json").write_bytes(b"the engine's own")  # rewritten by the engine since
    (work / "tvm-ffi/lib.so").unlink()  # lost
    stored = kernels.entry_dir(store, KEY.name) / "triton/ab/k.cubin"
    stored.write_bytes(b"x" * len(FILES["triton/ab/k.cubin"]))  # damaged in the store, present in the dir
    with caplog.at_level(logging.WARNING):
        assert kernels.restore(store, KEY.name, work) == 1  # only the lost file
    assert caplog.text == ""  # a file the dir has is not read from the store at all
    assert (work / "triton/ab/k.json").read_bytes() == b"the engine's own"
    assert (work / "tvm-ffi/lib.so").read_bytes() == FILES["tvm-ffi/lib.so"]
    assert (work / "triton/ab/k.cubin").read_bytes() == FILES["triton/ab/k.cubin"]
    assert not [p for p in work.rglob("*") if ".sllmfs-" in p.name]


def test_a_process_of_a_started_engine_reads_only_the_mark(tmp_path: Path) -> None:
    code = """
        import os, sys
        from sllmfs.integrations.kernel_cache import activate
        print(activate(framework="sglang"), os.environ["TRITON_CACHE_DIR"])
        print(sorted(m for m in sys.modules if m.startswith(("sllmfs.store", "sllmfs.core.config"))))
    """
    env = {**os.environ, "PYTHONPATH": str(REPO), "SLLMFS_KERNEL_CACHE_DIR": str(tmp_path / "work"),
           "TRITON_CACHE_DIR": str(tmp_path / "work/triton"), "SLLMFS_STORAGE_PATH": str(tmp_path / "nowhere")}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [f"None {tmp_path}/work/triton", "[]"]
