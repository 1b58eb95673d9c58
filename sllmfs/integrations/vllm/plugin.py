"""vLLM plugin (entry point group ``vllm.general_plugins``): makes ``sllm`` a load format.

vLLM calls every plugin of that group from ``load_general_plugins()`` in each process (the CLI
before parsing arguments, the engine core, every worker); ``VLLM_PLUGINS`` filters them by name.
``register_model_loader`` is vLLM's public hook for a third-party ``--load-format``. The first process
also serves the engine's kernel caches (Triton, inductor) from the store (integrations/kernel_cache).
"""

from __future__ import annotations

import logging

from sllmfs.integrations.vllm import LOAD_FORMAT, SUPPORTED_VERSIONS

log = logging.getLogger("sllmfs.integrations.vllm")
_registered = False


def register() -> None:
    """Entry point ``sllmfs.integrations.vllm.plugin:register``; idempotent (vLLM may call it twice)."""
    global _registered
    if _registered:
        return
    from sllmfs.integrations.kernel_cache import activate  # kernel caches from the store: first process only

    activate(framework="vllm")  # before vLLM compiles anything (Triton, inductor); its workers inherit the dirs
    import vllm
    from vllm.model_executor.model_loader import register_model_loader

    from sllmfs.integrations.vllm.loader import SllmModelLoader

    _log_with_vllm()
    if vllm.__version__ not in SUPPORTED_VERSIONS:
        log.warning("sllmfs: vLLM %s is untested with --load-format sllm (tested: %s)", vllm.__version__,
                    ", ".join(SUPPORTED_VERSIONS))
    register_model_loader(LOAD_FORMAT)(SllmModelLoader)
    _registered = True


def _log_with_vllm() -> None:
    """Our lines (loader, write-back) in vLLM's own log: vLLM configures only its ``vllm`` logger, so
    ours would print nothing below WARNING in its processes. Its handlers and level, once."""
    theirs = logging.getLogger("vllm")
    if theirs.handlers and not log.handlers:
        for handler in theirs.handlers:
            log.addHandler(handler)
        log.setLevel(theirs.level)
        log.propagate = False
