"""Which CUDA runtime the engine opens: ``$SLLMFS_CUDART``, else the one torch loaded, else a wheel's.

The engine is plain C++ with no CUDA at build time; it opens libcudart at run time
(csrc/cuda_api.cpp). Sharing torch's runtime matters: two runtimes in one process
would not share contexts. Nothing here imports torch.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
from collections.abc import Iterator
from typing import Any

from sllmfs.core.config import env_str
from sllmfs.engine.errors import CudaUnavailable
from sllmfs.engine.native import EngineError, lib, translate

_torch_cudart = ""  # found once per process: torch never loads another runtime


def torch_cudart() -> str:
    """Path of the CUDA runtime torch loaded ("" when torch is not imported), so the engine shares its contexts."""
    global _torch_cudart
    if _torch_cudart:
        return _torch_cudart
    torch: Any = sys.modules.get("torch")
    if torch is None:
        return ""  # no torch in this process (a sidecar): see cuda_runtime()
    if not torch.cuda.is_available():
        raise CudaUnavailable("target='cuda' needs a CUDA GPU, but torch sees none (use target='host' to test)")
    torch.cuda.init()
    try:
        with open("/proc/self/maps") as f:
            maps = f.read()  # one read and a find: an SGLang process maps thousands of files (ms per line loop)
        for at in _find_all(maps, "/libcudart.so"):
            end = maps.find("\n", at)
            line = maps[maps.rfind("\n", 0, at) + 1 : end if end >= 0 else None]
            path = line.rsplit(None, 1)[-1]
            if "libcudart.so" in os.path.basename(path):
                _torch_cudart = path
                return path
    except OSError:
        pass
    return ""


def _find_all(text: str, needle: str) -> Iterator[int]:
    at = text.find(needle)
    while at >= 0:
        yield at
        at = text.find(needle, at + 1)


@functools.cache
def wheel_cudart() -> str:
    """libcudart from an installed nvidia-* wheel (cu13 layout, then cuda_runtime), found without importing torch."""
    try:
        spec = importlib.util.find_spec("nvidia")
    except (ImportError, ValueError):
        return ""
    for root in (spec.submodule_search_locations or []) if spec else []:
        for sub in ("cu13/lib", "cuda_runtime/lib"):
            for so in ("libcudart.so.13", "libcudart.so.12"):
                path = os.path.join(root, sub, so)
                if os.path.exists(path):
                    return path
    return ""


def cuda_runtime() -> tuple[str, str]:
    """(preferred, fallback) runtime paths for the native loader.

    Preferred: $SLLMFS_CUDART, else the runtime torch loaded when torch is
    already imported (torch is never imported here). The native side then tries
    runtimes already loaded (RTLD_NOLOAD), then libcudart.so.13/.12 on the
    loader path, then the fallback: a wheel's copy (:func:`wheel_cudart`).
    """
    env = env_str("SLLMFS_CUDART")
    if env and not os.path.exists(env):
        raise CudaUnavailable(f"SLLMFS_CUDART={env} does not exist; point it at a libcudart.so.13 or unset it")
    return env or torch_cudart(), wheel_cudart()


def runtime_path() -> str:
    """Path of the CUDA runtime the engine uses in this process (loads it); CudaUnavailable if none opens."""
    try:
        return str(lib.runtime_path(*cuda_runtime()))
    except EngineError as e:
        raise translate(e, CudaUnavailable) from None


def device_by_bus(pci_bus_id: str) -> int:
    """This process's device ordinal for a PCI bus id ("0000:41:00.0"; CUDA_VISIBLE_DEVICES may differ per process)."""
    try:
        return int(lib.device_by_bus(pci_bus_id, *cuda_runtime()))
    except EngineError as e:
        raise translate(e, CudaUnavailable) from None
