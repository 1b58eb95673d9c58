"""Which SGLang releases ``--load-format sllm`` supports, and the few places where they differ.

The plugin, loader and fast path are one code path wherever the releases agree. Each
difference is one small adapter here, chosen by what the installed SGLang has, so the rest
never asks which release it runs on. Imports nothing of SGLang at module import time.

What changed between 0.5.17 and 0.5.23 that matters to us (read from the wheels):

- 0.5.18: ``import sglang`` points the JIT caches (TRITON_CACHE_DIR, ...) at SGLANG_CACHE_DIR
  with setdefault; the kernel caches from the store must still replace them (``cache_defaults``).
- 0.5.19: ``BaseModelLoader.preloaded_weights_bytes`` (weights already resident when
  ModelRunner sampled free memory; ours are copied in, so 0 is the honest figure, the
  class default); ``add_load_format_choices`` became ``LOAD_FORMAT_CHOICES.extend``.
- 0.5.20: ServerArgs fields moved to ``arg_groups/``; ``LOAD_FORMAT_CHOICES`` and
  ``add_load_format_choices`` are re-exported by ``server_args`` (the same list object).
- 0.5.21: ``loader._post_load_weights`` was renamed ``post_load_weights``.
- 0.5.18: ``--startup-weight-load-mode overlap`` (the issue met it in 0.5.23) admits only SGLang's
  own DefaultModelLoader (sllm's fast path copies beside the model build instead); ``overlap_problem``.
"""

from __future__ import annotations

import re
from typing import Any

OLDEST, NEWEST = "0.5.17", "0.5.23"
SUPPORTED_RANGE = f"{OLDEST} to {NEWEST}"
# Where each supported release has run (README: "SGLang releases"): the CPU test modules in
# their own venv (.ci/install-sglang.sh), or only an import-and-register check; GPU: 0.5.17 only.
TESTED_ON_CPU = ("0.5.17", "0.5.23")
IMPORT_CHECKED = ("0.5.18", "0.5.19", "0.5.20", "0.5.21", "0.5.22")
TESTED_ON_GPU = ("0.5.17",)


def release(version: str) -> tuple[int, int, int] | None:
    """(major, minor, patch) of a version string such as ``0.5.23`` or ``0.5.23.post1``; None if not one."""
    m = re.match(r"^\s*v?(\d+)\.(\d+)\.(\d+)", version)
    return (int(m[1]), int(m[2]), int(m[3])) if m else None


def is_supported(version: str) -> bool:
    r = release(version)
    return r is not None and release(OLDEST) <= r <= release(NEWEST)  # type: ignore[operator]


def version_problem(version: str) -> str | None:
    """One line naming the supported range when ``version`` is outside it, else None."""
    if is_supported(version):
        return None
    return (f"--load-format sllm supports SGLang {SUPPORTED_RANGE}, this is SGLang {version}; "
            f"install one of those (pip install 'sglang>={OLDEST},<={NEWEST}') or a newer sllmfs, "
            "or start without --load-format sllm")


def installed_version() -> str:
    from sglang.version import __version__

    return str(__version__)


def post_load_weights(model: Any) -> None:
    """SGLang's post-load fixup for loaders that bypass ``model.load_weights``."""
    from sglang.srt.model_loader import loader

    fixup = getattr(loader, "post_load_weights", None) or loader._post_load_weights  # renamed in 0.5.21
    fixup(model)


def cache_defaults() -> dict[str, str]:
    """The JIT cache variables SGLang >= 0.5.18 sets on ``import sglang`` (under SGLANG_CACHE_DIR), so
    that sllmfs' kernel caches tell them from a user's own setting; none before 0.5.18."""
    try:
        from sglang.srt.environ import third_party_cache_defaults
    except ImportError:
        return {}
    return dict(third_party_cache_defaults())


OVERLAP_MODE = "overlap"


def overlap_problem(load_format: Any, startup_weight_load_mode: Any) -> str | None:
    """Why ``--startup-weight-load-mode overlap`` cannot run with ``--load-format sllm``, or None.

    SGLang's overlap mode (0.5.18+) builds the model on sentinel weights, captures CUDA graphs,
    then commits the checkpoint through its DefaultModelLoader's resolve/commit steps; it
    admits no other loader (StartupWeightLoadManager: "DefaultModelLoader only") and would
    fail in each scheduler after the model config is read. We say so once, at startup."""
    if str(load_format).lower() != "sllm" or str(startup_weight_load_mode).lower() != OVERLAP_MODE:
        return None
    return ("--startup-weight-load-mode overlap does not work with --load-format sllm (SGLang overlaps only "
            "its own safetensors loader); drop the flag: the sllm fast path already copies the weights "
            "beside the model build")
