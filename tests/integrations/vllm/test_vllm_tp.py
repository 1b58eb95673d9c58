"""TP 2 in real vLLM 0.26.0 on the CPU: two rank processes (gloo), each filled by vLLM's
DefaultModelLoader, by the any-TP path (which writes ``vllm.tp2.r{rank}…`` back) and then by the
fast path from that variant: each rank's shard equal bit for bit to the default loader's; the two
ranks hold different shards; a TP 1 start does not take the TP 2 variants.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.support.vllm_env import require_vllm

require_vllm()

from sllmfs.core.names import HF_VARIANT  # noqa: E402
from sllmfs.store.save import save_model  # noqa: E402
from sllmfs.store.store import Store  # noqa: E402
from tests.integrations.vllm.test_vllm_loader import KEY, MODEL, _load, checkpoint, reference  # noqa: E402,F401

ROOT = Path(__file__).resolve().parents[3]


def test_tp2_ranks_equal_the_default_loader_and_write_back(tmp_path: Path, checkpoint: Path,  # noqa: F811
                                                            reference: dict) -> None:  # noqa: F811
    store = Store(tmp_path / "store")
    save_model(store, MODEL, checkpoint)
    init = f"file://{tmp_path / 'rendezvous'}"
    env = {**os.environ, "VLLM_LOGGING_LEVEL": "ERROR", "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-m", "tests.integrations.vllm.tp_rank", str(r), "2", init,
                               str(checkpoint), str(store.root), MODEL], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT) for r in range(2)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
        results += [json.loads(line[7:]) for line in out.splitlines() if line.startswith("RESULT ")]
    assert sorted(r["rank"] for r in results) == [0, 1]
    for r in results:
        assert r["qkv_shape"][0] == reference["model.layers.0.self_attn.qkv_proj.weight"].shape[0] // 2  # a shard
        assert r["paths"] == ["any-tp", "fast"] and r["write_back_error"] is None
        assert r["any_tp"] == r["default"] and r["fast"] == r["default"], r
    assert results[0]["default"] != results[1]["default"]  # the ranks hold different shards
    keys = [k.replace("tp1.r0", f"tp2.r{r}") for r in range(2) for k in [KEY]]
    assert set(store.get(MODEL).variants) == {HF_VARIANT, *keys}
    # TP 1 in this process: its own key, not the TP 2 ranks' (it writes tp1.r0 back)
    loader, _ = _load(str(checkpoint), "sllm", {"sllm_model": MODEL, "sllm_storage_path": str(store.root),
                                                 "sllm_write_back": "sync"})
    assert loader.path_taken == "any-tp" and KEY in store.get(MODEL).variants
