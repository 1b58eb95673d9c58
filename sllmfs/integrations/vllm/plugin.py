"""vLLM plugin (entry point group ``vllm.general_plugins``): makes ``sllm`` a load format.

vLLM calls every plugin of that group from ``load_general_plugins()`` in each process (the CLI
before parsing arguments, the engine core, every worker); ``VLLM_PLUGINS`` filters them by name.
``register_model_loader`` is vLLM's public hook for a third-party ``--load-format``. The first process
also serves the engine's kernel caches (Triton, inductor) from the store (integrations/kernel_cache).

Cost: only ``get_model_loader`` (in the process that loads the model) reads the format, and vLLM's
loader package is heavy (0.6 s of imports on a CPU host) and absent from the API server process; so
the format is registered once vLLM itself imports that package (integrations/common/after_import), and
what it registers builds our loader (the copy engine, ~30 ms more) only for a ``--load-format sllm``.
"""

from __future__ import annotations

import logging
from types import ModuleType
from typing import Any

from sllmfs.integrations.common.after_import import after_import
from sllmfs.integrations.vllm import LOAD_FORMAT, SUPPORTED_VERSIONS

MODEL_LOADERS = "vllm.model_executor.model_loader"
log = logging.getLogger("sllmfs.integrations.vllm")
_registered = False


def register() -> None:
    """Entry point ``sllmfs.integrations.vllm.plugin:register``; idempotent (vLLM may call it twice)."""
    global _registered
    if _registered:
        return
    from sllmfs.integrations.kernel_cache import activate  # kernel caches from the store: first process only

    activate(framework="vllm")  # before vLLM compiles anything (Triton, inductor); its workers inherit the dirs
    after_import(MODEL_LOADERS, _register_loader)
    _registered = True


def _register_loader(model_loaders: ModuleType) -> None:
    import vllm

    _log_with_vllm()  # the process that loads: where our lines are
    if vllm.__version__ not in SUPPORTED_VERSIONS:
        log.warning("sllmfs: vLLM %s is untested with --load-format sllm (tested: %s)", vllm.__version__,
                    ", ".join(SUPPORTED_VERSIONS))
    model_loaders.register_model_loader(LOAD_FORMAT)(_loader_entry(model_loaders.BaseModelLoader))


def _loader_entry(base: type) -> type:
    """What vLLM's table of loaders holds for ``sllm``: a subclass of its BaseModelLoader (vLLM checks)
    whose construction returns our loader, imported then."""

    class SllmLoaderEntry(base):  # type: ignore[valid-type,misc]
        def __new__(cls, load_config: Any) -> Any:
            from sllmfs.integrations.vllm.loader import SllmModelLoader

            return SllmModelLoader(load_config)

    return SllmLoaderEntry


def _log_with_vllm() -> None:
    """Our lines (loader, write-back) in vLLM's own log: vLLM configures only its ``vllm`` logger, so
    ours would print nothing below WARNING in its processes. Its handlers and level, once."""
    theirs = logging.getLogger("vllm")
    if theirs.handlers and not log.handlers:
        for handler in theirs.handlers:
            log.addHandler(handler)
        log.setLevel(theirs.level)
        log.propagate = False
