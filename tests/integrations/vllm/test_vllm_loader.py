"""``--load-format sllm`` in real vLLM 0.26.0 on the CPU: the plugin registers through its entry
point, ``get_model_loader`` returns our loader, and a Llama built by vLLM's own model class
(fused qkv_proj / gate_up_proj) is filled bit for bit as vLLM's DefaultModelLoader fills it:
by the any-TP path (hf variant into vLLM's ``model.load_weights``), and after write-back by the
per-rank fast path, from the store directly and through a real sidecar process.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import pytest

from tests.support.vllm_env import require_vllm

require_vllm()

import torch  # noqa: E402
from vllm.config import set_current_vllm_config  # noqa: E402
from vllm.model_executor.model_loader import get_model_loader  # noqa: E402

from sllmfs.core.names import HF_VARIANT  # noqa: E402
from sllmfs.integrations.common import variants  # noqa: E402
from sllmfs.integrations.vllm import VLLM, plugin  # noqa: E402
from sllmfs.integrations.vllm.loader import SllmModelLoader  # noqa: E402
from sllmfs.ops.demo import build_model  # noqa: E402
from sllmfs.store.save import save_model  # noqa: E402
from sllmfs.store.store import Store  # noqa: E402
from tests.support.sidecar import sidecar  # noqa: E402
from tests.support.vllm_env import cpu_platform, init_single_process, vllm_config  # noqa: E402

MODEL = "org/tiny-llama"
KEY = "vllm.tp1.r0.bfloat16.none.v0.26.0"  # the checkpoint is bfloat16; vLLM keeps it ("auto")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cpu_platform()
    plugin.register()
    out = tmp_path_factory.mktemp("ckpt") / "tiny"
    build_model(out)
    init_single_process(vllm_config(str(out), "safetensors"))
    return out


@pytest.fixture
def store(tmp_path: Path, checkpoint: Path) -> Store:
    s = Store(tmp_path / "store")
    save_model(s, MODEL, checkpoint)
    return s


def _load(model_path: str, load_format: str, extra: dict[str, Any] | None = None) -> tuple[Any, dict[str, Any]]:
    """(loader, the model's state) after vLLM's loader for ``load_format`` built and loaded it."""
    vc = vllm_config(model_path, load_format, extra)
    with set_current_vllm_config(vc):
        loader = get_model_loader(vc.load_config)
        model = loader.load_model(vllm_config=vc, model_config=vc.model_config)
    return loader, {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def reference(checkpoint: Path) -> dict[str, Any]:
    """What vLLM's own DefaultModelLoader makes of the checkpoint."""
    loader, state = _load(str(checkpoint), "safetensors")
    assert type(loader).__name__ == "DefaultModelLoader"
    return state


def _bits(t: Any) -> Any:
    return t.reshape(-1).view(torch.uint8)


def _same(state: dict[str, Any], reference: dict[str, Any]) -> None:
    assert state.keys() == reference.keys()
    assert "model.layers.0.self_attn.qkv_proj.weight" in state  # vLLM's fused layout, not the checkpoint's
    for name, t in reference.items():
        assert state[name].dtype == t.dtype and _bits(state[name]).equal(_bits(t)), name


def test_entry_point_is_discoverable() -> None:
    eps = [ep for ep in entry_points(group="vllm.general_plugins") if ep.name == "sllmfs"]
    assert len(eps) == 1 and eps[0].value == "sllmfs.integrations.vllm.plugin:register"
    assert eps[0].load() is plugin.register


def _python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env={**os.environ, "VLLM_LOGGING_LEVEL": "ERROR", **env}, timeout=300)


PROBE = """
    from vllm.plugins import load_general_plugins
    load_general_plugins()  # what vllm serve, LLM() and every worker process call
    from vllm.config.load import LoadConfig
    from vllm.model_executor.model_loader import get_model_loader
    print(type(get_model_loader(LoadConfig(load_format="sllm"))).__name__)
"""


def test_vllm_loads_the_plugin_in_a_fresh_process() -> None:
    proc = _python(PROBE)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["SllmModelLoader"]


def test_plugin_can_be_turned_off_by_vllm_plugins() -> None:
    proc = _python(PROBE, VLLM_PLUGINS="someone_else")
    assert proc.returncode != 0 and "Load format `sllm` is not supported" in proc.stderr


