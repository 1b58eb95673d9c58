"""The compiled engine (csrc/, module ``sllmfs._native``) and the translation of its errors.

The one place Python reaches the C++ side: every other engine module calls ``lib`` and
raises what :func:`translate` makes of an ``EngineError``.
"""

from __future__ import annotations

import importlib
from typing import Any

from sllmfs.engine.errors import (
    BadPieces,
    ChunkFailed,
    CopyError,
    CudaError,
    ReadinessTimeout,
    SourceCorrupt,
    SourceReadFailed,
)

lib: Any = importlib.import_module("sllmfs._native")
EngineError: type[Exception] = lib.EngineError
# the bounds of CopyEngine's read_depth and read_overlap, as the engine checks them (csrc/engine.h)
READ_DEPTH_MAX: int = lib.READ_DEPTH_MAX
READ_OVERLAP_MAX: int = lib.READ_OVERLAP_MAX
READ_ALIGN: int = lib.READ_ALIGN

# EngineError(kind, message): the kinds csrc/py_module.cpp's kind_name() sends
_KINDS: dict[str, type[CopyError]] = {
    "cuda": CudaError,
    "chunk_failed": ChunkFailed,
    "timeout": ReadinessTimeout,
    "bad_plan": BadPieces,
    "aborted": CopyError,
    "runtime": CopyError,
    "corrupt": SourceCorrupt,
    "io": SourceReadFailed,
}


def translate(exc: Exception, on_cuda: type[CopyError] = CudaError) -> CopyError:
    """The CopyError for a native EngineError; ``on_cuda`` is the class CUDA failures get
    (CudaUnavailable where the failure means no usable GPU, not a failed call)."""
    kind, message = exc.args if len(exc.args) == 2 else ("runtime", str(exc))
    cls = on_cuda if kind == "cuda" else _KINDS.get(kind, CopyError)
    return cls(message)
