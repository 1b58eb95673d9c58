"""SGLang plugin (entry point group ``sglang.srt.plugins``): makes ``sllm`` a load format.

SGLang ≥ 0.5.11 calls every plugin in that group from ``load_plugins()`` in each
process (CLI before argument parsing, Engine before ServerArgs, every scheduler
/TP worker), then applies the hooks registered here. Two things are needed:

- the CLI accepts ``--load-format sllm``: SGLang's own ``add_load_format_choices``;
- ``LoadConfig`` turns ``"sllm"`` into our loader class instead of failing in
  ``LoadFormat("sllm")``; ``get_model_loader`` already instantiates a
  ``load_format`` that is a loader class, so no other SGLang code is hooked.

With patches/sglang-0.5.17-sllm.patch applied, ``LoadFormat.SLLM`` exists and
the patched ``get_model_loader`` builds the loader; the hook then steps aside.

Diagnostics: with ``SLLMFS_PROFILE_LOAD=<folder>`` each process profiles SGLang's
whole ``ModelRunner.load_model`` (the "Load weight" phase) into that folder.
"""

from __future__ import annotations

import os
from typing import Any

from sllmfs.core.config import env_str
from sllmfs.integrations.sglang import LOAD_FORMAT

VERIFY_TARGET = "sglang.srt.configs.load_config.LoadConfig._verify_load_format"
LOAD_PHASE_TARGET = "sglang.srt.model_executor.model_runner.ModelRunner.load_model"  # SGLang times this
PROFILE_ENV = "SLLMFS_PROFILE_LOAD"
_registered = False


def register() -> None:
    """Entry point ``sllmfs.integrations.sglang.plugin:register`` (no arguments, return value ignored)."""
    global _registered
    if _registered:
        return
    from sllmfs.integrations.kernel_cache import activate  # kernel caches from the store (#21): first process only

    activate(framework="sglang")
    from sglang.srt import server_args
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    if LOAD_FORMAT not in server_args.LOAD_FORMAT_CHOICES:
        server_args.add_load_format_choices([LOAD_FORMAT])
    HookRegistry.register(VERIFY_TARGET, _verify_load_format, HookType.AROUND)
    HookRegistry.register(LOAD_PHASE_TARGET, _import_loader_first, HookType.AROUND)
    if env_str(PROFILE_ENV):
        HookRegistry.register(LOAD_PHASE_TARGET, _profiled, HookType.AROUND)
    _registered = True


def _import_loader_first(original: Any, self: Any, *args: Any, **kwargs: Any) -> Any:
    """Import our loader before SGLang's load phase starts its clock, where SGLang's own loaders are
    imported too (with its model module); importing it inside the phase cost 0.07 s of it."""
    fmt = getattr(getattr(self, "server_args", None), "load_format", None)
    if isinstance(fmt, str) and fmt.lower() == LOAD_FORMAT:
        import sllmfs.integrations.sglang.loader  # noqa: F401
    return original(self, *args, **kwargs)


def _profiled(original: Any, self: Any, *args: Any, **kwargs: Any) -> Any:
    """SGLang's load phase under cProfile: <folder>/load-<pid>.prof and a cumulative-time summary .txt."""
    import cProfile
    import io
    import pstats
    from pathlib import Path

    folder = Path(env_str(PROFILE_ENV))
    folder.mkdir(parents=True, exist_ok=True)
    prof = cProfile.Profile()
    try:
        return prof.runcall(original, self, *args, **kwargs)
    finally:
        base = folder / f"load-{os.getpid()}"
        prof.dump_stats(f"{base}.prof")
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("cumulative").print_stats(60)
        Path(f"{base}.txt").write_text(text.getvalue())


def _verify_load_format(original: Any, self: Any, *args: Any, **kwargs: Any) -> Any:
    fmt = self.load_format
    if isinstance(fmt, str) and fmt.lower() == LOAD_FORMAT and not _patched():
        from sllmfs.integrations.sglang.loader import SllmModelLoader

        self.load_format = SllmModelLoader  # get_model_loader: "isinstance(load_format, type)" branch
        return None
    return original(self, *args, **kwargs)


def _patched() -> bool:
    from sglang.srt.configs.load_config import LoadFormat

    return LOAD_FORMAT in LoadFormat._value2member_map_
