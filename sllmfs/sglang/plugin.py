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
"""

from __future__ import annotations

from typing import Any

from sllmfs.sglang import LOAD_FORMAT

VERIFY_TARGET = "sglang.srt.configs.load_config.LoadConfig._verify_load_format"
_registered = False


def register() -> None:
    """Entry point ``sllmfs.sglang.plugin:register`` (no arguments, return value ignored)."""
    global _registered
    if _registered:
        return
    from sglang.srt import server_args
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    if LOAD_FORMAT not in server_args.LOAD_FORMAT_CHOICES:
        server_args.add_load_format_choices([LOAD_FORMAT])
    HookRegistry.register(VERIFY_TARGET, _verify_load_format, HookType.AROUND)
    _registered = True


def _verify_load_format(original: Any, self: Any, *args: Any, **kwargs: Any) -> Any:
    fmt = self.load_format
    if isinstance(fmt, str) and fmt.lower() == LOAD_FORMAT and not _patched():
        from sllmfs.sglang.loader import SllmModelLoader

        self.load_format = SllmModelLoader  # get_model_loader: "isinstance(load_format, type)" branch
        return None
    return original(self, *args, **kwargs)


def _patched() -> bool:
    from sglang.srt.configs.load_config import LoadFormat

    return LOAD_FORMAT in LoadFormat._value2member_map_
