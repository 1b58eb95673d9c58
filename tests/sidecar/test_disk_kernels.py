"""Kernel cache entries count against --disk-size; the least recently updated go once no model can."""

from __future__ import annotations

import os
import time
from pathlib import Path

from sllmfs.store import kernels
from sllmfs.store.kernel_key import KernelKey
from sllmfs.store.store import Store
from tests.support.sidecar import make_model, sidecar, wait_log


def entry(store: Store, framework: str, tmp: Path) -> kernels.KernelEntry:
    (tmp / "triton" / "k").mkdir(parents=True)
    (tmp / "triton" / "k" / "kernel.cubin").write_bytes(os.urandom(600 << 10))
    return kernels.publish(store, KernelKey("", "", "", "2.13.0", "", framework), tmp)


def test_kernel_caches_count_in_the_disk_budget(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    make_model(store.root, "mine", tensors=4)  # saved from a local folder: the only copy, never evicted
    old = entry(store, "sglang 0.5.17", tmp_path / "a")
    time.sleep(0.01)
    new = entry(store, "sglang 0.5.23", tmp_path / "b")
    model_bytes = sum(p.stat().st_size for p in (store.root / "models").rglob("*") if p.is_file())
    budget = model_bytes + new.size + (300 << 10)  # room for the model and one entry
    with sidecar(tmp_path, "--disk-size", str(budget), store=store.root) as sd, sd.connect() as c:
        log = wait_log(sd, f"evicted from disk kernel cache={old.key}")
        assert f"evicted from disk kernel cache={old.key}" in log
        assert [e.key for e in kernels.entries(store)[0]] == [new.key]
        assert [m["name"] for m in c.list()] == ["mine"]
        st = c.status()
        assert st["disk"]["used"] >= st["kernel_caches"]["bytes"] == new.size
        assert st["disk"]["used"] <= budget
