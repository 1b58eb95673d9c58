"""``sllmfs save --backend vllm``: the per-rank variant made ahead of time is the one a start uses.

vLLM's engine needs a GPU; here its load step runs on the CPU (tests/support/vllm_env.CpuLLM, fed
the same keyword arguments, which vLLM's EngineArgs must accept), so the save's variant is the one
vLLM's own loader sequence writes, and the next start takes the fast path with it, bit for bit as
the default loader. The CLI on this host: vLLM cannot start without a GPU, and says so in one line
after storing the hf variant.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.vllm_env import require_vllm

require_vllm()

import vllm  # noqa: E402

from sllmfs.core.errors import BadInput, NotFound, SllmfsError  # noqa: E402
from sllmfs.core.names import HF_VARIANT  # noqa: E402
from sllmfs.integrations.vllm.save import engine_args, save_vllm  # noqa: E402
from sllmfs.store.save import save_model  # noqa: E402
from sllmfs.store.store import Store  # noqa: E402
from tests.integrations.vllm.test_vllm_loader import KEY, MODEL, _load, _same, checkpoint, reference  # noqa: E402,F401
from tests.support.vllm_env import CpuLLM  # noqa: E402


def test_save_backend_vllm_then_the_fast_path(tmp_path: Path, checkpoint: Path, reference: dict,  # noqa: F811
                                              capsys: pytest.CaptureFixture[str]) -> None:
    store = Store(tmp_path / "store")
    keys = save_vllm(store, MODEL, str(checkpoint), 1, engine_factory=CpuLLM, version=vllm.__version__)
    assert keys == [KEY]
    assert capsys.readouterr().out.splitlines() == [f"stored {MODEL} [hf]", f"stored {MODEL} [{KEY}]"]
    assert set(store.get(MODEL).variants) == {HF_VARIANT, KEY}
    loader, state = _load(str(checkpoint), "sllm", {"sllm_model": MODEL, "sllm_storage_path": str(store.root)})
    assert loader.path_taken == "fast"
    _same(state, reference)
    # again: the stored ranks are loaded by the fast path and kept as they are
    manifest = (store.get(MODEL).variant_dir(KEY) / "manifest.json").read_bytes()
    assert save_vllm(store, MODEL, str(checkpoint), 1, engine_factory=CpuLLM, version=vllm.__version__) == [KEY]
    assert (store.get(MODEL).variant_dir(KEY) / "manifest.json").read_bytes() == manifest


def test_engine_args_are_vllms(tmp_path: Path, checkpoint: Path) -> None:  # noqa: F811
    store = Store(tmp_path / "store")
    save_model(store, MODEL, checkpoint)
    args = engine_args(store, MODEL, 2, config_dir=tmp_path / "cfg")
    assert args["tensor_parallel_size"] == 2 and args["load_format"] == "sllm"
    assert args["model_loader_extra_config"]["sllm_write_back"] == "sync"
    from vllm.engine.arg_utils import EngineArgs

    EngineArgs(**args)  # names vLLM's LLM() takes
    from vllm.config.attention import AttentionConfig
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    assert AttentionConfig.validate_backend_before(args["attention_backend"]) is AttentionBackendEnum.TRITON_ATTN
    assert args["max_model_len"] == 256  # the tiny checkpoint's own context length: no more
    with pytest.raises(NotFound, match="not in the store"):
        engine_args(store, "org/other", 1, config_dir=tmp_path / "x")
    with pytest.raises(BadInput, match="must be 1 or more"):
        engine_args(store, MODEL, 0, config_dir=tmp_path / "x")


def test_a_save_that_writes_no_rank_says_so(tmp_path: Path, checkpoint: Path) -> None:  # noqa: F811
    store = Store(tmp_path / "store")
    with pytest.raises(SllmfsError, match=r"holds ranks \[\] of 1 .*\[hf\] is stored"):
        save_vllm(store, MODEL, str(checkpoint), 1, engine_factory=lambda **kw: None, version=vllm.__version__)
    assert set(store.get(MODEL).variants) == {HF_VARIANT}


def test_cli_without_a_gpu_is_one_line_after_the_hf_variant(tmp_path: Path, checkpoint: Path) -> None:  # noqa: F811
    store = tmp_path / "store"
    proc = subprocess.run([sys.executable, "-m", "sllmfs", "save", "--model", MODEL, "--local-model-path",
                           str(checkpoint), "--storage-path", str(store), "--backend", "vllm",
                           "--tensor-parallel-size", "2"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "VLLM_LOGGING_LEVEL": "ERROR"})
    assert proc.returncode != 0
    assert f"stored {MODEL} [hf]" in proc.stdout
    errors = [line for line in proc.stderr.splitlines() if "vLLM did not start" in line]
    assert len(errors) == 1 and "[hf] is stored" in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert set(Store(store).get(MODEL).variants) == {HF_VARIANT}