def test_registering_twice_is_harmless(checkpoint: Path) -> None:
    plugin.register()
    plugin.register()
    from vllm.config.load import LoadConfig

    assert type(get_model_loader(LoadConfig(load_format="sllm"))) is SllmModelLoader


def test_any_tp_path_equals_vllms_default_loader(store: Store, checkpoint: Path, reference: dict[str, Any]) -> None:
    extra = {"sllm_model": MODEL, "sllm_storage_path": str(store.root), "sllm_write_back": "false"}
    loader, state = _load(str(checkpoint), "sllm", extra)
    assert loader.path_taken == "any-tp"
    _same(state, reference)
    assert set(store.get(MODEL).variants) == {HF_VARIANT}  # write-back off: nothing written


def test_write_back_then_fast_path(store: Store, checkpoint: Path, reference: dict[str, Any]) -> None:
    extra = {"sllm_model": MODEL, "sllm_storage_path": str(store.root), "sllm_write_back": "sync"}
    first, state = _load(str(checkpoint), "sllm", extra)
    assert first.path_taken == "any-tp" and first.write_back.error is None
    _same(state, reference)
    assert KEY in store.get(MODEL).variants
    meta = store.get(MODEL).manifest(KEY).metadata
    assert meta["kind"] == "vllm-rank-state" and meta["vllm"]["tp_size"] == 1
    second, state = _load(str(checkpoint), "sllm", extra)
    assert second.path_taken == "fast" and second.write_back is None
    _same(state, reference)


def test_a_variant_of_another_layout_is_replaced(store: Store, checkpoint: Path, reference: dict[str, Any]) -> None:
    extra = {"sllm_model": MODEL, "sllm_storage_path": str(store.root), "sllm_write_back": "sync"}
    _load(str(checkpoint), "sllm", extra)
    info = store.get(MODEL)
    manifest = info.manifest(KEY)
    manifest.metadata["vllm"]["tp_size"] = 2  # as if written by another layout under this key
    (info.variant_dir(KEY) / "manifest.json").write_text(manifest.to_json())
    loader, state = _load(str(checkpoint), "sllm", extra)
    assert loader.path_taken == "any-tp"  # never a wrongly filled model
    _same(state, reference)
    assert store.get(MODEL).manifest(KEY).metadata["vllm"]["tp_size"] == 1  # written again, right


def test_through_a_real_sidecar(store: Store, tmp_path: Path, reference: dict[str, Any], checkpoint: Path,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLLMFS_STORAGE_PATH", str(store.root))  # where write-back commits: the sidecar's store
    with sidecar(tmp_path, store=store.root) as sd:
        extra = {"sllm_model": MODEL, "sllm_socket": str(sd.socket), "sllm_write_back": "sync"}
        first, state = _load(str(checkpoint), "sllm", extra)
        assert first.path_taken == "any-tp" and first.write_back.error is None
        _same(state, reference)
        second, state = _load(str(checkpoint), "sllm", extra)
        assert second.path_taken == "fast"
        _same(state, reference)


def test_variant_keys() -> None:
    v = variants.make(VLLM, tp_size=2, tp_rank=1, dtype=torch.bfloat16, quant=None, version="0.26.0")
    assert v.key == "vllm.tp2.r1.bfloat16.none.v0.26.0"
    assert variants.parse(VLLM, v.key) == v
    assert not variants.is_framework(VLLM, "sglang.tp2.r1.bfloat16.none.v0.5.17")


def test_per_rank_state_only_where_its_key_and_order_are_right(checkpoint: Path) -> None:
    """Data/context/expert parallelism, quantization, MLA and an fp8 KV cache take the any-TP path
    and write nothing back: the variant key or the fast path's order would be wrong for them."""
    from sllmfs.integrations.vllm.loader import per_rank_problem

    vc = vllm_config(str(checkpoint), "sllm")
    assert per_rank_problem(vc) is None
    vc.parallel_config.data_parallel_size = 2
    assert per_rank_problem(vc) == "data parallel size 2"
    vc.parallel_config.data_parallel_size = 1
    vc.parallel_config.enable_expert_parallel = True
    assert per_rank_problem(vc) == "expert parallelism"
    vc.parallel_config.enable_expert_parallel = False
    vc.cache_config.cache_dtype = "fp8"
    assert per_rank_problem(vc) == "KV cache dtype fp8"
