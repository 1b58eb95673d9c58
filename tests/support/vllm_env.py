"""vLLM 0.26.0 on a CPU-only host (CI, ``.ci/install-vllm.sh``): import it, or skip.

PyPI's vLLM is a CUDA build: without a GPU it picks no platform, and its model layers then
find no attention backend. ``cpu_platform()`` gives it one that is CPU in all but the kernels:
attention resolves to vLLM's CPU backend class (only built, never run: loading does not
forward), and layers keep their torch-native ops (vLLM's compiled CPU ops are not in this wheel).
"""

from __future__ import annotations

import os
import tempfile
from typing import Any


def require_vllm() -> None:
    """For test modules: skip unless vLLM imports (fail instead when SLLMFS_REQUIRE_VLLM=1, as in CI)."""
    import pytest

    try:
        import vllm.model_executor.model_loader  # noqa: F401
    except Exception as e:
        if os.environ.get("SLLMFS_REQUIRE_VLLM") == "1":
            raise
        pytest.skip(f"vLLM 0.26.0 is not importable here ({type(e).__name__}: {e}); "
                    "run .ci/install-vllm.sh and use .venv-vllm/bin/python", allow_module_level=True)


def cpu_platform() -> None:
    """Make vLLM's current platform a CPU one that builds models (see the module docstring)."""
    import vllm.platforms
    from vllm.platforms.interface import UnspecifiedPlatform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    class CpuBuild(UnspecifiedPlatform):
        device_name = "cpu"
        device_type = "cpu"
        dispatch_key = "CPU"

        @classmethod
        def get_attn_backend_cls(cls, *args: Any, **kwargs: Any) -> str:
            return AttentionBackendEnum.CPU_ATTN.get_path()

    vllm.platforms.current_platform = CpuBuild()


def init_single_process(config: Any) -> None:
    """vLLM's parallel state for one process, TP 1, over gloo (once per process; ``config``: a VllmConfig)."""
    from vllm.config import set_current_vllm_config
    from vllm.distributed import parallel_state as ps

    if ps.model_parallel_is_initialized():
        return
    with set_current_vllm_config(config):
        ps.init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                        distributed_init_method=f"file://{tempfile.mktemp(prefix='sllmfs-vllm-')}")
        ps.initialize_model_parallel(1, 1)


def vllm_config(model_path: str, load_format: str, extra: dict[str, Any] | None = None) -> Any:
    """A VllmConfig for ``model_path`` on the CPU, as vLLM's engine would build it (eager, no tokenizer)."""
    from vllm.config import DeviceConfig, LoadConfig, ModelConfig, VllmConfig

    model = ModelConfig(model=model_path, skip_tokenizer_init=True, enforce_eager=True)
    load = LoadConfig(load_format=load_format, model_loader_extra_config=extra or {})
    return VllmConfig(model_config=model, load_config=load, device_config=DeviceConfig(device="cpu"))


class CpuLLM:
    """Stand-in for ``vllm.LLM`` on a CPU host (``sllmfs save --backend vllm``'s engine factory in tests):
    the same keyword arguments, and the one step of a start a save needs: the worker's
    ``get_model_loader(...).load_model`` on the VllmConfig (single process, TP 1)."""

    def __init__(self, **kwargs: Any):
        from vllm.config import set_current_vllm_config
        from vllm.engine.arg_utils import EngineArgs
        from vllm.model_executor.model_loader import get_model_loader

        EngineArgs(**kwargs)  # every argument is one vLLM's LLM() accepts
        config = vllm_config(kwargs["model"], kwargs["load_format"], kwargs.get("model_loader_extra_config"))
        with set_current_vllm_config(config):
            self.model = get_model_loader(config.load_config).load_model(vllm_config=config,
                                                                         model_config=config.model_config)

    def shutdown(self) -> None:
        self.model = None
