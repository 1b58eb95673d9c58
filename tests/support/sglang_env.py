"""Import SGLang's pure-Python parts on a CPU-only host (CI, ``.ci/install-sglang.sh``).

PyPI's Linux torchvision wheels are CUDA builds; beside a CPU torch their C
ops do not load, and torchvision then fails registering fake kernels for two
ops it does not guard (``nms``, ``qnms``). Declaring those two schemas first
lets ``import torchvision`` (and so SGLang) succeed; the ops stay unusable,
which no loader code needs. Nothing happens where torchvision imports normally.
"""

from __future__ import annotations

import sys
from types import ModuleType
from typing import Any

SGLANG_MODULES = (
    "sglang.srt.configs.load_config",
    "sglang.srt.server_args",
    "sglang.srt.model_loader.loader",
    "sglang.srt.plugins",
)
_lib = None


def _torchvision_without_ops() -> None:
    global _lib
    try:
        import torchvision  # noqa: F401
        return
    except RuntimeError as e:
        if "torchvision::nms" not in str(e):
            raise
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    import torch

    _lib = torch.library.Library("torchvision", "FRAGMENT")
    _lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    import torchvision  # noqa: F401,F811


def import_sglang() -> ModuleType:
    """Import the SGLang modules sllmfs uses; ImportError when SGLang is absent."""
    import importlib
    import importlib.util

    if importlib.util.find_spec("sglang") is None:
        raise ImportError("sglang is not installed (run .ci/install-sglang.sh)")
    _torchvision_without_ops()
    for name in SGLANG_MODULES:
        importlib.import_module(name)
    import sglang

    return sglang


def start_rank(server_args: Any, *, rank: int, world: int, port: int) -> None:
    """What an SGLang scheduler process does before it loads a model, on CPU (gloo): publish the
    configuration and this rank's place, then build the parallel groups. Releases up to 0.5.19 take the
    widths as arguments and a global ServerArgs; later ones resolve ServerArgs once and read the widths
    from the published runtime context."""
    import inspect

    from sglang.srt.distributed.parallel_state import init_distributed_environment, initialize_model_parallel

    init = {"world_size": world, "rank": rank, "local_rank": rank, "backend": "gloo",
            "distributed_init_method": f"tcp://127.0.0.1:{port}"}
    if "tensor_model_parallel_size" in inspect.signature(initialize_model_parallel).parameters:
        from sglang.srt.server_args import set_global_server_args_for_scheduler

        set_global_server_args_for_scheduler(server_args)
        init_distributed_environment(**init)
        initialize_model_parallel(world, backend="gloo")
        return
    import functools

    import torch
    from sglang.srt.distributed import parallel_state
    from sglang.srt.runtime_context import SpawnRanks, publish

    if not torch.cuda.is_available():
        # a CUDA build of torch on a host without a GPU (0.5.22+ pin one): SGLang would open NCCL for TP > 1
        parallel_state.init_model_parallel_group = functools.partial(parallel_state.init_model_parallel_group,
                                                                     use_pynccl=False)
    server_args.resolve_once()
    publish(server_args, role="scheduler", ranks=SpawnRanks(world_rank=rank))
    init_distributed_environment(**init)
    initialize_model_parallel(backend="gloo")


def require_sglang() -> None:
    """For test modules: skip unless SGLang imports (fail instead when SLLMFS_REQUIRE_SGLANG=1, as in CI)."""
    import os

    import pytest

    try:
        import_sglang()
    except Exception as e:  # ImportError, or a transformers that SGLang does not accept
        if os.environ.get("SLLMFS_REQUIRE_SGLANG") == "1":
            raise
        pytest.skip(f"SGLang is not importable here ({type(e).__name__}: {e}); "
                    "run .ci/install-sglang.sh and use .venv-sglang/bin/python (.venv-sglang-<release>)",
                    allow_module_level=True)
