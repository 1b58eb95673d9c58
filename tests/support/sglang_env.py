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


def require_sglang() -> None:
    """For test modules: skip unless SGLang imports (fail instead when SLLMFS_REQUIRE_SGLANG=1, as in CI)."""
    import os

    import pytest

    try:
        import_sglang()
    except Exception as e:  # ImportError, or a transformers that SGLang does not accept
        if os.environ.get("SLLMFS_REQUIRE_SGLANG") == "1":
            raise
        pytest.skip(f"SGLang 0.5.17 is not importable here ({type(e).__name__}: {e}); "
                    "run .ci/install-sglang.sh and use .venv-sglang/bin/python", allow_module_level=True)
